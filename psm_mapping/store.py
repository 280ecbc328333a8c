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

import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import StoreError
from .grid import Block, OutputGrid, iter_blocks

log = logging.getLogger(__name__)

#: format 3: each zoom level on its own grid (``StoreSpec.zoom_factors``, :mod:`psm_mapping.zoomgrid`)
STORE_FORMAT = "psm-mapping-store/3"
#: formats this version refuses, with what to do
OLD_FORMATS = ("psm-mapping-store/1", "psm-mapping-store/2")
ARRAYS = ("z_img", "mean", "var_sum", "uncertainty", "valid")
#: pixel status codes of the ``status`` array
PENDING, DONE, FAULT = 0, 1, 2


@dataclass
class StoreSpec:
    """Everything that determines the store's content (and so its key)."""

    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int
    stride: float
    block_size: int
    zoom_levels: tuple[int, ...]
    sat_type: str
    checkpoint_sha256: str
    imagery: str
    min_valid: float
    fc_dim: int
    probabilistic: bool
    #: metadata behind the stored ``mean``/``var_sum`` (z_img does not depend on it)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: per zoom level the zoom grid's cell size in output pixels (:mod:`psm_mapping.zoomgrid`);
    #: all 1 (or empty): every zoom on the output grid (dense sampling)
    zoom_factors: tuple[int, ...] = ()

    @property
    def factors(self) -> tuple[int, ...]:
        return tuple(int(f) for f in self.zoom_factors) or tuple(1 for _ in self.zoom_levels)

    @property
    def dense(self) -> bool:
        return all(f == 1 for f in self.factors)

    def key(self) -> str:
        d = asdict(self)
        d.pop("metadata")
        d["zoom_factors"] = list(self.factors)
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @classmethod
    def for_grid(cls, grid: OutputGrid, *, block_size: int, zoom_levels, checkpoint_sha256: str,
                 imagery: str, min_valid: float, fc_dim: int, probabilistic: bool,
                 metadata: dict | None = None, zoom_factors=None) -> "StoreSpec":
        return cls(crs_wkt=grid.crs.to_wkt(), transform=tuple(grid.transform)[:6], width=grid.width,
                   height=grid.height, stride=float(grid.stride), block_size=int(block_size),
                   zoom_levels=tuple(int(z) for z in zoom_levels), sat_type=grid.sat_type,
                   checkpoint_sha256=checkpoint_sha256, imagery=imagery, min_valid=float(min_valid),
                   fc_dim=int(fc_dim), probabilistic=bool(probabilistic), metadata=dict(metadata or {}),
                   zoom_factors=tuple(int(f) for f in (zoom_factors or (1,) * len(tuple(zoom_levels)))))


@dataclass
class BlockEmbeddings:
    """One block's results, per zoom: arrays ``[Z, h, w(, D)]``."""

    block: Block
    z_img: np.ndarray  # float16 [Z, h, w, D]
    mean: np.ndarray  # float16 [Z, h, w, D]
    var_sum: np.ndarray  # float32 [Z, h, w]
    uncertainty: np.ndarray  # float32 [Z, h, w]
    valid: np.ndarray  # float32 [Z, h, w]
    #: uint8 [Z, h, w]: DONE / FAULT where computed, PENDING where not (the store keeps what it
    #: had there); None: the whole block is DONE
    status: np.ndarray | None = None
    chips: int = 0
    #: failed source reads (tiles, scenes) behind the block
    faults: int = 0

    @property
    def fault_pixels(self) -> int:
        """Pixel-zooms masked for read faults (retried by the next run)."""
        return 0 if self.status is None else int((self.status == FAULT).sum())


def _open_group(url: str, mode: str, storage_options: dict | None = None):
    import zarr

    try:
        return zarr.open_group(store=url, mode=mode, storage_options=storage_options or None)
    except (FileNotFoundError, KeyError) as exc:
        raise StoreError(f"no embedding store at {url} ({exc}): give the path of a store a "
                         "previous run wrote (see `psm-map info`)") from None
    except Exception as exc:  # zarr raises various errors on corrupt metadata
        raise StoreError(f"cannot open the store {url} ({type(exc).__name__}: {exc}): "
                         "remove it and rerun to rebuild it") from None


class EmbeddingStore:
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
                raise StoreError(f"the store {url} was built with other settings (key {found} != "
                                 f"{spec.key()}): pass another --store folder or remove it")
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

    def _create(self, attrs: dict) -> None:
        from zarr.codecs import BloscCodec, Crc32cCodec

        s = self.spec
        Z, H, W, D, bs = len(s.zoom_levels), s.height, s.width, s.fc_dim, s.block_size
        # the checksum makes a flipped bit as detectable as a truncated chunk
        comp = [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"), Crc32cCodec()]
        g = self.group
        for name, dtype in (("z_img", "float16"), ("mean", "float16")):
            g.create_array(name, shape=(Z, H, W, D), chunks=(1, bs, bs, D), dtype=dtype,
                           fill_value=np.nan, compressors=comp,
                           dimension_names=("zoom", "y", "x", "dim"))
        for name in ("var_sum", "uncertainty", "valid"):
            g.create_array(name, shape=(Z, H, W), chunks=(1, bs, bs), dtype="float32",
                           fill_value=np.nan, compressors=comp, dimension_names=("zoom", "y", "x"))
        g.create_array("status", shape=(Z, H, W), chunks=(1, bs, bs), dtype="uint8",
                       fill_value=PENDING, compressors=comp, dimension_names=("zoom", "y", "x"))
        t = s.transform
        xs = t[2] + (np.arange(W) + 0.5) * t[0]
        ys = t[5] + (np.arange(H) + 0.5) * t[4]
        for name, vals in (("x", xs), ("y", ys), ("zoom", np.asarray(s.zoom_levels, dtype=np.int32))):
            a = g.create_array(name, shape=vals.shape, chunks=vals.shape, dtype=vals.dtype,
                               dimension_names=(name,))
            a[:] = vals
        g.attrs.update({**attrs, "format": STORE_FORMAT, "key": s.key(), "spec": asdict(s),
                        "crs_wkt": s.crs_wkt})
        from .levels import GROUP, create_levels

        create_levels(g, s)  # overviews of embeddings, written with each block (levels.py)
        g[GROUP].attrs.update({"complete": True})

    def _check_arrays(self) -> None:
        missing = [a for a in (*ARRAYS, "status") if a not in self.group]
        if missing:
            raise StoreError(f"the store {self.url} is incomplete (missing {', '.join(missing)}): "
                             "remove it and rerun to rebuild it")

    # ------------------------------------------------------------------ blocks
    def block_index(self, block: Block) -> tuple[int, int]:
        bs = self.spec.block_size
        return block.row_off // bs, block.col_off // bs

    def status(self, block: Block | None = None) -> np.ndarray:
        """uint8 ``[Z, h, w]`` pixel status of ``block`` (default: the whole grid). A status chunk
        that does not decode reads as PENDING (its block is computed again)."""
        if block is not None:
            ys, xs = block.slices
            try:
                return np.asarray(self.group["status"][block.zoom_slice, ys, xs])
            except Exception:  # a corrupt status chunk: recompute the block
                return np.zeros((self._nz(block), block.height, block.width), np.uint8)
        try:
            return np.asarray(self.group["status"][:])
        except Exception:
            out = np.zeros((len(self.spec.zoom_levels), self.spec.height, self.spec.width), np.uint8)
            for b in self.iter_blocks():
                out[(b.zoom_slice, *b.slices)] = self.status(b)
            return out

    def _nz(self, block: Block) -> int:
        return len(range(len(self.spec.zoom_levels))[block.zoom_slice])

    # ------------------------------------------------------------------ zoom grids
    @property
    def groups(self):
        """The zoom grids (:class:`~psm_mapping.zoomgrid.ZoomGroup`): dense stores have one, the
        output grid with every zoom; each zoom's arrays fill the top-left ``height`` x ``width``
        of its plane of the ``[zoom, y, x]`` arrays."""
        from .zoomgrid import zoom_groups

        return zoom_groups(self.spec.height, self.spec.width, self.spec.factors)

    def zoom_group(self, zoom_index: int):
        from .zoomgrid import group_of

        return group_of(self.groups, zoom_index)

    def zoom_status(self, zoom_index: int) -> np.ndarray:
        """uint8 ``[h, w]``: status of zoom ``zoom_index`` on its own grid."""
        g = self.zoom_group(zoom_index)
        try:
            return np.asarray(self.group["status"][zoom_index, :g.height, :g.width])
        except Exception:
            return self.status()[zoom_index, :g.height, :g.width]

    def pending(self, block: Block, need: np.ndarray, status: np.ndarray | None = None) -> np.ndarray:
        """bool ``[Z, h, w]``: pixels of ``need`` (bool [h, w], e.g. the region) not DONE yet."""
        st = self.status(block) if status is None else status
        return need[None] & (st != DONE)

    def is_done(self, block: Block, need: np.ndarray | None = None) -> bool:
        """True when every pixel of ``need`` (default: the whole block) is DONE at every zoom."""
        need = np.ones((block.height, block.width), bool) if need is None else need
        return not self.pending(block, need).any()

    def done_mask(self, zoom_index: int | None = None) -> np.ndarray:
        """bool ``[block rows, block columns]``: blocks with computed pixels (``zoom_index``: the
        blocks of that zoom's own grid)."""
        st = self.status()
        bs = self.spec.block_size
        if zoom_index is not None:
            g = self.zoom_group(zoom_index)
            out = np.zeros((-(-g.height // bs), -(-g.width // bs)), bool)
            for b in iter_blocks(g.height, g.width, bs):
                out[b.index] = bool((st[(zoom_index, *b.slices)] == DONE).any())
            return out
        nby, nbx = -(-self.spec.height // bs), -(-self.spec.width // bs)
        out = np.zeros((nby, nbx), bool)
        for b in iter_blocks(self.spec.height, self.spec.width, bs):
            out[b.index] = bool((st[(slice(None), *b.slices)] == DONE).any())
        return out

    def write_block(self, result: BlockEmbeddings) -> None:
        """Write a block's computed pixels (merged with what the store holds elsewhere in the
        block), chunks whole, then their status (written last: the commit point)."""
        b = result.block
        ys, xs = b.slices
        g = self.group
        new = {n: getattr(result, n) for n in ARRAYS}
        status = (np.full(result.valid.shape, DONE, np.uint8) if result.status is None
                  else np.asarray(result.status, np.uint8).copy())
        keep = status == PENDING
        if keep.any():
            old_status = self.status(b)
            keep &= old_status != PENDING
            try:
                old = self.read_block(b) if keep.any() else None
            except CorruptChunkError:  # unreadable: those pixels are computed again later
                old = None
            if old is not None:  # pixels an earlier run computed: keep them as they are
                for n in ARRAYS:
                    new[n] = new[n].copy()
                    new[n][keep] = old[n][keep]
                status[keep] = old_status[keep]
        zs = b.zoom_slice
        try:
            g["z_img"][zs, ys, xs, :] = new["z_img"]
            g["mean"][zs, ys, xs, :] = new["mean"]
            for n in ("var_sum", "uncertainty", "valid"):
                g[n][zs, ys, xs] = new[n]
            from .levels import write_block_levels

            # the block's level cells (before the status: a killed write is recomputed whole)
            write_block_levels(self, b, new["mean"], new["var_sum"], status, new["uncertainty"], new["z_img"])
            g["status"][zs, ys, xs] = status
        except OSError as exc:
            raise _os_error(exc, self.url, f"write block {b.index} of the embedding store") from None

    def reset_blocks(self, blocks) -> None:
        """Mark ``blocks`` PENDING everywhere (e.g. after a corrupt chunk): the next run
        computes them again."""
        from .levels import clear_block_levels

        for b in blocks:
            ys, xs = b.slices
            self.group["status"][b.zoom_slice, ys, xs] = np.zeros((self._nz(b), b.height, b.width), np.uint8)
            clear_block_levels(self, b)

    def find_corrupt_blocks(self, names=(*ARRAYS, "status")) -> list[Block]:
        """Blocks with a chunk that does not decode (checksum mismatch, truncation)."""
        bad = []
        for b in self.iter_blocks():
            try:
                self.read_block(b, names)
            except StoreError:
                bad.append(b)
        return bad

    def read_block(self, block: Block, names=ARRAYS, zoom_index: int | slice = slice(None)) -> dict:
        """``{name: array}`` of one block (a :class:`StoreError` if a chunk does not decode)."""
        ys, xs = block.slices
        if isinstance(zoom_index, slice) and zoom_index == slice(None):
            zoom_index = block.zoom_slice
        return {n: self.read(n, ys, xs, zoom_index, where=f"block {block.index}") for n in names}

    def read(self, name: str, ys: slice = slice(None), xs: slice = slice(None),
             zoom_index: int | slice = slice(None), where: str = "") -> np.ndarray:
        """``name[zoom, ys, xs(, :)]`` in one read (several chunks decode concurrently); a chunk
        that does not decode is a :class:`StoreError`."""
        a = self._array(name)
        try:
            return a[zoom_index, ys, xs, :] if a.ndim == 4 else a[zoom_index, ys, xs]
        except Exception as exc:  # a chunk that does not decode (truncated, overwritten)
            at = where or f"rows {ys.start}..{ys.stop}, columns {xs.start}..{xs.stop}"
            raise CorruptChunkError(f"the store {self.url} has a corrupt chunk in {name!r} at {at} "
                                    f"({type(exc).__name__}: {exc}): rerun the map command that "
                                    "built it (it recomputes corrupt blocks), or remove the store"
                                    ) from None

    def _array(self, name: str):
        """The Zarr array ``name``, opened once per store object (its metadata read once)."""
        arrays = self.__dict__.setdefault("_arrays", {})
        if name not in arrays:
            arrays[name] = self.group[name]
        return arrays[name]

    def iter_blocks(self) -> Iterator[Block]:
        """Every block of the store's grid (done or not), row-major; a store with zooms on their own
        grids (scale-true sampling): the blocks of each zoom grid in turn (``Block.zooms`` set)."""
        from dataclasses import replace

        bs = self.spec.block_size
        if self.spec.dense:
            yield from iter_blocks(self.spec.height, self.spec.width, bs)
            return
        for g in self.groups:
            for b in iter_blocks(g.height, g.width, bs):
                yield replace(b, zooms=g.zooms)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def __repr__(self) -> str:
        st = self.status()
        return (f"EmbeddingStore({self.url!r}, {int((st == DONE).sum())} pixel-zooms done, "
                f"{int((st == FAULT).sum())} faults)")


def lock_key(block: Block) -> tuple:
    """The lock of a block: its chunk index (and its zoom grid, for a store with zooms on their
    own grids)."""
    return tuple(int(i) for i in block.index) if block.zooms is None else \
        (f"z{block.zooms[0]}", *(int(i) for i in block.index))


class CorruptChunkError(StoreError):
    """A chunk of the store does not decode (checksum mismatch or truncation)."""


def _local_path(url: str) -> Path | None:
    """The folder of a local store URL, None for a remote one."""
    if "://" not in url:
        return Path(url)
    return Path(url[len("file://"):]) if url.startswith("file://") else None


def _old_format(url: str, fmt: str) -> StoreError:
    return StoreError(f"the store {url} was written by an older psm-mapping ({fmt}, this version "
                      f"writes {STORE_FORMAT}): remove it to rebuild it, or pass another --store")


def create_by_rename(path: Path, build, what: str) -> bool:
    """Make a local store by ``build(tmp)`` under a temporary name, then rename it to ``path``:
    a run starting at the same moment sees either nothing or the whole store. False when
    another run's store took the name first (this one is removed); I/O errors are one
    :class:`StoreError` line (:func:`_os_error`) and leave nothing behind."""
    import shutil

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        build(tmp)
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            return False
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _os_error(exc, str(path), what) from None
    return True


def _os_error(exc: OSError, url: str, what: str) -> StoreError:
    """One line for a failed store write: what, where, how to fix."""
    where = getattr(exc, "filename", None) or url
    if exc.errno == errno.ENOSPC:
        fix = "free some space or pass --store on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "pass --store in a folder you can write"
    else:
        fix = "check the folder, or pass another --store"
    return StoreError(f"cannot {what} at {where} ({exc.strerror or exc}): {fix}; finished blocks "
                      "are kept and a rerun resumes")


# --------------------------------------------------------------------------- locks
class BlockLocks:
    """One lock file per block beside a local store (``<store>.locks/<row>_<col>.lock``, holding
    ``pid host time``), so that two runs on one store compute each block once: the second
    waits for the first. A lock whose process is gone (same host) or older than
    ``stale_s`` (another host) is stale and taken over. Remote stores are not locked."""

    def __init__(self, store_url: str, stale_s: float = 12 * 3600):
        local = _local_path(store_url.rstrip("/"))
        self.dir = local.with_name(local.name + ".locks") if local is not None else None
        self.stale_s, self.host, self.pid = stale_s, socket.gethostname(), os.getpid()
        #: an unreadable lock file older than this is stale (seconds)
        self.unreadable_stale_s = 30.0
        self.held: set[tuple[int, int]] = set()

    def _path(self, index) -> Path:
        return self.dir / ("_".join(str(i) for i in index) + ".lock")

    def holder(self, index) -> str | None:
        """``"pid N on HOST"`` of a live holder other than this process, else None."""
        if self.dir is None:
            return None
        p = self._path(index)
        try:
            pid_s, host, t = p.read_text().split()[:3]
            pid, t = int(pid_s), float(t)
        except (OSError, ValueError):
            try:  # unreadable: a lock of an older version, or a file cut short; stale once old
                age = time.time() - p.stat().st_mtime
            except OSError:
                return None
            return None if age > self.unreadable_stale_s else f"an unknown process ({p})"
        if host == self.host and pid == self.pid:
            return None
        if host == self.host:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return f"pid {pid}"
        return None if time.time() - t > self.stale_s else f"pid {pid} on {host}"

    def acquire(self, index) -> bool:
        """Take the lock of block ``index``; False while another live run holds it."""
        if self.dir is None:
            return True
        index = tuple(index)
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self._path(index)
        for _ in range(2):
            # the lock appears whole or not at all: written under a private name, then hard-linked
            # to the lock's name (atomic, and refused when the name exists), so a holder killed at
            # any moment never leaves an empty lock behind
            tmp = p.with_name(f".{p.name}.{self.pid}.{threading.get_ident()}")
            tmp.write_text(f"{self.pid} {self.host} {time.time():.0f}\n")
            try:
                try:
                    os.link(tmp, p)
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: exclusive create
                    with os.fdopen(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                        f.write(tmp.read_text())
            except FileExistsError:
                if self.holder(index) is not None:
                    return False
                p.unlink(missing_ok=True)  # stale, or our own from an earlier attempt
                continue
            finally:
                tmp.unlink(missing_ok=True)
            self.held.add(index)
            return True
        return False

    def release(self, index) -> None:
        index = tuple(index)
        if self.dir is not None and index in self.held:
            self._path(index).unlink(missing_ok=True)
            self.held.discard(index)

    def release_all(self) -> None:
        for index in list(self.held):
            self.release(index)
