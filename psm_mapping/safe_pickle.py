"""Load pickled tensors (the official shards' ``.pyd`` members) without running their code.

A pickle can call any importable function. We accept three encodings and nothing else:

* ``torch.save`` output (zip archive, or the legacy non-zip format): ``torch.load(weights_only=True)``;
* a raw ``pickle.dumps(tensor)``, which is
  ``torch._utils._rebuild_tensor_v2(torch.storage._load_from_bytes(<legacy torch.save bytes>), ...)``:
  an :class:`pickle.Unpickler` whose ``find_class`` serves an explicit allowlist, with
  ``_load_from_bytes`` replaced by ``torch.load(weights_only=True)`` of the nested bytes;
* a raw pickle of a numpy array (numeric dtypes only).

Any other global (``os.system``, ``builtins.eval``, ...) raises before anything runs.
"""
from __future__ import annotations

import collections
import io
import pickle
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .errors import InputError, PSMError

_ZIP_MAGIC = b"PK\x03\x04"
#: first bytes of the legacy (non-zip) torch.save format: a pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _load_storage_bytes(data: bytes) -> Any:
    """Safe stand-in for ``torch.storage._load_from_bytes`` (which unpickles without limits)."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")


def _rebuild_parameter(data: Any, requires_grad: bool = False, backward_hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data.detach()


def _rebuild_from_type_v2(func: Callable, new_type: Any, args: tuple, state: Any) -> torch.Tensor:
    if func is not torch._utils._rebuild_tensor_v2 or new_type not in (torch.Tensor, torch.nn.Parameter):
        raise pickle.UnpicklingError("tensor subclass rebuild is not allowed")
    return func(*args)


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(text, str) or encoding.replace("-", "").lower() != "latin1":
        raise pickle.UnpicklingError("only latin-1 _codecs.encode of a str is allowed")
    return text.encode("latin-1")


def _numpy_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray as _ma, numeric as _num  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as _ma, numeric as _num  # type: ignore[no-redef]
    out: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for mod in ("numpy.core", "numpy._core"):
        out[(f"{mod}.multiarray", "_reconstruct")] = _ma._reconstruct
        if hasattr(_num, "_frombuffer"):
            out[(f"{mod}.numeric", "_frombuffer")] = _num._frombuffer
    return out


#: (module, name) -> the object handed to the unpickler. Nothing else can be referenced.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("torch", "Tensor"): torch.Tensor,
    ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
    ("torch", "Size"): torch.Size,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _latin1_encode,
    **_numpy_globals(),
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referenced a global outside :data:`ALLOWED_GLOBALS`."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only :data:`ALLOWED_GLOBALS`."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed in a raw pickle")


def _read(src: bytes | bytearray | memoryview | str | Path) -> tuple[bytes, str]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return bytes(src), "<bytes>"
    path = Path(src)
    try:
        return path.read_bytes(), str(path)
    except OSError as e:
        raise InputError(f"cannot read tensor file {path}: {e.strerror}; check the path") from e


def load_object(src: bytes | str | Path, error: type[PSMError] = InputError) -> Any:
    """Unpickle tensors / numpy arrays (and containers of them) from bytes or a file, safely."""
    data, name = _read(src)
    try:
        if data.startswith(_ZIP_MAGIC) or data.startswith(_LEGACY_MAGIC):
            return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except ForbiddenGlobal as e:
        raise error(
            f"{name}: pickle references forbidden global {e.qualname}; refusing to load it "
            "(only tensors and numeric arrays are accepted: re-save with torch.save)"
        ) from None
    except Exception as e:  # torch's weights_only errors, corrupt data, ...
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise error(f"{name}: not a loadable tensor pickle ({msg}); re-save it with torch.save") from None


def load_tensor(src: bytes | str | Path, error: type[PSMError] = InputError) -> torch.Tensor:
    """The floating-point tensor pickled in ``src`` (bytes or path); numpy arrays become tensors."""
    obj = load_object(src, error)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind != "f":
            raise error(f"pickled array has dtype {obj.dtype}, expected floating point: re-save it as float32")
        obj = torch.from_numpy(np.array(obj, copy=True))
    if not isinstance(obj, torch.Tensor):
        raise error(f"pickle holds a {type(obj).__name__}, expected one tensor: re-save it with torch.save")
    if not obj.is_floating_point():
        raise error(f"pickled tensor has dtype {obj.dtype}, expected floating point: re-save it as float32")
    return obj.detach()


def dump_tensor(tensor: torch.Tensor, legacy_pickle: bool = False) -> bytes:
    """Serialise a tensor: ``torch.save`` (zip, loadable with ``weights_only=True``) by default;
    ``legacy_pickle=True`` writes ``pickle.dumps`` like the authors' webdataset ``.pyd`` (readable
    by their ``pickle.loads`` loader and, safely, by :func:`load_tensor`)."""
    t = tensor.detach().cpu().contiguous().clone()  # a view would drag its whole storage along
    if legacy_pickle:
        return pickle.dumps(t, protocol=4)
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


__all__ = ["ALLOWED_GLOBALS", "RestrictedUnpickler", "dump_tensor", "load_object", "load_tensor"]
