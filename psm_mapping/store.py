"""The embedding store: a Zarr group (any fsspec URL) holding, per zoom level and grid pixel,
``z_img`` (pre-fusion projector output, float16), the normalised ``mean`` (float16), ``var_sum``
and ``uncertainty`` (float32) for the store's metadata settings, the chip ``valid`` fraction and
a ``status``: :data:`PENDING` (not computed), :data:`DONE` (computed: an embedding, or NaN for
too little valid imagery) or :data:`FAULT` (a read failed, e.g. a tile server error: NaN now,
computed again by the next run).

Image embeddings are expensive and query-independent: a store is keyed by the grid, the imagery's
identity (content of local files, URL of remote ones), the checkpoint, the zoom levels and the
tiler settings, and written block by block. A run computes exactly the pixels its region needs
that are not DONE (so one store serves every region on its grid), writes a block's chunks whole,
then its status (the commit point); a killed run resumes with what is missing and ends with the
same store as an uninterrupted run. Every chunk carries a CRC32C checksum, so a flipped bit is
found like a truncated chunk (:meth:`EmbeddingStore.find_corrupt_blocks`); a map run recomputes
such blocks. Local stores take a lock file per block while computing it
(:class:`BlockLocks`), so two runs on one store never compute a block twice.
"""
from __future__ import annotations

import logging
from pathlib import Path

from .errors import StoreError
from .locks import BlockLocks, _local_path, lock_key  # noqa: F401 (the store's locks, public here too)
from .storechunks import ChunkIO
from .storepath import spec_differences
from .storespec import (ARRAYS, DONE, FAULT, OLD_FORMATS, PENDING, STORE_FORMAT,
                        BlockEmbeddings, CorruptChunkError, StoreSpec, _old_format, _open_group,
                        _os_error, create_by_rename)
from .storestatus import BlockStatus

log = logging.getLogger(__name__)

#: the stages, each its own module: format, spec and errors (:mod:`.storespec`), chunk I/O and
#: checksums (:mod:`.storechunks`), block status and resume (:mod:`.storestatus`); their names are
#: public here too
_REEXPORTED = (ARRAYS, DONE, FAULT, PENDING, BlockEmbeddings, CorruptChunkError, BlockLocks,
               lock_key)


class EmbeddingStore(BlockStatus, ChunkIO):
    """A Zarr group with arrays ``z_img mean var_sum uncertainty valid`` over ``(zoom, y, x[, dim])``
    and a ``done`` flag per block."""

    def __init__(self, url: str, group, spec: StoreSpec):
        self.url, self.group, self.spec = url, group, spec

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_or_create(cls, url: str, spec: StoreSpec, attrs: dict | None = None,
                       storage_options: dict | None = None) -> "EmbeddingStore":
        """Open the store at ``url`` if it was built with ``spec``'s settings, else create it."""
        try:
            group = _open_group(url, "r+", storage_options)
        except StoreError:
            group = None
        if group is not None and group.attrs.get("format") in OLD_FORMATS:
            raise _old_format(url, group.attrs.get("format"))
        if group is not None and group.attrs.get("format") == STORE_FORMAT:
            found = group.attrs.get("key")
            if found != spec.key():
                raise StoreError(f"the store {url} was built with other settings "
                                 f"({spec_differences(spec, group.attrs.get('spec'))}): pass another --store "
                                 "folder or remove it")
            store = cls(url, group, spec)
            store._check_arrays()
            from .levels import ensure_levels

            ensure_levels(store, log.info)  # a store written before levels existed: build them once
            return store
        if group is not None and len(list(group.keys())) > 0:
            raise StoreError(f"{url} holds something that is not a psm-mapping store: choose an "
                             "empty or new --store folder")
        local = _local_path(url)
        if local is not None and group is None:
            return cls._create_local(local, url, spec, attrs)
        try:
            group = _open_group(url, "w", storage_options)
            store = cls(url, group, spec)
            store._create(attrs or {})
        except OSError as exc:
            raise _os_error(exc, url, "create the embedding store") from None
        return store

    @classmethod
    def _create_local(cls, path: Path, url: str, spec: StoreSpec, attrs: dict | None):
        """Create under a temporary name and rename: a run starting at the same moment either
        sees the whole new store or makes its own and finds this one there (and uses it)."""
        if not create_by_rename(path, lambda tmp: cls(str(tmp), _open_group(str(tmp), "w"), spec)._create(attrs or {}),
                                "create the embedding store"):
            return cls.open_or_create(url, spec, attrs)  # another run was first: use its store
        return cls(url, _open_group(url, "r+"), spec)

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r") -> "EmbeddingStore":
        """Open an existing store (``mode="r+"`` to write blocks, e.g. from a dask worker)."""
        group = _open_group(url, mode, storage_options)
        if group.attrs.get("format") in OLD_FORMATS:
            raise _old_format(url, group.attrs.get("format"))
        if group.attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{url} is not a psm-mapping embedding store: pass the .zarr folder "
                             "that `psm-map` wrote under --store")
        a = group.attrs["spec"]
        spec = StoreSpec(**{**a, "zoom_levels": tuple(a["zoom_levels"]), "transform": tuple(a["transform"]),
                            "zoom_factors": tuple(a.get("zoom_factors") or ())})
        store = cls(url, group, spec)
        store._check_arrays()
        return store

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def __repr__(self) -> str:
        st = self.status()
        return (f"EmbeddingStore({self.url!r}, {int((st == DONE).sum())} pixel-zooms done, "
                f"{int((st == FAULT).sum())} faults)")
