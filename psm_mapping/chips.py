"""Chip cutting: a grid block -> windows assembled from lattice tiles -> 224 x 224 chips.

The chip centred on ``(x, y)`` starts at lattice column ``rint(x / r - 112)`` and row
``rint(-y / r - 112)`` (:func:`chip_origins`). A block's chips are slices of one window (or a few,
under ``max_window_px`` a side) read through a :class:`~psm_mapping.lattice.ChipReader`: no read
and no resampling per chip.

**Validity and faults.** Each chip carries its valid fraction (mean of the source's validity mask
over the chip); below ``min_valid`` the pixel gets no chip and is nodata. A chip that touches a
failed read (``ImageryWindow.fault_mask``) is never embedded, whatever its valid fraction.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import constants
from .errors import InputError
from .grid import Block, OutputGrid
from .imagery.base import ImagerySource
from .lattice import CHIP, HALF, ChipReader

__all__ = [
    "ChipBatch", "ChipWindow", "read_chip_windows", "block_valid_fraction", "block_faults",
    "chip_origins", "chip_plan", "normalize_chips", "DEFAULT_MIN_VALID", "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_WINDOW_PX",
]

DEFAULT_MIN_VALID = constants.DEFAULT_MIN_VALID
DEFAULT_BATCH_SIZE = constants.DEFAULT_BATCH_SIZE
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
    """One window assembled from lattice tiles: ``data`` uint8 [3, H, W] and ``mask`` bool
    [H, W] at ``resolution`` m/px, for grid pixels ``rows`` x ``cols`` (1-D, absolute
    indices); the chip of pixel (i, j) is ``data[:, row_offsets[i]:+224, col_offsets[j]:+224]``.
    ``region_mask`` marks the pixels asked for, ``chip_fault`` those whose chip touches a
    failed read (never embedded)."""

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
    valid_fraction: np.ndarray  # float32 [len(rows), len(cols)], NaN outside region_mask
    lon: np.ndarray  # float64 [len(rows), len(cols)]
    lat: np.ndarray
    chip_fault: np.ndarray  # bool [len(rows), len(cols)]
    #: failed source reads (e.g. tiles) behind this window
    faults: int = 0

    def chip(self, i: int, j: int) -> np.ndarray:
        """The chip of local pixel (i, j), a view [3, 224, 224]."""
        a, b = int(self.row_offsets[i]), int(self.col_offsets[j])
        return self.data[:, a:a + CHIP, b:b + CHIP]

    def keep(self, min_valid: float = DEFAULT_MIN_VALID) -> np.ndarray:
        """Pixels whose chip is embedded: asked for, valid enough, no fault."""
        return self.region_mask & (self.valid_fraction >= min_valid) & ~self.chip_fault

    def batches(self, batch_size: int = DEFAULT_BATCH_SIZE,
                min_valid: float = DEFAULT_MIN_VALID,
                block: Block | None = None) -> Iterator[ChipBatch]:
        """Chips of the kept pixels (:meth:`keep`), in batches."""
        ii, jj = np.nonzero(self.keep(min_valid))
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


def chip_plan(grid: OutputGrid, zoom: int, sat_type: str | None = None) -> tuple[float, float]:
    """(chip resolution m/px, chip step in lattice pixels per grid pixel) at ``zoom``."""
    sat = sat_type or grid.sat_type
    res = constants.chip_resolution_m(sat, zoom)
    return res, grid.stride / res


def chip_origins(grid: OutputGrid, rows: np.ndarray, cols: np.ndarray,
                 res: float) -> tuple[np.ndarray, np.ndarray]:
    """Lattice (row, column) of the top-left pixel of the chips centred on grid ``rows`` and
    ``cols``. Pixel centres are taken from global pixel indices when the grid is aligned to
    multiples of its stride (as :func:`make_grid` makes it), so every grid containing a pixel
    gives that pixel the same chip."""
    t, s = grid.transform, float(grid.stride)
    q = s / res
    gc, gr = t.c / s, -t.f / s
    rows, cols = np.asarray(rows, np.float64), np.asarray(cols, np.float64)
    if abs(gc - round(gc)) < 1e-6 and abs(gr - round(gr)) < 1e-6:
        xr = (round(gc) + cols + 0.5) * q
        yr = (round(gr) + rows + 0.5) * q
    else:  # a grid off the stride lattice: centres from its own transform
        xr = (t.c + (cols + 0.5) * s) / res
        yr = -(t.f - (rows + 0.5) * s) / res
    return np.rint(yr - HALF).astype(np.int64), np.rint(xr - HALF).astype(np.int64)


@dataclass(frozen=True)
class _SubBlock:
    row_off: int
    col_off: int
    height: int
    width: int


def _sub_blocks(need: np.ndarray, block: Block, step: float, max_window_px: int):
    """Split ``block`` (cropped to the pixels of ``need`` [h, w]) so windows stay under
    ``max_window_px`` pixels a side."""
    rows = np.nonzero(need.any(axis=1))[0]
    cols = np.nonzero(need.any(axis=0))[0]
    if len(rows) == 0:
        return
    r0, r1 = rows[0], rows[-1] + 1
    c0, c1 = cols[0], cols[-1] + 1
    k = max(1, int(math.floor((max_window_px - CHIP) / step)) + 1) if step > 0 else 1 << 30
    for r in range(r0, r1, k):
        for c in range(c0, c1, k):
            h, w = min(k, r1 - r), min(k, c1 - c)
            if need[r:r + h, c:c + w].any():
                yield _SubBlock(block.row_off + r, block.col_off + c, h, w)


def _tiles_touched(origins: np.ndarray, T: int) -> list[int]:
    """Lattice tile indices touched by chips starting at ``origins``."""
    out: set[int] = set()
    for o in np.unique(origins):
        out.update(range(int(o) // T, (int(o) + CHIP - 1) // T + 1))
    return sorted(out)


def _chip_counts(m: np.ndarray, ro: np.ndarray, co: np.ndarray) -> np.ndarray:
    """Count of True pixels of ``m`` [H, W] in every chip (summed-area table, O(1) each)."""
    H, W = m.shape
    sat = np.zeros((H + 1, W + 1), dtype=np.int32)  # < 2**31 for any window
    np.cumsum(np.cumsum(m, axis=0, dtype=np.int32), axis=1, out=sat[1:, 1:])
    a, b = ro[:, None], co[None, :]
    return sat[a + CHIP, b + CHIP] - sat[a, b + CHIP] - sat[a + CHIP, b] + sat[a, b]


def _read_window(reader: ChipReader, grid: OutputGrid, sb: _SubBlock, zoom: int,
                 need: np.ndarray) -> ChipWindow:
    lat = reader.lattice(zoom)
    res = lat.res
    rows = np.arange(sb.row_off, sb.row_off + sb.height)
    cols = np.arange(sb.col_off, sb.col_off + sb.width)
    m0, k0 = chip_origins(grid, rows, cols, res)
    rw0, cw0 = int(m0.min()), int(k0.min())
    height, width = int(m0.max()) - rw0 + CHIP, int(k0.max()) - cw0 + CHIP
    row_tiles = _tiles_touched(m0[need.any(axis=1)], lat.tile_px)
    col_tiles = _tiles_touched(k0[need.any(axis=0)], lat.tile_px)
    data, mask, fault, faults = lat.read(rw0, cw0, height, width, row_tiles, col_tiles)
    ro, co = m0 - rw0, k0 - cw0
    if mask.all():
        vf = np.ones((sb.height, sb.width), dtype=np.float32)
    else:
        vf = (_chip_counts(mask, ro, co) / float(CHIP * CHIP)).astype(np.float32)
    vf[~need] = np.nan
    chip_fault = (_chip_counts(fault, ro, co) > 0) & need if fault is not None else \
        np.zeros(need.shape, bool)
    left, top = cw0 * res, -rw0 * res
    bounds = (left, top - height * res, left + width * res, top)
    lon, lat_ = grid.pixel_lonlat(sb)
    return ChipWindow(zoom=zoom, resolution=res, bounds=bounds, data=data, mask=mask,
                      rows=rows, cols=cols, row_offsets=ro, col_offsets=co,
                      region_mask=need.copy(), valid_fraction=vf, lon=lon, lat=lat_,
                      chip_fault=chip_fault, faults=faults)


def read_chip_windows(source: ImagerySource | ChipReader, grid: OutputGrid, block: Block,
                      zoom: int, sat_type: str | None = None,
                      max_window_px: int = DEFAULT_MAX_WINDOW_PX,
                      need: np.ndarray | None = None) -> list[ChipWindow]:
    """The windows (usually one) holding the chips of ``block`` at ``zoom``: of every region
    pixel, or of the pixels of ``need`` (bool [block.height, block.width]). ``source`` is an
    imagery source or a :class:`ChipReader` (pass one reader for all blocks of a run: they
    share its tile cache)."""
    reader = source if isinstance(source, ChipReader) else \
        ChipReader(source, grid.crs, sat_type or grid.sat_type)
    if need is None:
        need = grid.mask[block.slices]
    res, step = chip_plan(grid, zoom, reader.sat_type)
    return [_read_window(reader, grid, sb, int(zoom),
                         need[sb.row_off - block.row_off:sb.row_off - block.row_off + sb.height,
                              sb.col_off - block.col_off:sb.col_off - block.col_off + sb.width])
            for sb in _sub_blocks(need, block, step, max_window_px)]


def _paste(block: Block, windows: Sequence[ChipWindow], attr: str, fill, dtype) -> np.ndarray:
    out = np.full((block.height, block.width), fill, dtype=dtype)
    for w in windows:
        r, c = w.rows - block.row_off, w.cols - block.col_off
        sl = (slice(r[0], r[-1] + 1), slice(c[0], c[-1] + 1))
        m = w.region_mask
        out[sl][m] = getattr(w, attr)[m]
    return out


def block_valid_fraction(block: Block, windows: Sequence[ChipWindow]) -> np.ndarray:
    """Valid fraction map float32 [block.height, block.width], NaN where not asked for."""
    return _paste(block, windows, "valid_fraction", np.nan, np.float32)


def block_faults(block: Block, windows: Sequence[ChipWindow]) -> np.ndarray:
    """bool [block.height, block.width]: pixels whose chip touches a failed read."""
    return _paste(block, windows, "chip_fault", False, bool)


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
