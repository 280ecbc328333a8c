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

import math
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from . import constants
from .errors import InputError
from .grid import DEFAULT_BLOCK_SIZE, Block, OutputGrid
from .imagery.base import ImagerySource

__all__ = [
    "ChipBatch", "ChipWindow", "ChipReader", "LatticeReader", "read_chip_windows",
    "block_valid_fraction", "block_faults", "chip_origins", "iter_block_chips", "iter_chips",
    "normalize_chips", "chip_plan", "DEFAULT_MIN_VALID", "DEFAULT_BATCH_SIZE",
    "DEFAULT_MAX_WINDOW_PX", "READ_TILE",
]

CHIP = constants.CHIP_SIZE
HALF = CHIP // 2
DEFAULT_MIN_VALID = constants.DEFAULT_MIN_VALID
DEFAULT_BATCH_SIZE = constants.DEFAULT_BATCH_SIZE
DEFAULT_MAX_WINDOW_PX = 4096
#: side in lattice pixels of one read (a fixed lattice tile)
READ_TILE = 1024
#: bytes of lattice tiles kept per reader (about 90 tiles of 1024 px)
DEFAULT_CACHE_BYTES = 384 * 2**20


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


# --------------------------------------------------------------------------- lattice reads
@dataclass
class _Tile:
    data: np.ndarray  # uint8 [3, T, T]
    mask: np.ndarray  # bool [T, T]
    fault: np.ndarray | None  # bool [T, T], None when nothing failed
    faults: int


class _InFlight:
    def __init__(self):
        self.done = threading.Event()
        self.value = None


class _LRU:
    """Lattice tiles by key, evicted least recently used past ``max_bytes`` (thread-safe)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes = int(max_bytes), 0
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        #: keys being read now -> a holder whose ``done`` event is set with ``value`` (parallel
        #: readers of neighbouring blocks wait for one read of a shared halo tile, not read it twice)
        self.inflight: dict = {}

    def claim(self, key):
        """``(holder, True)`` for the thread that must read ``key``, ``(holder, False)`` for one
        that should wait on ``holder.done`` (another thread is reading it)."""
        with self._lock:
            h = self.inflight.get(key)
            if h is not None:
                return h, False
            h = _InFlight()
            self.inflight[key] = h
            return h, True

    def release(self, key, holder, value) -> None:
        holder.value = value
        with self._lock:
            self.inflight.pop(key, None)
        holder.done.set()

    def get(self, key):
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
            return t

    def put(self, key, tile: _Tile) -> None:
        size = tile.data.nbytes + tile.mask.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = tile
            self.nbytes += size
            while self.nbytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self.nbytes -= old.data.nbytes + old.mask.nbytes


class LatticeReader:
    """Reads ``source`` on the lattice of one CRS and resolution, in fixed tiles of ``tile`` px.

    A tile's request depends only on its index, so every read of a lattice pixel gives the same
    bytes. Tiles with failed reads are not cached: the next read retries them."""

    def __init__(self, source: ImagerySource, crs, res: float, tile: int = READ_TILE,
                 cache: _LRU | None = None):
        self.source, self.crs, self.res, self.tile_px = source, crs, float(res), int(tile)
        self.cache = cache if cache is not None else _LRU(DEFAULT_CACHE_BYTES)
        self.reads = 0

    def tile(self, ti: int, tj: int) -> _Tile:
        key = (self.res, ti, tj)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        holder, mine = self.cache.claim(key)
        if not mine:  # another reader thread is reading this tile: use its result
            holder.done.wait()
            if holder.value is not None:
                return holder.value
            return self.tile(ti, tj)  # its read raised: try ourselves
        t = self.cache.get(key)  # read and released between our miss and our claim
        try:
            if t is None:
                t = self._read_tile(key, ti, tj)
        finally:
            self.cache.release(key, holder, t)
        return t

    def _read_tile(self, key, ti: int, tj: int) -> _Tile:
        T, r = self.tile_px, self.res
        bounds = ((tj * T) * r, -((ti + 1) * T) * r, ((tj + 1) * T) * r, -(ti * T) * r)
        win = self.source.read(bounds, self.crs, (T, T))
        self.reads += 1
        fault = getattr(win, "fault_mask", None)
        if fault is not None:
            fault = np.asarray(fault, dtype=bool)
            if not fault.any():
                fault = None
        t = _Tile(np.asarray(win.data, np.uint8), np.asarray(win.mask, bool), fault,
                  int(getattr(win, "faults", 0)))
        if fault is None and t.faults == 0:
            self.cache.put(key, t)
        return t

    def read(self, r0: int, c0: int, h: int, w: int, row_tiles: Sequence[int] | None = None,
             col_tiles: Sequence[int] | None = None):
        """Lattice rows ``r0..r0+h`` x columns ``c0..c0+w`` as ``(data, mask, fault, faults)``;
        only the tiles in ``row_tiles`` x ``col_tiles`` (default: all) are read, the rest of
        the window stays masked. ``fault`` is None when no read failed."""
        T = self.tile_px
        tis = range(r0 // T, (r0 + h - 1) // T + 1) if row_tiles is None else row_tiles
        tjs = range(c0 // T, (c0 + w - 1) // T + 1) if col_tiles is None else col_tiles
        data = np.zeros((3, h, w), np.uint8)
        mask = np.zeros((h, w), bool)
        fault = None
        faults = 0
        for ti in tis:
            a0, a1 = max(r0, ti * T), min(r0 + h, (ti + 1) * T)
            if a1 <= a0:
                continue
            for tj in tjs:
                b0, b1 = max(c0, tj * T), min(c0 + w, (tj + 1) * T)
                if b1 <= b0:
                    continue
                t = self.tile(ti, tj)
                dst = (slice(a0 - r0, a1 - r0), slice(b0 - c0, b1 - c0))
                src = (slice(a0 - ti * T, a1 - ti * T), slice(b0 - tj * T, b1 - tj * T))
                data[(slice(None), *dst)] = t.data[(slice(None), *src)]
                mask[dst] = t.mask[src]
                faults += t.faults
                if t.fault is not None:
                    if fault is None:
                        fault = np.zeros((h, w), bool)
                    fault[dst] = t.fault[src]
        return data, mask, fault, faults


class ChipReader:
    """Chips of one source in one CRS: a :class:`LatticeReader` per chip resolution, one tile
    cache for all. Keep one per run (and per dask worker) so blocks share their halos."""

    def __init__(self, source: ImagerySource, crs, sat_type: str, tile: int = READ_TILE,
                 max_cache_bytes: int = DEFAULT_CACHE_BYTES):
        if sat_type not in constants.GSD:
            raise InputError(f"unknown sat type {sat_type!r}: use one of {', '.join(constants.GSD)}")
        self.source, self.crs, self.sat_type, self.tile_px = source, crs, sat_type, int(tile)
        self.cache = _LRU(max_cache_bytes)
        self._lattices: dict[int, LatticeReader] = {}

    def lattice(self, zoom: int) -> LatticeReader:
        z = int(zoom)
        if z not in self._lattices:
            self._lattices[z] = LatticeReader(self.source, self.crs,
                                              constants.chip_resolution_m(self.sat_type, z),
                                              self.tile_px, self.cache)
        return self._lattices[z]

    @property
    def reads(self) -> int:
        return sum(lat.reads for lat in self._lattices.values())

    def chips_at(self, x: np.ndarray, y: np.ndarray, zoom: int):
        """Chips centred on points ``(x, y)`` of the reader's CRS (the map grid's rule:
        pixel centres give the map's chips): ``(chips uint8 [N, 3, 224, 224], valid fraction
        float32 [N], fault bool [N])``."""
        lat = self.lattice(zoom)
        x, y = np.atleast_1d(np.asarray(x, np.float64)), np.atleast_1d(np.asarray(y, np.float64))
        k0 = np.rint(x / lat.res - HALF).astype(np.int64)
        m0 = np.rint(-y / lat.res - HALF).astype(np.int64)
        chips = np.zeros((len(x), 3, CHIP, CHIP), np.uint8)
        valid = np.zeros(len(x), np.float32)
        fault = np.zeros(len(x), bool)
        for n in range(len(x)):
            data, mask, f, _ = lat.read(int(m0[n]), int(k0[n]), CHIP, CHIP)
            chips[n], valid[n] = data, mask.mean()
            fault[n] = f is not None and bool(f.any())
        return chips, valid, fault


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


def _check(zoom_levels, sat_type, min_valid, batch_size):
    if sat_type not in constants.GSD:
        raise InputError(f"unknown sat type {sat_type!r}: use one of {', '.join(constants.GSD)}")
    from .config import check_count, check_fraction, check_zoom_levels

    check_zoom_levels(zoom_levels, upper=None)
    check_fraction("min_valid", min_valid)
    check_count("batch_size", batch_size)


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
