"""Level cells for the explorer: the store's levels read in cached chunks, tiles cut from them,
colour ranges from a coarse level (:class:`LevelCells`, a part of
:class:`~psm_mapping.serve.engine.Explorer`).

A tile reads the store level whose cell is the largest not coarser than the tile's pixel
(rio-tiler's overview choice, :func:`psm_mapping.engine.level_for_pixel_size`), over the tile's
window only. A level's cells are computed in chunks of 64 to 128 cells a side (their
similarity from the cells' averaged mean and var_sum, which is the average of the
full-resolution similarities under each cell), kept in a byte-bounded cache, and reprojected
onto the tile with rasterio. A query's colour range is the min/max over a coarse level (at most
:data:`RANGE_CELLS` cells a side): cheap and the same for every tile; level averages narrow the
extremes a little on large stores, and a store that small is read at full resolution.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from .requests import MEAN, QuerySpec
from .tiles import tile_target, warp_to_tile

#: level cells per side of one cached chunk of similarity (or uncertainty) values: at least
#: CHUNK, and the store's chunks of that level (its blocks' cells) up to MAX_CHUNK, so that a
#: store chunk is decoded once, not once per explorer chunk
CHUNK, MAX_CHUNK = 64, 128
#: the colour range's level: the finest with at most this many cells a side
RANGE_CELLS = 128
#: chunks computed at once (each holds its cells' means while it runs: bounds transient memory)
COMPUTE_SLOTS = 2


class LevelCells:
    """Level cells, tiles and ranges of an :class:`~psm_mapping.serve.engine.Explorer` (which
    provides ``store``, ``crs``, ``transform``, ``merc_bounds``, ``zoom_levels``, the caches
    ``chunks``/``once``, ``jobs``, ``_slots``, ``ranges``, ``audio_name`` and the query methods)."""

    def _grid(self, zi: int, level: int) -> tuple[int, int, int]:
        """(cell size in output pixels, rows, columns) of zoom ``zi``'s grid at ``level``."""
        g = self.store.zoom_group(zi)
        return g.factor << level, -(-g.height // (1 << level)), -(-g.width // (1 << level))

    def _plane(self, q: QuerySpec, zi: int, level: int, ci: int, cj: int) -> "_Cells":
        """The store's cells (means, var_sum, uncertainty, ok) of chunk ``(ci, cj)`` of zoom
        ``zi``'s level ``level`` with ``q``'s month/hour, cached: a new query over the cells seen
        last (the same view, another sound) reads nothing from the store."""
        from ..engine import Window, read_plane

        def compute():
            spec = self.store.spec
            cell = self._grid(zi, level)[0]
            n = self.chunk_side(level)
            r0, c0 = ci * n * cell, cj * n * cell
            w = Window(r0, c0, min(spec.height, r0 + n * cell) - r0, min(spec.width, c0 + n * cell) - c0)
            jid = self.jobs.start(f"{'re-fused ' if self.needs_refusion(q) else ''}zoom {self.zoom_levels[zi]} "
                                  f"level {level} cells")
            try:
                with self._slots:
                    p = read_plane(self.store, zi, w, level, refusion=self.refusion(q))
            finally:
                self.jobs.end(jid)
            unc = np.where(p.ok, p.uncertainty, np.float32(np.nan)).astype(np.float32)
            return _Cells(p.mean, np.asarray(p.var_sum, np.float32), unc, np.asarray(p.ok, bool))

        return self.once.get_or_compute(self.planes, ("plane", q.md_key, zi, level, ci, cj), compute)

    def _chunk(self, q: QuerySpec, zi: int, level: int, ci: int, cj: int, band: str) -> np.ndarray:
        """float32 values (similarity or uncertainty; NaN: nothing computed) of level cells
        ``ci*n ..`` x ``cj*n ..`` of zoom ``zi`` (``n``: :meth:`chunk_side`), cached."""
        from ..engine import similarity

        if band == "uncertainty":
            return self._plane(q, zi, level, ci, cj).uncertainty

        def compute():
            matrix = self.embedding(q)[1]
            c = self._plane(q, zi, level, ci, cj)
            s = similarity(c.mean, c.var_sum, matrix)[0].astype(np.float32, copy=False)
            s[~c.ok] = np.nan
            return s

        key = ("similarity", q.query_key, q.md_key, zi, level, ci, cj)
        return self.once.get_or_compute(self.chunks, key, compute)

    def chunk_side(self, level: int) -> int:
        """Level cells per side of one cached chunk at ``level``."""
        return max(CHUNK, min(MAX_CHUNK, self.store.spec.block_size >> level))

    def cells(self, q: QuerySpec, zi: int, level: int, rows: slice | None = None, cols: slice | None = None,
              band: str = "similarity") -> np.ndarray:
        """float32 ``[rows, cols]`` values of zoom ``zi``'s level-``level`` cells (default: all)."""
        _, hk, wk = self._grid(zi, level)
        rows, cols = rows or slice(0, hk), cols or slice(0, wk)
        out = np.full((rows.stop - rows.start, cols.stop - cols.start), np.nan, np.float32)
        kind = "uncertainty" if band == "uncertainty" else "similarity"
        n = self.chunk_side(level)
        ids = [(ci, cj) for ci in range(rows.start // n, (rows.stop - 1) // n + 1)
               for cj in range(cols.start // n, (cols.stop - 1) // n + 1)]
        if len(ids) > 1:  # chunks not cached yet compute side by side (COMPUTE_SLOTS at a time)
            chunks = list(_pool().map(lambda ij: self._chunk(q, zi, level, *ij, kind), ids))
        else:
            chunks = [self._chunk(q, zi, level, *ids[0], kind)]
        for (ci, cj), ch in zip(ids, chunks):
            a0, b0 = ci * n, cj * n
            r = slice(max(rows.start, a0), min(rows.stop, a0 + ch.shape[0]))
            c = slice(max(cols.start, b0), min(cols.stop, b0 + ch.shape[1]))
            out[r.start - rows.start:r.stop - rows.start, c.start - cols.start:c.stop - cols.start] = \
                ch[r.start - a0:r.stop - a0, c.start - b0:c.stop - b0]
        return out

    def cell_transform(self, zi: int, level: int, row: int = 0, col: int = 0):
        """The affine transform of zoom ``zi``'s level-``level`` cells from cell ``(row, col)``."""
        from affine import Affine

        cell = self._grid(zi, level)[0]
        return self.transform @ Affine.translation(col * cell, row * cell) @ Affine.scale(cell)

    # ------------------------------------------------------------------ ranges and tiles
    def range_level(self, zi: int) -> int:
        """The finest level of zoom ``zi`` with at most :data:`RANGE_CELLS` cells a side."""
        level = 0
        while max(self._grid(zi, level)[1:]) > RANGE_CELLS:
            level += 1
        return level

    def value_range(self, q: QuerySpec, zi: int | str, band: str = "similarity") -> tuple[float | None, float | None]:
        """(min, max) of ``q``'s values at zoom ``zi`` (or the mean over zooms) on a coarse level."""
        kind = "uncertainty" if band == "uncertainty" else "similarity"
        key = (kind, None if kind == "uncertainty" else q.query_key, q.md_key, zi)
        got = self.ranges.get(key)
        if got is not None:
            return got["min"], got["max"]
        if zi == MEAN:
            v = self._mean_of_zooms(q, kind)
        else:
            v = self.cells(q, zi, self.range_level(zi), band=kind)
        fin = v[np.isfinite(v)]
        lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (None, None)
        label = q.text or ""
        if q.audio:
            label = (label + " + " if label else "") + self.audio_name(q.audio)
        with self._ranges_lock:  # request threads read and add ranges at once
            self.ranges[key] = {"query": label, "band": kind, "month": q.month, "hour": q.hour,
                                "zoom_level": MEAN if zi == MEAN else self.zoom_levels[zi], "min": lo, "max": hi}
            while len(self.ranges) > 200:
                self.ranges.pop(next(iter(self.ranges)))
        return lo, hi

    def _mean_of_zooms(self, q: QuerySpec, kind: str) -> np.ndarray:
        """The mean over zooms on one coarse output-level grid (each zoom's range level averaged onto it)."""
        from rasterio.enums import Resampling
        from rasterio.warp import reproject

        spec = self.store.spec
        k = 0
        while max(-(-spec.height // (1 << k)), -(-spec.width // (1 << k))) > RANGE_CELLS:
            k += 1
        h, w = -(-spec.height // (1 << k)), -(-spec.width // (1 << k))
        dst_t = type(self.transform)(self.transform.a * (1 << k), 0, self.transform.c, 0,
                                     self.transform.e * (1 << k), self.transform.f)
        stack = []
        for zi in range(len(self.zoom_levels)):
            lv = self.range_level(zi)
            out = np.full((h, w), np.nan, np.float32)
            reproject(self.cells(q, zi, lv, band=kind), out, src_transform=self.cell_transform(zi, lv),
                      src_crs=self.crs, src_nodata=np.nan, dst_transform=dst_t, dst_crs=self.crs,
                      dst_nodata=np.nan, resampling=Resampling.average, num_threads=1)
            stack.append(out)
        return np.nanmean(np.stack(stack), axis=0)

    def tile_values(self, q: QuerySpec, zi: int | str, band: str, z: int, x: int, y: int,
                    resampling: str = "nearest") -> np.ndarray | None:
        """float32 ``[256, 256]`` of tile ``z/x/y`` (similarity or uncertainty; NaN: no data), read
        at the level matching the tile's pixel; None when the tile shows nothing."""
        from ..engine import level_for_pixel_size

        kind = "uncertainty" if band == "uncertainty" else "similarity"
        if zi == MEAN:
            tiles = [self.tile_values(q, k, kind, z, x, y, resampling) for k in range(len(self.zoom_levels))]
            tiles = [t for t in tiles if t is not None]
            if not tiles:
                return None
            return np.nanmean(np.stack(tiles), axis=0).astype(np.float32)
        spec = self.store.spec
        t = tile_target(z, x, y, self.crs, self.transform, spec.height, spec.width, self.merc_bounds)
        if t is None:
            return None
        level = level_for_pixel_size(self.store, zi, t.pixel_size)
        cell, hk, wk = self._grid(zi, level)
        rows = slice(t.rows.start // cell, min(hk, -(-t.rows.stop // cell)))
        cols = slice(t.cols.start // cell, min(wk, -(-t.cols.stop // cell)))
        vals = self.cells(q, zi, level, rows, cols, kind)
        if not np.isfinite(vals).any():
            return None
        out = warp_to_tile(vals, self.cell_transform(zi, level, rows.start, cols.start), self.crs, z, x, y,
                           resampling)
        return out if np.isfinite(out).any() else None

    def tile_and_range(self, q: QuerySpec, zi: int | str, band: str, z: int, x: int, y: int,
                       resampling: str = "nearest", need_range: bool = True):
        """``(tile values or None, (lo, hi))``: a new query's colour range is computed beside the
        tile's cells (``need_range=False``: ``(None, None)``, e.g. a float tile of similarity)."""
        if not need_range:
            return self.tile_values(q, zi, band, z, x, y, resampling), (None, None)
        fut = _pool("ranges").submit(self.value_range, q, zi, band)
        values = self.tile_values(q, zi, band, z, x, y, resampling)
        return values, fut.result()

    def to_score(self, values, lo: float | None, hi: float | None):
        """Values rescaled 0..1 over ``lo..hi`` (float32, as ``psm-map query --score``)."""
        if lo is None:
            return None if np.ndim(values) == 0 else np.full_like(values, np.nan)
        lo32, hi32 = np.float32(lo), np.float32(hi)
        v = np.asarray(values, np.float32) - lo32
        return v / (hi32 - lo32) if hi32 > lo32 else v

    def footprint(self) -> dict:
        """The store's valid area (cells with an embedding at the first zoom, at a level of at most
        1024 cells a side, clipped to the store) in lon/lat GeoJSON."""
        import rasterio.features
        from shapely.geometry import box, mapping, shape
        from shapely.ops import transform as shp_transform, unary_union

        from ..engine import read_plane

        level = 0
        while max(self._grid(0, level)[1:]) > 1024:
            level += 1
        ok = read_plane(self.store, 0, None, level, with_mean=False).count > 0
        t = self.cell_transform(0, level)
        geoms = [shape(g) for g, v in rasterio.features.shapes(ok.astype(np.uint8), mask=ok, transform=t) if v == 1]
        feats = []
        if geoms:
            g = unary_union(geoms).intersection(box(*self.bounds)).simplify(abs(t.a) * 0.5)
            g = shp_transform(lambda x, y: self.to_lonlat.transform(x, y), g.segmentize(abs(t.a) * 16))
            feats.append({"type": "Feature", "properties": {"name": "store footprint"}, "geometry": mapping(g)})
        return {"type": "FeatureCollection", "features": feats}


@dataclass
class _Cells:
    """One chunk of level cells as the store holds them (``mean`` float16 at level 0, float32
    averages above; NaN where nothing was computed)."""

    mean: np.ndarray
    var_sum: np.ndarray
    uncertainty: np.ndarray
    ok: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.mean.nbytes + self.var_sum.nbytes + self.uncertainty.nbytes + self.ok.nbytes)


_POOLS: dict = {}
_POOL_LOCK = threading.Lock()


def _pool(name: str = "chunks"):
    """Threads shared by all requests: ``chunks`` compute a request's chunks side by side;
    ``ranges`` compute a new query's colour range beside its first tile (their own pool: a range
    submits chunks, and a pool never waits on its own tasks)."""
    with _POOL_LOCK:
        if name not in _POOLS:
            from concurrent.futures import ThreadPoolExecutor

            _POOLS[name] = ThreadPoolExecutor(COMPUTE_SLOTS * 2, thread_name_prefix=f"psm-{name}")
        return _POOLS[name]
