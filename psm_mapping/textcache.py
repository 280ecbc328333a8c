"""Text query embeddings cached in the store: a repeated text query builds no text tower.

Entries live beside the store's arrays, in ``<store>/text_cache/<key>.npy`` (the folder is an
empty Zarr group, so Zarr and xarray see a member they know and read no entry). The key is a hash of the text, the checkpoint's
sha256, the tokenizer's identity (a hash of its files), the CLAP text config and the compute
dtype: anything that changes the embedding changes the key. An entry holds ``mean``,
``raw_mean`` and (probabilistic checkpoints) ``logvar`` as float32 ``[k, D]``: the
:class:`~psm_mapping.model.ProbEmbedding` exactly as computed.

Entries are written whole (temporary name, then rename; on object stores one PUT), so a
reader sees an entry complete or not at all. A store that cannot be written (read-only folder,
an HTTP URL) is answered without caching; a damaged entry is a miss.

>>> cache = TextCache(store.url, checkpoint_sha256, tokenizer_identity(tok), clap=..., dtype="float32")
>>> emb = embed_texts(model, ["birds chirping"], tokenizer=tok, cache=cache)
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

log = logging.getLogger(__name__)

FOLDER = "text_cache"
#: the largest entry read ([3, D] float32 is 6 kB for D = 512)
MAX_ENTRY_BYTES = 1 << 20
FORMAT = "psm-mapping-text-cache/1"
#: the folder is an (empty) Zarr group, so Zarr and xarray see a member they know
GROUP_JSON = json.dumps({"zarr_format": 3, "node_type": "group",
                         "attributes": {"psm_mapping": "text query embeddings cache (see textcache.py)"}}).encode()


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(url[len("file://"):])
    return None if "://" in url else Path(url)


class TextCache:
    """Embeddings of text queries for one (checkpoint, tokenizer, CLAP text config, dtype), kept
    under ``root`` (a store's path or fsspec URL)."""

    def __init__(self, root: str | os.PathLike, checkpoint_sha256: str, tokenizer_identity: str,
                 clap: Any = None, dtype: str = "float32", storage_options: dict | None = None):
        self.root = str(root).rstrip("/")
        self.storage_options = storage_options or {}
        self._ident = {"format": FORMAT, "checkpoint_sha256": checkpoint_sha256,
                       "tokenizer": tokenizer_identity, "clap_text": clap, "dtype": str(dtype)}
        self.writable = True
        self.hits = self.misses = self.writes = 0

    def key(self, text: str) -> str:
        blob = json.dumps({**self._ident, "text": text}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    # ------------------------------------------------------------------ storage
    def _fs(self):
        from fsspec.core import url_to_fs

        return url_to_fs(self.root, **self.storage_options)

    def _read(self, name: str) -> bytes | None:
        local = _local_path(self.root)
        try:
            if local is not None:
                p = local / FOLDER / name
                if not p.is_file() or p.stat().st_size > MAX_ENTRY_BYTES:
                    return None
                return p.read_bytes()
            fs, path = self._fs()
            f = f"{path}/{FOLDER}/{name}"
            if not fs.exists(f) or fs.size(f) > MAX_ENTRY_BYTES:
                return None
            return fs.cat_file(f)
        except Exception as exc:  # noqa: BLE001 - an unreadable entry is a miss
            log.debug("text cache: cannot read %s (%s)", name, exc)
            return None

    def _write(self, name: str, data: bytes) -> bool:
        if not self.writable:
            return False
        local = _local_path(self.root)
        try:
            if local is not None:
                folder = local / FOLDER
                if not local.is_dir():
                    raise FileNotFoundError(local)
                if not (folder / "zarr.json").is_file():
                    folder.mkdir(exist_ok=True)
                    _replace(folder / "zarr.json", GROUP_JSON)
                _replace(folder / name, data)
            else:
                fs, path = self._fs()
                if not fs.exists(f"{path}/{FOLDER}/zarr.json"):
                    fs.pipe_file(f"{path}/{FOLDER}/zarr.json", GROUP_JSON)
                fs.pipe_file(f"{path}/{FOLDER}/{name}", data)  # one object: whole or absent
            return True
        except Exception as exc:  # noqa: BLE001 - a read-only store answers without caching
            self.writable = False
            log.info("text cache: the store %s cannot be written (%s); queries are not cached",
                     self.root, type(exc).__name__)
            return False

    # ------------------------------------------------------------------ entries
    def get(self, texts: Sequence[str]) -> dict:
        """``{text: ProbEmbedding}`` for the texts found (one row each)."""
        import torch

        from .model.heads import ProbEmbedding

        out = {}
        for t in dict.fromkeys(texts):
            data = self._read(self.key(t) + ".npy")
            arr = _decode(data) if data is not None else None
            if arr is None:
                self.misses += 1
                continue
            rows = torch.from_numpy(arr)[:, None, :]
            out[t] = ProbEmbedding(rows[0], logvar=rows[2] if len(rows) == 3 else None, raw_mean=rows[1])
            self.hits += 1
        return out

    def put(self, texts: Sequence[str], emb) -> int:
        """Store row ``i`` of ``emb`` (a ProbEmbedding) for ``texts[i]``; returns entries written."""
        n = 0
        for i, t in enumerate(texts):
            e = emb[i]
            rows = [e.mean, e.raw_mean] + ([e.logvar] if e.logvar is not None else [])
            arr = np.stack([r.detach().float().cpu().numpy()[0] for r in rows])
            buf = io.BytesIO()
            np.save(buf, arr, allow_pickle=False)
            if not self._write(self.key(t) + ".npy", buf.getvalue()):
                break
            n += 1
        self.writes += n
        return n


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` whole: a temporary name, then a rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _decode(data: bytes) -> np.ndarray | None:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - a damaged entry is a miss
        return None
    if arr.dtype != np.float32 or arr.ndim != 2 or arr.shape[0] not in (2, 3) or not np.isfinite(arr).all():
        return None
    return arr


def embed_texts(model, texts: Sequence[str], tokenizer=None, cache: TextCache | None = None,
                embed: Callable | None = None):
    """Embeddings of ``texts`` (a ProbEmbedding, one row per text, in order): from ``cache``
    where found, the rest with ``model.embed_text_queries`` (then stored). A model whose text
    tower is deferred (:meth:`PSM.from_checkpoint`) builds it only when something is missing."""
    from .model.heads import ProbEmbedding

    texts = list(texts)
    embed = embed or (lambda ts: model.embed_text_queries(ts, tokenizer=tokenizer))
    if cache is None:
        return embed(texts)
    found = cache.get(texts)
    missing = [t for t in dict.fromkeys(texts) if t not in found]
    if missing:
        new = embed(missing)
        cache.put(missing, new)
        found.update({t: new[i] for i, t in enumerate(missing)})
    return ProbEmbedding.cat([found[t] for t in texts])


def text_cache_for(root: str, model, checkpoint_sha256: str, tokenizer=None,
                   storage_options: dict | None = None) -> TextCache | None:
    """The cache of ``model``'s text queries under ``root`` (a store), or None when the
    tokenizer cannot be identified (the query then tokenises as usual and says why)."""
    from dataclasses import asdict

    from .errors import PSMError
    from .model.tokenizer import tokenizer_identity

    try:
        ident = tokenizer_identity(tokenizer)
    except (PSMError, TypeError):
        return None
    clap = asdict(model.text_config)
    dtype = str(model.compute_dtype).replace("torch.", "")
    return TextCache(root, checkpoint_sha256, ident, clap=clap, dtype=dtype, storage_options=storage_options)


__all__ = ["TextCache", "embed_texts", "text_cache_for"]
