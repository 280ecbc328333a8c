"""Lattice reads: an imagery source read on one global pixel lattice per (CRS, chip resolution).

Lattice pixel ``(m, k)`` of resolution ``r`` covers ``x in [k r, (k + 1) r)`` and
``y in (-(m + 1) r, -m r]``. The source is read in fixed lattice tiles of :data:`READ_TILE`
pixels: the same requests whatever the block size, the region's shape or the run, so a pixel's
chip is bit-identical across all of them. Tiles are cached (LRU by bytes) so neighbouring blocks
share their halos; tiles with failed reads are never cached. :class:`ChipReader` holds one
:class:`LatticeReader` per zoom over one cache. (The whole tiler: :mod:`psm_mapping.tiling`.)
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from . import constants
from .errors import InputError
from .imagery.base import ImagerySource

__all__ = ["LatticeReader", "ChipReader", "READ_TILE", "DEFAULT_CACHE_BYTES", "CHIP", "HALF"]

CHIP = constants.CHIP_SIZE
HALF = CHIP // 2
#: side in lattice pixels of one read (a fixed lattice tile)
READ_TILE = 1024
#: bytes of lattice tiles kept per reader (about 90 tiles of 1024 px)
DEFAULT_CACHE_BYTES = 384 * 2**20


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
