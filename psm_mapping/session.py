"""Open a store for answering: :func:`open_session`.

A session is a store (read-only) plus what its questions need: the checkpoint the store names
(``checkpoint_path`` in its attributes unless one is given; refused when its sha256 is not the
store's), only the model towers its queries need (no image encoder: answers fuse the stored
``z_img``), the tokenizer and CLAP config the store was built with, and the store's levels
(built once if the store lacks them and can be written). Every answering command (query, cube,
profile, points, serve) opens its store here; the builder (:mod:`psm_mapping.run`) records the
text setup with :func:`record_text_setup`.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import StoreError

log = logging.getLogger(__name__)

__all__ = ["Session", "open_session", "load_model", "compute_dtype", "record_text_setup",
           "reuse_text_setup", "check_checkpoint", "metadata_tags"]


def compute_dtype(dtype: str, device) -> str:
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def load_model(cfg, encoders: Sequence[str] = ("image", "text", "audio")):
    """(model, checkpoint path, device) for a config with ``checkpoint``, ``clap_config``,
    ``device``, ``dtype``, ``imagery`` and ``progress`` (``MapConfig``, ``PointsConfig``), with the
    towers in ``encoders`` (see :meth:`PSM.from_checkpoint`)."""
    from .config import imagery_sat_type
    from .embed import resolve_device
    from .model import PSM
    from .weights import resolve_checkpoint

    device = resolve_device(cfg.device)
    sat = getattr(cfg, "sat_type", None) or imagery_sat_type(getattr(cfg, "imagery", None))
    ckpt = resolve_checkpoint(cfg.checkpoint, sat_type=sat, quiet=not getattr(cfg, "progress", False))
    model = PSM.from_checkpoint(ckpt, clap_config=cfg.clap_config, device=device,
                                dtype=compute_dtype(getattr(cfg, "dtype", "auto"), device), encoders=encoders)
    return model, ckpt, device


def record_text_setup(store, cfg, model) -> None:
    """Record in the store the tokenizer and CLAP config this run used, so that answers reuse them
    without being told (a run that names them updates the record)."""
    rec = {}
    if cfg.tokenizer or "tokenizer" not in store.attrs:
        rec["tokenizer"] = str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer else "roberta-base"
    if cfg.clap_config or "clap_config" not in store.attrs:
        rec["clap_config"] = model.clap_config.to_dict()
    if rec:
        try:
            store.group.attrs.update(json.loads(json.dumps(rec, default=str)))
        except (OSError, PermissionError) as exc:  # a read-only store still maps
            log.warning("could not record the tokenizer in the store (%s)", exc)


def reuse_text_setup(store, cfg) -> None:
    """Fill ``cfg.tokenizer`` / ``cfg.clap_config`` from what the store's run used, if not given;
    and ``cfg.checkpoint`` from the store's ``checkpoint_path`` when neither it nor
    ``$PSM_CHECKPOINT`` is set."""
    if not getattr(cfg, "checkpoint", None) and not os.environ.get("PSM_CHECKPOINT"):
        cfg.checkpoint = store.attrs.get("checkpoint_path")
    tok = store.attrs.get("tokenizer")
    if not cfg.tokenizer and tok and tok != "roberta-base" and Path(tok).is_dir():
        cfg.tokenizer = tok
    if not cfg.clap_config and store.attrs.get("clap_config"):
        cfg.clap_config = store.attrs["clap_config"]


def metadata_tags(model, md) -> dict[str, str]:
    """The ``fusion`` and ``metadata`` provenance tags of a map made with ``md``."""
    return {"fusion": "on" if (md.fuse and model.config.uses_metadata) else "off",
            "metadata": ", ".join(f"{k}={v}" for k, v in md.as_dict().items() if v is not None)}


#: checkpoints hashed lately: (real path, size, mtime) -> sha256, kept in the weights cache
SHA_MEMO_FILE = "sha256-memo.json"
SHA_MEMO_ENTRIES = 64


def checkpoint_sha256(ckpt) -> str:
    """The sha256 of the checkpoint file, remembered by (real path, size, modification time) in
    ``$PSM_CACHE/checkpoints/sha256-memo.json``: an official checkpoint (~1 GB) is hashed once, not on every
    query. A file rewritten in place gets a new modification time and is hashed again."""
    from .model.checkpoint import file_sha256
    from .weights import cache_dir

    st = os.stat(ckpt)
    key = f"{os.path.realpath(ckpt)}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = cache_dir() / SHA_MEMO_FILE
    try:
        memo = json.loads(memo_path.read_text())
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    sha = memo.get(key)
    if isinstance(sha, str) and len(sha) == 64:
        return sha
    sha = file_sha256(ckpt)
    memo.pop(key, None)
    memo[key] = sha
    memo = dict(list(memo.items())[-SHA_MEMO_ENTRIES:])
    tmp = memo_path.with_name(f".{SHA_MEMO_FILE}.tmp-{os.getpid()}")
    try:  # a memo that cannot be written only costs the next query a hash
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return sha


def check_checkpoint(ckpt, store, what: str = "store") -> str:
    """The checkpoint's sha256; a :class:`StoreError` when it is not the one ``store`` was built with."""
    sha = checkpoint_sha256(ckpt)
    if sha != store.spec.checkpoint_sha256:
        raise StoreError(f"{Path(ckpt).name} is not the checkpoint this {what} was built with "
                         f"(sha256 {sha[:12]} != {store.spec.checkpoint_sha256[:12]}): pass the same --checkpoint")
    return sha


@dataclass
class _Setup:
    """The fields :func:`load_model` and :func:`reuse_text_setup` read."""

    checkpoint: str | None = None
    clap_config: Any = None
    tokenizer: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    sat_type: str | None = None
    progress: bool = False


@dataclass
class Session:
    """An open store and the model that answers over it (see :func:`open_session`)."""

    store: Any  # EmbeddingStore (or a places PointStore)
    model: Any  # PSM
    checkpoint: Path
    checkpoint_sha256: str
    tokenizer: str | None
    device: Any

    @property
    def stored_metadata(self) -> dict | None:
        """The metadata options the store's ``mean``/``var_sum`` were fused with."""
        return self.store.attrs.get("metadata_options")

    @property
    def zoom_levels(self) -> tuple[int, ...]:
        return tuple(int(z) for z in self.store.spec.zoom_levels)

    def queries(self, texts: Sequence[str] = (), audio: Sequence = (), combine: bool = False, seed: int = 0,
                max_audio_seconds: float | None = None, storage_options: dict | None = None):
        """Embed text and audio queries (:func:`psm_mapping.query.build_queries`) with the store's
        tokenizer; text embeddings are cached in the store (:mod:`psm_mapping.textcache`), so a
        repeated text builds no text tower."""
        from .query import build_queries
        from .textcache import text_cache_for

        url = getattr(self.store, "url", None)
        cache = text_cache_for(url, self.model, self.checkpoint_sha256, self.tokenizer,
                               storage_options) if texts and url else None
        return build_queries(self.model, texts, audio, tokenizer=self.tokenizer, combine=combine, seed=seed,
                             max_audio_seconds=max_audio_seconds, text_cache=cache)

    def query_matrix(self, queries):
        """The kernel's :class:`~psm_mapping.engine.QueryMatrix` of ``queries`` (cosine when the
        store or the queries are deterministic)."""
        from .engine import query_matrix

        return query_matrix(queries, probabilistic=bool(self.store.spec.probabilistic))

    def needs_refusion(self, metadata) -> bool:
        """True when ``metadata`` (:class:`~psm_mapping.embed.MetadataOptions`) differ from the
        store's: fusion and heads must re-run from ``z_img``."""
        stored = self.stored_metadata
        return metadata is not None and stored is not None and metadata.as_dict() != stored

    def refusion(self, metadata):
        """A :class:`~psm_mapping.engine.Refusion` for ``metadata``, None when the stored
        means already answer them."""
        from .engine import Refusion

        return Refusion(self.model, metadata, self.store) if self.needs_refusion(metadata) else None


def open_session(store, checkpoint: str | os.PathLike | None = None, *, encoders: Sequence[str] = ("text",),
                 clap_config=None, tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
                 storage_options: dict | None = None, offline: bool = False, levels: bool = True,
                 progress: bool = False, log_fn=None) -> Session:
    """Open ``store`` (a path/URL or an open :class:`~psm_mapping.store.EmbeddingStore`) for answering.

    ``checkpoint``: default the one the store names (its ``checkpoint_path``), else
    ``$PSM_CHECKPOINT``; refused (:class:`StoreError`) when it is not the store's. ``encoders``:
    the towers to load (``"text"``, ``"audio"``; never the image encoder). ``tokenizer`` /
    ``clap_config``: default what the store's run recorded. ``levels``: build the store's levels
    once if it lacks them (needs write access; else answers compute levels from full resolution).
    """
    from .store import EmbeddingStore

    if offline:
        from .offline import set_offline

        set_offline()
    if isinstance(store, (str, os.PathLike)):
        url = str(store)
        st = EmbeddingStore.open(url, storage_options=storage_options, mode="r")
        if levels:
            from .levels import ensure_levels, has_levels

            if not has_levels(st):
                try:
                    w = EmbeddingStore.open(url, storage_options=storage_options, mode="r+")
                except Exception:  # noqa: BLE001 - read-only: answers compute levels on read
                    w = None
                if w is not None and ensure_levels(w, log_fn or log.info):
                    st = EmbeddingStore.open(url, storage_options=storage_options, mode="r")
    else:
        st = store
    setup = _Setup(checkpoint=None if checkpoint is None else str(checkpoint), clap_config=clap_config,
                   tokenizer=None if tokenizer is None else str(tokenizer), device=device, dtype=dtype,
                   sat_type=st.spec.sat_type, progress=progress)
    reuse_text_setup(st, setup)
    model, ckpt, dev = load_model(setup, encoders=tuple(e for e in encoders if e != "image"))
    sha = check_checkpoint(ckpt, st)
    return Session(st, model, Path(ckpt), sha, setup.tokenizer, dev)
