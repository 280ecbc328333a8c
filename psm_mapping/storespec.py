"""The embedding store's format: settings and key (:class:`StoreSpec`), pixel status codes, a
block's results (:class:`BlockEmbeddings`), opening a Zarr group, and the one-line errors of a
failed open or write. (The store: :mod:`psm_mapping.store`.)
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StoreError
from .grid import Block, OutputGrid

__all__ = ["STORE_FORMAT", "OLD_FORMATS", "ARRAYS", "PENDING", "DONE", "FAULT", "StoreSpec",
           "BlockEmbeddings", "CorruptChunkError", "create_by_rename"]

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


#: OSError numbers of a write the file system refuses (full, over quota, not allowed)
_WRITE_ERRNOS = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG, errno.EACCES,
                 errno.EPERM, errno.EROFS)


def _open_group(url: str, mode: str, storage_options: dict | None = None):
    import zarr

    try:
        return zarr.open_group(store=url, mode=mode, storage_options=storage_options or None)
    except (FileNotFoundError, KeyError) as exc:
        raise StoreError(f"no embedding store at {url} ({exc}): give the path of a store a "
                         "previous run wrote (see `psm-map info`)") from None
    except OSError as exc:
        if exc.errno in _WRITE_ERRNOS:  # a full disk, a refused write: not corruption
            raise _os_error(exc, url, "write the embedding store") from None
        raise StoreError(f"cannot open the store {url} ({type(exc).__name__}: {exc}): "
                         "remove it and rerun to rebuild it") from None
    except Exception as exc:  # zarr raises various errors on corrupt metadata
        raise StoreError(f"cannot open the store {url} ({type(exc).__name__}: {exc}): "
                         "remove it and rerun to rebuild it") from None


class CorruptChunkError(StoreError):
    """A chunk of the store does not decode (checksum mismatch or truncation)."""


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
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
        fix = "free some space or pass --store on another disk"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "pass --store in a folder you can write"
    else:
        fix = "check the folder, or pass another --store"
    return StoreError(f"cannot {what} at {where} ({exc.strerror or exc}): {fix}; finished blocks "
                      "are kept and a rerun resumes")
