"""The multi-scale tiler: grid pixels -> 224 x 224 uint8 chips centred on them.

**One lattice per zoom.** For zoom z the chip footprint is ``F = footprint_m(sat_type, z)``
metres and the chip resolution ``r = F / 224`` m/px, exactly. Every chip of every run is cut
from one global pixel lattice per (CRS, r): lattice pixel ``(m, k)`` covers
``x in [k r, (k + 1) r)`` and ``y in (-(m + 1) r, -m r]``. The chip centred on ``(x, y)`` starts
at lattice column ``rint(x / r - 112)`` and row ``rint(-y / r - 112)``, so its centre is within
``r / 2`` of ``(x, y)`` (0.22 % of the footprint; exact when ``stride / r`` is whole, as at
zoom 1 with the default stride, 640 m / 11.43 m = 56) and its footprint is exact (the GSD
embedding assumes ``r``).

**Fixed read tiles.** The source is read in lattice tiles of :data:`READ_TILE` pixels: the same
requests whatever the block size, the region's shape or the run, so a pixel's chip is
bit-identical across all of them, and overlapping runs share pixels exactly. Tiles are cached
(LRU by bytes), so neighbouring blocks share their halos instead of reading them again; a block
reads only the tiles its chips touch. Each chip is a 224 x 224 slice of a window assembled from
tiles: no read and no resampling per chip.

**Validity and faults.** Each chip carries its valid fraction (mean of the source's validity mask
over the chip); below ``min_valid`` (default 0.5) the pixel gets no chip and is nodata. A source
marks the pixels of failed reads (a tile server's errors after its retries) in
``ImageryWindow.fault_mask``; a chip that touches one is never embedded, whatever its valid
fraction: its pixel is a *fault*, counted, and retried by the next run.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np

from . import constants
from .chips import (DEFAULT_BATCH_SIZE, DEFAULT_MAX_WINDOW_PX, DEFAULT_MIN_VALID, ChipBatch,
                    ChipWindow, block_faults, block_valid_fraction, chip_origins, chip_plan,
                    normalize_chips, read_chip_windows)
from .errors import InputError
from .grid import DEFAULT_BLOCK_SIZE, Block, OutputGrid
from .imagery.base import ImagerySource
from .lattice import CHIP, DEFAULT_CACHE_BYTES, HALF, READ_TILE, ChipReader, LatticeReader

__all__ = [
    "ChipBatch", "ChipWindow", "ChipReader", "LatticeReader", "read_chip_windows",
    "block_valid_fraction", "block_faults", "chip_origins", "iter_block_chips", "iter_chips",
    "normalize_chips", "chip_plan", "DEFAULT_MIN_VALID", "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_WINDOW_PX", "READ_TILE",
]

#: the stages, each its own module: lattice reads (:mod:`.lattice`), chip cutting (:mod:`.chips`);
#: this module drives them block by block (and re-exports their names)
#: (names outside ``__all__`` that callers import from here)
_REEXPORTED = (CHIP, HALF, DEFAULT_CACHE_BYTES)


def _check(zoom_levels, sat_type, min_valid, batch_size):
    if sat_type not in constants.GSD:
        raise InputError(f"unknown sat type {sat_type!r}: use one of {', '.join(constants.GSD)}")
    from .config import check_count, check_fraction, check_zoom_levels

    check_zoom_levels(zoom_levels, upper=None)
    check_fraction("min_valid", min_valid)
    check_count("batch_size", batch_size)


def iter_block_chips(source: ImagerySource | ChipReader, grid: OutputGrid, block: Block,
                     zoom_levels: Sequence[int] | None = None, sat_type: str | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     min_valid: float = DEFAULT_MIN_VALID,
                     valid_out: dict[int, np.ndarray] | None = None,
                     max_window_px: int = DEFAULT_MAX_WINDOW_PX) -> Iterator[ChipBatch]:
    """Chip batches of one block, zoom by zoom. ``valid_out``, if given, receives
    ``{zoom: valid fraction map [h, w]}`` (NaN outside the region) as each zoom is read."""
    zoom_levels = tuple(grid.zoom_levels if zoom_levels is None else zoom_levels)
    sat = source.sat_type if isinstance(source, ChipReader) else (sat_type or grid.sat_type)
    _check(zoom_levels, sat, min_valid, batch_size)
    reader = source if isinstance(source, ChipReader) else ChipReader(source, grid.crs, sat)
    for z in zoom_levels:
        windows = read_chip_windows(reader, grid, block, int(z), sat, max_window_px)
        if valid_out is not None:
            valid_out[int(z)] = block_valid_fraction(block, windows)
        for w in windows:
            yield from w.batches(batch_size, min_valid, block)


def iter_chips(source: ImagerySource, grid: OutputGrid,
               zoom_levels: Sequence[int] | None = None, sat_type: str | None = None,
               batch_size: int = DEFAULT_BATCH_SIZE, min_valid: float = DEFAULT_MIN_VALID,
               block_size: int = DEFAULT_BLOCK_SIZE, progress: bool = True,
               prefetch: bool = True,
               max_window_px: int = DEFAULT_MAX_WINDOW_PX) -> Iterator[ChipBatch]:
    """Chip batches over every block of ``grid`` that holds region pixels. With
    ``prefetch`` the next window is read in a thread while the current one is consumed."""
    from tqdm.auto import tqdm

    zoom_levels = tuple(grid.zoom_levels if zoom_levels is None else zoom_levels)
    sat = sat_type or grid.sat_type
    _check(zoom_levels, sat, min_valid, batch_size)
    reader = ChipReader(source, grid.crs, sat)
    tasks = [(b, int(z)) for b in grid.blocks(block_size) for z in zoom_levels]

    def read(task):
        b, z = task
        return read_chip_windows(reader, grid, b, z, sat, max_window_px)

    bar = tqdm(total=grid.pixel_count * len(zoom_levels), unit="chip", disable=not progress,
               desc="tiling")

    def emit(task, windows):
        for w in windows:
            bar.update(int(w.region_mask.sum()))
            yield from w.batches(batch_size, min_valid, task[0])

    try:
        if not prefetch:
            for task in tasks:
                yield from emit(task, read(task))
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="psm-read") as pool:
            fut = pool.submit(read, tasks[0]) if tasks else None
            for k, task in enumerate(tasks):
                windows = fut.result()
                fut = pool.submit(read, tasks[k + 1]) if k + 1 < len(tasks) else None
                yield from emit(task, windows)
    finally:
        bar.close()
