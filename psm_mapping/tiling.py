"""The multi-scale tiler: grid blocks -> 224 x 224 uint8 chips centred on grid pixels.

For a block and a zoom level z the chip footprint is ``F = footprint_m(sat_type, z)`` metres
and the chip resolution ``r = F / 224`` m/px, exactly. The source is read **once** per block
and zoom: a window at resolution ``r`` covering every chip of the block (the block extent plus
a halo of half a footprint). Each chip is then a 224 x 224 *slice* of that window: no read and
no resampling per chip.

Snapping: the window's left/top edge is the first chip's left/top edge, so chip ``j`` starts
``j * stride / r`` window pixels further. That offset is rounded to a whole pixel, which moves
a chip centre by at most ``r / 2`` (0.22 % of the footprint) from its grid pixel centre and
keeps the footprint exact (the GSD embedding assumes ``r``). When ``stride / r`` is an integer
(the default stride at zoom 1: 640 m / 11.43 m = 56) chip centres are exact.
Resampling an alternative ``r'`` with ``stride / r'`` integral would instead change the
footprint by up to ``r / (2 stride)`` (1.8 % at zoom 3 with the default stride), which is
worse for the model than a sub-pixel shift.

Huge strides (chips far apart) would make one window per block wasteful, so a block is split
into sub-blocks whose window stays under ``max_window_px`` pixels a side.

Each chip carries its valid fraction (mean of the source's validity mask over the chip);
below ``min_valid`` (default 0.5) the pixel gets no chip and is nodata.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import constants
from .errors import InputError
from .grid import DEFAULT_BLOCK_SIZE, Block, OutputGrid
from .imagery.base import ImagerySource

__all__ = [
    "ChipBatch", "ChipWindow", "read_chip_windows", "block_valid_fraction",
    "iter_block_chips", "iter_chips", "normalize_chips", "chip_plan",
    "DEFAULT_MIN_VALID", "DEFAULT_BATCH_SIZE", "DEFAULT_MAX_WINDOW_PX",
]

CHIP = constants.CHIP_SIZE
DEFAULT_MIN_VALID = 0.5
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_WINDOW_PX = 4096


@dataclass
class ChipBatch:
    """A batch of chips to embed. ``chips`` uint8 [N, 3, 224, 224]; ``rows``/``cols`` grid
    pixel indices [N]; ``valid_fraction`` float32 [N]; ``lon``/``lat`` float64 [N] of the
    pixel centres; ``block`` the grid block they belong to."""

    chips: np.ndarray
    zoom: int
    rows: np.ndarray
    cols: np.ndarray
    valid_fraction: np.ndarray
    lon: np.ndarray
    lat: np.ndarray
    block: Block | None = None
    faults: int = 0

    def __len__(self) -> int:
        return int(self.chips.shape[0])


@dataclass
class ChipWindow:
    """One read: window ``data`` uint8 [3, H, W] and ``mask`` bool [H, W] at ``resolution``
    m/px, for grid pixels ``rows`` x ``cols`` (1-D, absolute indices); chip of pixel (i, j)
    is ``data[:, row_offsets[i]:+224, col_offsets[j]:+224]``."""

    zoom: int
    resolution: float
    bounds: tuple[float, float, float, float]
    data: np.ndarray
    mask: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    row_offsets: np.ndarray
    col_offsets: np.ndarray
    region_mask: np.ndarray  # bool [len(rows), len(cols)]
    valid_fraction: np.ndarray  # float32 [len(rows), len(cols)], NaN outside the region
    lon: np.ndarray  # float64 [len(rows), len(cols)]
    lat: np.ndarray
    faults: int = 0

    def chip(self, i: int, j: int) -> np.ndarray:
        """The chip of local pixel (i, j), a view [3, 224, 224]."""
        a, b = int(self.row_offsets[i]), int(self.col_offsets[j])
        return self.data[:, a:a + CHIP, b:b + CHIP]

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE,
                min_valid: float = DEFAULT_MIN_VALID,
                block: Block | None = None) -> Iterator[ChipBatch]:
        """Chips of region pixels whose valid fraction is >= ``min_valid``, in batches."""
        keep = self.region_mask & (self.valid_fraction >= min_valid)
        ii, jj = np.nonzero(keep)
        for s in range(0, len(ii), batch_size):
            bi, bj = ii[s:s + batch_size], jj[s:s + batch_size]
            out = np.empty((len(bi), 3, CHIP, CHIP), dtype=np.uint8)
            ro, co = self.row_offsets[bi], self.col_offsets[bj]
            for k in range(len(bi)):
                a, b = ro[k], co[k]
                out[k] = self.data[:, a:a + CHIP, b:b + CHIP]
            yield ChipBatch(
                chips=out, zoom=self.zoom, rows=self.rows[bi], cols=self.cols[bj],
                valid_fraction=self.valid_fraction[bi, bj].astype(np.float32),
                lon=self.lon[bi, bj], lat=self.lat[bi, bj], block=block,
                faults=self.faults if s == 0 else 0,
            )


@dataclass(frozen=True)
class _SubBlock:
    row_off: int
    col_off: int
    height: int
    width: int


def chip_plan(grid: OutputGrid, zoom: int, sat_type: str | None = None) -> tuple[float, float]:
    """(chip resolution m/px, chip step in window pixels per grid pixel) at ``zoom``."""
    sat = sat_type or grid.sat_type
    res = constants.chip_resolution_m(sat, zoom)
    return res, grid.stride / res


def _sub_blocks(grid: OutputGrid, block: Block, step: float, max_window_px: int):
    """Split ``block`` (cropped to its region pixels) so windows stay under max_window_px."""
    m = grid.mask[block.slices]
    rows = np.nonzero(m.any(axis=1))[0]
    cols = np.nonzero(m.any(axis=0))[0]
    if len(rows) == 0:
        return
    r0, r1 = block.row_off + rows[0], block.row_off + rows[-1] + 1
    c0, c1 = block.col_off + cols[0], block.col_off + cols[-1] + 1
    k = max(1, int(math.floor((max_window_px - CHIP) / step)) + 1) if step > 0 else 1 << 30
    for r in range(r0, r1, k):
        for c in range(c0, c1, k):
            sb = _SubBlock(r, c, min(k, r1 - r), min(k, c1 - c))
            if grid.mask[r:r + sb.height, c:c + sb.width].any():
                yield sb


def _read_window(source: ImagerySource, grid: OutputGrid, sb: _SubBlock, zoom: int,
                 res: float, step: float) -> ChipWindow:
    s = grid.stride
    t = grid.transform
    foot = res * CHIP
    # centre of the first pixel of the sub-block, grid CRS
    xc0 = t.c + (sb.col_off + 0.5) * s
    yc0 = t.f - (sb.row_off + 0.5) * s
    col_offsets = np.rint(np.arange(sb.width) * step).astype(np.int64)
    row_offsets = np.rint(np.arange(sb.height) * step).astype(np.int64)
    width = int(col_offsets[-1]) + CHIP
    height = int(row_offsets[-1]) + CHIP
    left = xc0 - foot / 2.0
    top = yc0 + foot / 2.0
    bounds = (left, top - height * res, left + width * res, top)
    win = source.read(bounds, grid.crs, (height, width))
    mask = np.asarray(win.mask, dtype=bool)
    region = grid.mask[sb.row_off:sb.row_off + sb.height, sb.col_off:sb.col_off + sb.width]
    if mask.all():
        vf = np.ones((sb.height, sb.width), dtype=np.float32)
    else:
        # summed-area table -> valid count of every chip in O(1)
        sat = np.zeros((height + 1, width + 1), dtype=np.int32)  # < 2**31 for any window
        np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=sat[1:, 1:])
        a = row_offsets[:, None]
        b = col_offsets[None, :]
        count = sat[a + CHIP, b + CHIP] - sat[a, b + CHIP] - sat[a + CHIP, b] + sat[a, b]
        vf = (count / float(CHIP * CHIP)).astype(np.float32)
    vf[~region] = np.nan
    rows = np.arange(sb.row_off, sb.row_off + sb.height)
    cols = np.arange(sb.col_off, sb.col_off + sb.width)
    lon, lat = grid.pixel_lonlat(sb)
    return ChipWindow(zoom=zoom, resolution=res, bounds=bounds, data=win.data, mask=mask,
                      rows=rows, cols=cols, row_offsets=row_offsets, col_offsets=col_offsets,
                      region_mask=region.copy(), valid_fraction=vf, lon=lon, lat=lat,
                      faults=int(getattr(win, "faults", 0)))


def _check(zoom_levels, sat_type, min_valid, batch_size):
    if sat_type not in constants.GSD:
        raise InputError(f"unknown sat type {sat_type!r}: use one of {', '.join(constants.GSD)}")
    if not zoom_levels or any(int(z) < 1 for z in zoom_levels):
        raise InputError(f"bad zoom levels {tuple(zoom_levels)}: give positive integers, "
                         "e.g. 1,3,5")
    if not 0.0 <= min_valid <= 1.0:
        raise InputError(f"--min-valid {min_valid} must be in [0, 1]")
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1")


def read_chip_windows(source: ImagerySource, grid: OutputGrid, block: Block, zoom: int,
                      sat_type: str | None = None,
                      max_window_px: int = DEFAULT_MAX_WINDOW_PX) -> list[ChipWindow]:
    """Read the windows (usually one) holding every chip of ``block`` at ``zoom``."""
    res, step = chip_plan(grid, zoom, sat_type)
    return [_read_window(source, grid, sb, zoom, res, step)
            for sb in _sub_blocks(grid, block, step, max_window_px)]


def block_valid_fraction(block: Block, windows: Sequence[ChipWindow]) -> np.ndarray:
    """Valid fraction map float32 [block.height, block.width], NaN outside the region."""
    out = np.full((block.height, block.width), np.nan, dtype=np.float32)
    for w in windows:
        r = w.rows - block.row_off
        c = w.cols - block.col_off
        out[r[0]:r[-1] + 1, c[0]:c[-1] + 1] = w.valid_fraction
    return out


def iter_block_chips(source: ImagerySource, grid: OutputGrid, block: Block,
                     zoom_levels: Sequence[int] | None = None, sat_type: str | None = None,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     min_valid: float = DEFAULT_MIN_VALID,
                     valid_out: dict[int, np.ndarray] | None = None,
                     max_window_px: int = DEFAULT_MAX_WINDOW_PX) -> Iterator[ChipBatch]:
    """Chip batches of one block, zoom by zoom. ``valid_out``, if given, receives
    ``{zoom: valid fraction map [h, w]}`` (NaN outside the region) as each zoom is read."""
    zoom_levels = tuple(grid.zoom_levels if zoom_levels is None else zoom_levels)
    sat = sat_type or grid.sat_type
    _check(zoom_levels, sat, min_valid, batch_size)
    for z in zoom_levels:
        windows = read_chip_windows(source, grid, block, int(z), sat, max_window_px)
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
    plans = {int(z): chip_plan(grid, int(z), sat) for z in zoom_levels}
    tasks = [(b, int(z), sb) for b in grid.blocks(block_size) for z in zoom_levels
             for sb in _sub_blocks(grid, b, plans[int(z)][1], max_window_px)]

    def read(task):
        b, z, sb = task
        return _read_window(source, grid, sb, z, *plans[z])

    bar = tqdm(total=grid.pixel_count * len(zoom_levels), unit="chip", disable=not progress,
               desc="tiling")
    try:
        if not prefetch:
            for task in tasks:
                w = read(task)
                bar.update(int(w.region_mask.sum()))
                yield from w.batches(batch_size, min_valid, task[0])
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="psm-read") as pool:
            fut = pool.submit(read, tasks[0]) if tasks else None
            for k, task in enumerate(tasks):
                w = fut.result()
                fut = pool.submit(read, tasks[k + 1]) if k + 1 < len(tasks) else None
                bar.update(int(w.region_mask.sum()))
                yield from w.batches(batch_size, min_valid, task[0])
    finally:
        bar.close()


def normalize_chips(chips, device=None, dtype=None):
    """uint8 chips [N, 3, H, W] (numpy or torch) -> model input: scaled to [0, 1] and
    normalised with the ImageNet mean/std, computed in float32 on ``device`` (default: where
    the tensor is), then cast to ``dtype`` (default float32)."""
    import torch

    x = torch.as_tensor(chips)
    if x.dtype != torch.uint8:
        raise InputError(f"chips must be uint8, got {x.dtype}: pass the tiler's ChipBatch.chips")
    if x.ndim != 4 or x.shape[1] != 3:
        raise InputError(f"chips must be [N, 3, H, W], got {tuple(x.shape)}")
    if device is not None:
        x = x.to(device, non_blocking=True)
    mean = torch.tensor(constants.IMAGENET_MEAN, dtype=torch.float32, device=x.device)
    std = torch.tensor(constants.IMAGENET_STD, dtype=torch.float32, device=x.device)
    y = (x.to(torch.float32) / 255.0 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    return y if dtype is None or dtype == torch.float32 else y.to(dtype)
