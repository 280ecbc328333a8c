"""Reading PSM checkpoints safely: official Lightning ``.ckpt`` files and our safetensors export.

No pickle is ever executed: ``.ckpt`` files are read with ``torch.load(weights_only=True)``
plus an allowlist of the few harmless types a Lightning checkpoint holds (``AttributeDict``,
rebuilt as a plain dict, numpy scalars and dtypes). Anything else is refused with a :class:`CheckpointError` naming it.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError

#: buffers whose presence depends on the transformers version that saved the file
OPTIONAL_BUFFER_RE = re.compile(r"(position_ids|token_type_ids|relative_position_index)$")
#: training-only state in the checkpoint (PCME++ / InfoNCE loss scalars)
TRAINING_ONLY_PREFIXES = ("criterion.",)
SAFETENSORS_FORMAT = "psm-mapping/1"


def _safe_globals() -> list:
    names = [
        "lightning.fabric.utilities.data.AttributeDict",
        "lightning_fabric.utilities.data.AttributeDict",
        "lightning.pytorch.utilities.parsing.AttributeDict",
        "pytorch_lightning.utilities.parsing.AttributeDict",
    ]
    # torch's weights-only unpickler fills only plain dicts (SETITEMS), so Lightning's
    # AttributeDict (a dict subclass holding nothing else) is rebuilt as a plain dict
    out: list = [(dict, n) for n in names]
    try:
        from numpy._core import multiarray as _ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma

    out += [(_ma.scalar, "numpy.core.multiarray.scalar"), (_ma.scalar, "numpy._core.multiarray.scalar"),
            (_ma._reconstruct, "numpy.core.multiarray._reconstruct"),
            (_ma._reconstruct, "numpy._core.multiarray._reconstruct"),
            (np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for t in (np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
              np.uint8, np.uint16, np.uint32, np.uint64, np.bool_, np.str_):
        dt = type(np.dtype(t))
        out.append((dt, f"numpy.dtypes.{dt.__name__}"))
    return out


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def _unsupported_global(msg: str) -> str | None:
    m = re.search(r"GLOBAL ([\w.]+)", msg) or re.search(r"Unsupported global: ([\w.]+)", msg)
    return m.group(1) if m else None


def _existing(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found: pass --checkpoint PATH, set PSM_CHECKPOINT, "
                              "or fetch one with `psm-map weights download NAME`")
    return p


def load_torch_file(path: str | os.PathLike) -> Any:
    """``torch.load`` with weights-only semantics and the Lightning allowlist; one-line errors."""
    p = _existing(path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(p))
    except pickle.UnpicklingError as exc:
        name = _unsupported_global(str(exc))
        if name:
            raise CheckpointError(f"checkpoint {p.name} needs the global {name}, which is not allowed "
                                  "(a pickle could run code): re-save the weights with "
                                  "`psm-map convert` from a trusted copy, or export a plain state_dict") from None
        raise CheckpointError(f"{p.name} is not a readable PyTorch checkpoint ({_first_line(exc)}): "
                              "re-download it or check the path") from None
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler runs no code; any failure = bad file
        raise CheckpointError(f"{p.name} is not a readable PyTorch checkpoint, or is truncated "
                              f"({_first_line(exc)}): re-download it or check the path") from None


def _first_line(exc: BaseException) -> str:
    """First sentence of an exception's message, with its type when the text alone says little."""
    s = str(exc).strip().splitlines()
    text = s[0].split(". ")[0].rstrip(".") if s else ""
    if " " not in text:  # e.g. KeyError(101), EOFError()
        text = f"{type(exc).__name__} {text}".strip()
    return text[:200]


@dataclass
class RawCheckpoint:
    """A checkpoint's weights and what it says about itself."""

    state_dict: dict[str, torch.Tensor]
    hyper_parameters: dict[str, Any] = field(default_factory=dict)
    clap_config: dict | None = None  # from a safetensors export
    psm_config: dict | None = None  # from a safetensors export
    path: Path | None = None
    format: str = "lightning"


def read_checkpoint(path: str | os.PathLike) -> RawCheckpoint:
    """Read an official Lightning ``.ckpt``, a plain state_dict file, or a safetensors export."""
    p = _existing(path)
    with open(p, "rb") as f:
        head = f.read(16)
    if p.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return _read_safetensors(p)
    obj = load_torch_file(p)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{p.name} holds a {type(obj).__name__}, not a checkpoint dict: "
                              "give a PSM Lightning .ckpt or a safetensors export")
    if "state_dict" in obj:
        sd, hp = obj["state_dict"], dict(obj.get("hyper_parameters") or {})
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        sd, hp = obj, {}
    else:
        raise CheckpointError(f"{p.name} has no 'state_dict': give a PSM Lightning .ckpt or a "
                              "safetensors export (`psm-map convert`)")
    if not any(k.startswith("sat_encoder.") for k in sd):
        raise CheckpointError(f"{p.name} is not a PSM checkpoint (no sat_encoder.* weights): "
                              "use one of the official experiments (`psm-map weights`)")
    return RawCheckpoint(dict(sd), hp, path=p, format="lightning")


def _read_safetensors(p: Path) -> RawCheckpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        from safetensors.torch import load_file

        sd = load_file(str(p))  # memory-mapped
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{p.name} is not a readable safetensors file ({_first_line(exc)}): "
                              "re-export it with `psm-map convert CKPT OUT.safetensors`") from None
    try:
        loads = lambda k: json.loads(meta[k]) if k in meta else None  # noqa: E731
        return RawCheckpoint(sd, loads("hyper_parameters") or {}, clap_config=loads("clap_config"),
                             psm_config=loads("psm_config"), path=p, format="safetensors")
    except ValueError as exc:
        raise CheckpointError(f"{p.name} has corrupt metadata ({exc}): re-export it") from None


def _shape(t) -> tuple:
    return tuple(t.shape)


#: keys named per category in a mismatch message (the count is always given)
_SHOWN_KEYS = 3


def check_keys(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], name: str) -> None:
    """Strict on parameters and stateful buffers; index buffers may be absent or extra."""
    missing = [k for k in expected if k not in found and not OPTIONAL_BUFFER_RE.search(k)]
    unexpected = [k for k in found if k not in expected and not OPTIONAL_BUFFER_RE.search(k)
                  and not k.startswith(TRAINING_ONLY_PREFIXES)]
    mis = [k for k in expected if k in found and _shape(expected[k]) != _shape(found[k])]
    if not (missing or unexpected or mis):
        return
    parts = []

    def show(keys, fmt, label):
        items = [fmt(k) for k in keys[:_SHOWN_KEYS]]
        more = f" (+{len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else ""
        parts.append(f"{label} {len(keys)}: " + ", ".join(items) + more)

    if missing:
        show(missing, lambda k: f"{k} expected {list(_shape(expected[k]))}", "missing")
    if unexpected:
        show(unexpected, lambda k: f"{k} found {list(_shape(found[k]))}", "unexpected")
    if mis:
        show(mis, lambda k: f"{k} expected {list(_shape(expected[k]))} found {list(_shape(found[k]))}",
             "mis-shaped")
    raise CheckpointError(f"{name} does not match the model ({'; '.join(parts)}): check that the "
                          "file is a PSM checkpoint and pass the matching --clap-config")


def to_jsonable(obj: Any) -> Any:
    """hyper_parameters to plain JSON types (numpy scalars, paths, tensors)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, Any]) -> Path:
    """Write weights + JSON metadata, atomically (temp name, then rename)."""
    from safetensors.torch import save_file

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    meta = {"format": SAFETENSORS_FORMAT}
    meta.update({k: v if isinstance(v, str) else json.dumps(to_jsonable(v)) for k, v in metadata.items()})
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p


__all__ = ["RawCheckpoint", "read_checkpoint", "load_torch_file", "check_keys", "save_safetensors",
           "file_sha256", "to_jsonable"]
