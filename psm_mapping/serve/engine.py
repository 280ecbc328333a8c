"""The explorer's engine: one store session (:func:`psm_mapping.session.open_session`), answers
read window by window through :mod:`psm_mapping.engine`, byte-bounded caches; no HTTP here.

* A tile reads the store level whose cell is the largest not coarser than the tile's pixel
  (rio-tiler's overview choice), over the tile's window only: the level's cells are computed in
  chunks of :data:`CHUNK` x :data:`CHUNK` cells (similarity from the cells' averaged mean and
  var_sum: the average of the full-resolution similarities under each cell), cached, and
  reprojected onto the tile (:func:`~psm_mapping.serve.tiles.warp_to_tile`).
* A query's colour range comes from a coarse level (at most :data:`RANGE_CELLS` cells a side):
  cheap, and the same for every tile. Level averages narrow the extremes a little on large
  stores; a store that small is read at full resolution (the range is then the map's own).
* Points read their pixel at full resolution, exports stream the map: both equal ``psm-map query``.
* A month/hour other than the store's re-runs fusion from ``z_img``: exact at full resolution,
  an approximation at coarse levels (fusion of the cell's averaged ``z_img``); the summary says so.

Nothing here holds a whole-store array: memory is the model plus the caches (``memory_limit``
minus what the process holds after loading, see :meth:`Explorer.__init__`) plus at most
:data:`COMPUTE_SLOTS` chunks being computed.
"""
from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import AudioError, InputError
from .cache import ByteLRU, Once
from .requests import BANDS, MEAN, Jobs, QuerySpec, RequestError, whole, zoom_index
from .tiles import TILE_SIZE, tile_target, warp_to_tile

log = logging.getLogger(__name__)

__all__ = ["Explorer", "QuerySpec", "RequestError", "BANDS", "MEAN"]
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus")
#: level cells per side of one cached chunk of similarity (or uncertainty) values
CHUNK = 64
#: the colour range's level: the finest with at most this many cells a side
RANGE_CELLS = 128
#: chunks computed at once (each holds its cells' means while it runs: bounds transient memory)
COMPUTE_SLOTS = 2


def process_rss() -> int:
    """This process's resident memory in bytes (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource
        import sys

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


class Explorer:
    """A store opened for answering; tiles, points, ranges and exports from caches.

    ``memory_limit`` (bytes): the server's memory target. The caches (similarity chunks, rendered
    tiles, query embeddings) share what is left of it after the model is loaded, less a reserve
    for the chunks being computed (at least 64 MB in all)."""

    def __init__(self, store_url: str, checkpoint: str | None = None, clap_config: str | None = None,
                 tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
                 memory_limit: float = 1.5e9, max_upload_bytes: int = 20 << 20,
                 storage_options: dict | None = None, preload: bool = True):
        from affine import Affine
        from pyproj import CRS, Transformer

        from ..outputs.results import lonlat_bounds
        from ..session import open_session

        t0 = time.perf_counter()
        self.store_url = str(store_url)
        self.session = open_session(self.store_url, checkpoint, encoders=("text", "audio"), clap_config=clap_config,
                                    tokenizer=tokenizer, device=device, dtype=dtype,
                                    storage_options=storage_options)
        self.store, self.model = self.session.store, self.session.model
        self.checkpoint, self.checkpoint_sha256 = self.session.checkpoint, self.session.checkpoint_sha256
        self.tokenizer = self.session.tokenizer
        spec = self.store.spec
        self.zoom_levels = tuple(int(z) for z in spec.zoom_levels)
        self.stored_md = self.session.stored_metadata
        self.metadata_adjustable = bool(self.model.config.uses_metadata)
        self.max_upload_bytes = int(max_upload_bytes)
        self.crs = CRS.from_wkt(spec.crs_wkt)
        self.transform = Affine(*spec.transform[:6])
        self.to_store = Transformer.from_crs("EPSG:4326", self.crs, always_xy=True)
        self.to_lonlat = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True)
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((0, 0), (spec.width, spec.height))))
        self.bounds = (min(xs), min(ys), max(xs), max(ys))
        self.lonlat_bounds = lonlat_bounds(self.crs, self.bounds)
        self.merc_bounds = Transformer.from_crs(self.crs, "EPSG:3857", always_xy=True).transform_bounds(
            *self.bounds, densify_pts=21)
        # memory: what the process holds now (interpreter, libraries, model) + caches + computing
        self.memory_limit = int(memory_limit)
        self.baseline_rss = process_rss()
        reserve = COMPUTE_SLOTS * CHUNK * CHUNK * (spec.fc_dim * 4 * 3 + 64)
        budget = max(64 << 20, self.memory_limit - self.baseline_rss - reserve)
        self.cache_budget = int(budget)
        self.chunks = ByteLRU(int(budget * 0.8), "similarity chunks")
        self.tiles = ByteLRU(int(budget * 0.15), "tiles")
        self.embeddings = ByteLRU(max(8 << 20, int(budget * 0.05)), "query embeddings")
        self.once = Once()
        self.jobs = Jobs()
        self._slots = threading.BoundedSemaphore(COMPUTE_SLOTS)
        self._model_lock = threading.Lock()
        self._refusions: dict[tuple, Any] = {}
        self._audio: dict[str, tuple[Path, str]] = {}
        self._audio_dir = Path(tempfile.mkdtemp(prefix="psm-serve-audio-"))
        self.ranges: dict[tuple, dict] = {}
        self._valid = [self._valid_pixels(zi) for zi in range(len(self.zoom_levels))] if preload else None
        if preload:  # the tiler's first use (imports, GDAL's projection set-up) before the first request
            warp_to_tile(np.zeros((2, 2), np.float32), self.transform, self.crs, 0, 0, 0)
        self.load_seconds = time.perf_counter() - t0

    def close(self) -> None:
        shutil.rmtree(self._audio_dir, ignore_errors=True)

    # ------------------------------------------------------------------ validation
    def zoom_index(self, zoom_level) -> int | str:
        return zoom_index(self.zoom_levels, zoom_level)

    def query_spec(self, text=None, audio=None, month=None, hour=None, need_query: bool = True) -> QuerySpec:
        text = None if text is None or not str(text).strip() else " ".join(str(text).split())
        if text is not None and len(text) > 1000:
            raise RequestError("text is longer than 1000 characters: give a shorter query")
        audio = None if audio is None or not str(audio).strip() else str(audio).strip()
        if audio is not None and audio not in self._audio:
            raise RequestError(f"unknown audio id {audio!r}: upload the clip with POST /api/audio and "
                               "pass the id it returns", 404)
        if need_query and text is None and audio is None:
            raise RequestError("no query given: pass text=WORDS and/or audio=ID (from POST /api/audio)")
        m, h = whole("month", month, 1, 12), whole("hour", hour, 0, 23)
        if (m is not None or h is not None) and not self.metadata_adjustable:
            raise RequestError(f"the checkpoint {self.checkpoint.name} has no metadata fusion: month and "
                               "hour cannot change its maps; drop month= and hour=")
        return QuerySpec(text, audio, m, h)

    # ------------------------------------------------------------------ metadata
    def metadata(self, q: QuerySpec):
        from ..embed import MetadataOptions

        return MetadataOptions(q.month, q.hour)

    def needs_refusion(self, q: QuerySpec) -> bool:
        return self.session.needs_refusion(self.metadata(q))

    def refusion(self, q: QuerySpec):
        """The fusion re-run for ``q``'s month/hour (None: the stored means answer it)."""
        if not self.needs_refusion(q):
            return None
        r = self._refusions.get(q.md_key)
        if r is None:
            r = self._refusions.setdefault(q.md_key, self.session.refusion(self.metadata(q)))
        return r

    # ------------------------------------------------------------------ queries
    def add_audio(self, data: bytes, filename: str | None) -> str:
        """Keep an uploaded clip (checked to decode and embed); its id for ``audio=``."""
        from ..model.clap import load_audio

        if len(data) > self.max_upload_bytes:
            raise RequestError(f"the upload is {len(data):,} bytes, over the limit of "
                               f"{self.max_upload_bytes:,}: send a shorter clip", 413)
        if not data:
            raise RequestError("the upload is empty: send an audio file (wav, flac, ogg, mp3)", 400)
        aid = hashlib.sha256(data).hexdigest()[:16]
        if aid in self._audio:
            return aid
        name = Path(str(filename or "clip")).name[:120] or "clip"
        suffix = Path(name).suffix.lower()
        path = self._audio_dir / (aid + (suffix if suffix in AUDIO_SUFFIXES else ""))
        path.write_bytes(data)
        try:
            load_audio(path)
        except (AudioError, InputError) as exc:
            path.unlink(missing_ok=True)
            raise RequestError(f"{name} is not an audio clip that can be read ({exc}): send a wav, "
                               "flac, ogg or mp3 file", 415) from None
        except Exception as exc:  # decoders raise their own errors on non-audio bytes
            path.unlink(missing_ok=True)
            raise RequestError(f"{name} is not an audio clip that can be read ({type(exc).__name__}): "
                               "send a wav, flac, ogg or mp3 file", 415) from None
        self._audio[aid] = (path, name)
        try:
            self.embedding(QuerySpec(audio=aid))
        except Exception:
            self._audio.pop(aid, None)
            path.unlink(missing_ok=True)
            raise
        return aid

    def embedding(self, q: QuerySpec):
        """``(query, QueryMatrix)`` of ``q``'s text/audio, cached (month/hour enter the image side only)."""

        def compute():
            texts = [q.text] if q.text else []
            audio = [self._audio[q.audio][0]] if q.audio else []
            with self._model_lock:
                query = self.session.queries(texts, audio, combine=True)[0]
            if q.audio:
                label = self._audio[q.audio][1]
                query.label = f"{q.text} + {label}" if q.text else label
            return _Embedded(query, self.session.query_matrix([query]))

        e = self.once.get_or_compute(self.embeddings, ("embedding", q.query_key), compute)
        return e.query, e.matrix

    # ------------------------------------------------------------------ level cells, in cached chunks
    def _grid(self, zi: int, level: int) -> tuple[int, int, int]:
        """(cell size in output pixels, rows, columns) of zoom ``zi``'s grid at ``level``."""
        g = self.store.zoom_group(zi)
        return g.factor << level, -(-g.height // (1 << level)), -(-g.width // (1 << level))

    def _chunk(self, q: QuerySpec, zi: int, level: int, ci: int, cj: int, band: str) -> np.ndarray:
        """float32 values (similarity or uncertainty; NaN: nothing computed) of level cells
        ``ci*CHUNK ..`` x ``cj*CHUNK ..`` of zoom ``zi``."""
        from ..engine import Window, read_plane, similarity

        unc = band == "uncertainty"
        key = ("uncertainty" if unc else "similarity", None if unc else q.query_key, q.md_key, zi, level, ci, cj)

        def compute():
            spec = self.store.spec
            cell, hk, wk = self._grid(zi, level)
            r0, c0 = ci * CHUNK * cell, cj * CHUNK * cell
            w = Window(r0, c0, min(spec.height, r0 + CHUNK * cell) - r0, min(spec.width, c0 + CHUNK * cell) - c0)
            matrix = None if unc else self.embedding(q)[1]
            jid = self.jobs.start(f"{'re-fused ' if self.needs_refusion(q) else ''}zoom {self.zoom_levels[zi]} "
                                  f"level {level} cells")
            try:
                with self._slots:
                    plane = read_plane(self.store, zi, w, level, refusion=self.refusion(q), with_mean=not unc)
                    u = np.where(plane.ok, plane.uncertainty, np.float32(np.nan)).astype(np.float32)
                    if unc:
                        return u
                    s = similarity(plane.mean, plane.var_sum, matrix)[0].astype(np.float32, copy=False)
                    s[~plane.ok] = np.nan
            finally:
                self.jobs.end(jid)
            self.chunks.put(("uncertainty", None, q.md_key, zi, level, ci, cj), u)  # read anyway
            return s

        return self.once.get_or_compute(self.chunks, key, compute)

    def cells(self, q: QuerySpec, zi: int, level: int, rows: slice | None = None, cols: slice | None = None,
              band: str = "similarity") -> np.ndarray:
        """float32 ``[rows, cols]`` values of zoom ``zi``'s level-``level`` cells (default: all)."""
        _, hk, wk = self._grid(zi, level)
        rows, cols = rows or slice(0, hk), cols or slice(0, wk)
        out = np.full((rows.stop - rows.start, cols.stop - cols.start), np.nan, np.float32)
        kind = "uncertainty" if band == "uncertainty" else "similarity"
        ids = [(ci, cj) for ci in range(rows.start // CHUNK, (rows.stop - 1) // CHUNK + 1)
               for cj in range(cols.start // CHUNK, (cols.stop - 1) // CHUNK + 1)]
        if len(ids) > 1:  # chunks not cached yet compute side by side (COMPUTE_SLOTS at a time)
            chunks = list(_pool().map(lambda ij: self._chunk(q, zi, level, *ij, kind), ids))
        else:
            chunks = [self._chunk(q, zi, level, *ids[0], kind)]
        for (ci, cj), ch in zip(ids, chunks):
            a0, b0 = ci * CHUNK, cj * CHUNK
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
            label = (label + " + " if label else "") + self._audio[q.audio][1]
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

    def to_score(self, values, lo: float | None, hi: float | None):
        """Values rescaled 0..1 over ``lo..hi`` (float32, as ``psm-map query --score``)."""
        if lo is None:
            return None if np.ndim(values) == 0 else np.full_like(values, np.nan)
        lo32, hi32 = np.float32(lo), np.float32(hi)
        v = np.asarray(values, np.float32) - lo32
        return v / (hi32 - lo32) if hi32 > lo32 else v

    # ------------------------------------------------------------------ summaries and points
    def _valid_pixels(self, zi: int) -> int:
        """DONE pixels with an embedding at zoom ``zi`` (the counts of its coarsest level)."""
        from ..engine import max_level, read_plane

        return int(read_plane(self.store, zi, None, max_level(self.store, zi), with_mean=False).count.sum())

    def valid_pixels(self) -> list[int]:
        if self._valid is None:
            self._valid = [self._valid_pixels(zi) for zi in range(len(self.zoom_levels))]
        return self._valid

    def levels(self) -> list:
        return [*self.zoom_levels, MEAN]

    def summary(self, q: QuerySpec) -> dict:
        """``q``'s value ranges per zoom level (what the page's legend shows), from coarse levels."""
        out = []
        valid = self.valid_pixels()
        for zi in [*range(len(self.zoom_levels)), MEAN]:
            lo, hi = self.value_range(q, zi, "similarity")
            ulo, uhi = self.value_range(q, zi, "uncertainty")
            out.append({"zoom_level": MEAN if zi == MEAN else self.zoom_levels[zi],
                        "similarity": {"min": _num(lo), "max": _num(hi)},
                        "score": {"min": 0.0 if lo is not None else None, "max": 1.0 if lo is not None else None},
                        "uncertainty": {"min": _num(ulo), "max": _num(uhi)},
                        "range_level": None if zi == MEAN else self.range_level(zi),
                        "valid_pixels": max(valid) if zi == MEAN else valid[zi]})
        return {"query": self.embedding(q)[0].label, "month": q.month, "hour": q.hour, "zoom_levels": out,
                "approximate": self.needs_refusion(q)}

    def pixel(self, lon: float, lat: float) -> tuple[int, int]:
        x, y = self.to_store.transform(lon, lat)
        col, row = ~self.transform @ (x, y)
        spec = self.store.spec
        if not (np.isfinite(col) and np.isfinite(row)) or not (0 <= col < spec.width and 0 <= row < spec.height):
            w, s, e, n = self.lonlat_bounds
            raise RequestError(f"lon {lon}, lat {lat} is outside the store (lon {w:.5f}..{e:.5f}, "
                               f"lat {s:.5f}..{n:.5f}): click inside its outline")
        return int(row), int(col)

    def _point_block(self, q: QuerySpec, zi: int, br: int, bc: int) -> tuple[np.ndarray, np.ndarray]:
        """Similarity and uncertainty of output block ``(br, bc)`` at zoom ``zi``, full resolution,
        computed as the map's writers compute it (:func:`psm_mapping.maps.map_windows`: the same
        window, so the same float arithmetic as ``psm-map query``)."""
        from ..engine import Window, window_similarity

        def compute():
            spec, bs = self.store.spec, self.store.spec.block_size
            w = Window(br * bs, bc * bs, min(bs, spec.height - br * bs), min(bs, spec.width - bc * bs))
            with self._slots:
                r = window_similarity(self.store, zi, w, self.embedding(q)[1], refusion=self.refusion(q))
            return r.similarity[0], r.uncertainty

        return self.once.get_or_compute(self.chunks, ("point", q.query_key, q.md_key, zi, br, bc), compute)

    def point(self, q: QuerySpec, lon: float, lat: float) -> dict:
        """Values of ``q`` at one pixel, every zoom at full resolution (equal to ``psm-map query``)."""
        row, col = self.pixel(lon, lat)
        cx, cy = self.transform @ (col + 0.5, row + 0.5)
        clon, clat = self.to_lonlat.transform(cx, cy)
        sims, uncs = [], []
        bs = self.store.spec.block_size
        for zi in range(len(self.zoom_levels)):
            s, u = self._point_block(q, zi, row // bs, col // bs)
            sims.append(float(s[row % bs, col % bs]))
            uncs.append(float(u[row % bs, col % bs]))
        with np.errstate(invalid="ignore"):
            sims.append(float(np.nanmean(sims)) if np.isfinite(sims).any() else float("nan"))
            uncs.append(float(np.nanmean(uncs)) if np.isfinite(uncs).any() else float("nan"))
        sim, score, unc = {}, {}, {}
        for zi, s, u in zip([*range(len(self.zoom_levels)), MEAN], sims, uncs):
            name = MEAN if zi == MEAN else str(self.zoom_levels[zi])
            sim[name], unc[name] = _num(s), _num(u)
            score[name] = _num(self.to_score(np.float32(s), *self.value_range(q, zi)))
        return {"query": self.embedding(q)[0].label, "month": q.month, "hour": q.hour,
                "lon": lon, "lat": lat, "row": row, "col": col,
                "pixel_centre": {"lon": clon, "lat": clat, "x": cx, "y": cy},
                "valid": sim[str(self.zoom_levels[0])] is not None,
                "similarity": sim, "score": score, "uncertainty": unc}

    # ------------------------------------------------------------------ export
    def export_cog(self, q: QuerySpec, path: Path, score: bool = False) -> Path:
        """The query's COG as ``psm-map query STORE --query TEXT`` writes it."""
        from ..outputs import build_map_result, write_cog
        from ..query import query_store
        from ..run import metadata_tags

        query, _ = self.embedding(q)
        md = self.metadata(q)
        jid = self.jobs.start("the map for the download")
        try:
            maps = query_store(self.store, [query], model=self.model if self.needs_refusion(q) else None,
                               metadata=md if self.needs_refusion(q) else None)
        finally:
            self.jobs.end(jid)
        prov = dict(self.store.attrs.get("provenance", {}))
        prov.update(metadata_tags(self.model, md))
        return write_cog(build_map_result(maps, self.store, prov, None, score=score), path, overwrite=True)

    # ------------------------------------------------------------------ footprint and info
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

    def info(self) -> dict:
        spec = self.store.spec
        epsg = self.crs.to_epsg()
        prov = self.store.attrs.get("provenance", {})
        return {
            "store": self.store_url, "store_key": spec.key(),
            "crs": f"EPSG:{epsg}" if epsg else spec.crs_wkt, "bounds": list(self.bounds),
            "lonlat_bounds": list(self.lonlat_bounds), "width": spec.width, "height": spec.height,
            "pixels": spec.width * spec.height, "valid_pixels": self.valid_pixels()[0],
            "pixel_size_m": spec.stride, "zoom_levels": list(self.zoom_levels), "levels": self.levels(),
            "sat_type": spec.sat_type, "imagery": spec.imagery, "probabilistic": spec.probabilistic,
            "checkpoint": self.checkpoint.name, "checkpoint_sha256": self.checkpoint_sha256,
            "metadata_adjustable": self.metadata_adjustable, "stored_metadata": self.stored_md,
            "bands": list(BANDS), "tile_formats": ["png", "tif", "npy"], "means_in_memory": False,
            "memory_limit": self.memory_limit, "cache_budget": self.cache_budget, "held_bytes": self.held_bytes,
            "max_upload_bytes": self.max_upload_bytes, "ranges": list(self.ranges.values()),
            # a demo checkpoint with random weights: the page says the map is meaningless
            "untrained": str(prov.get("untrained_weights", "")).lower() == "true"
            or bool(self.model.source.get("hyper_parameters", {}).get("untrained")),
        }

    @property
    def held_bytes(self) -> int:
        return sum(c.bytes for c in (self.chunks, self.tiles, self.embeddings))

    def stats(self) -> dict:
        return {"caches": {c.name: c.stats() for c in (self.chunks, self.tiles, self.embeddings)},
                "held_bytes": self.held_bytes, "cache_budget": self.cache_budget,
                "baseline_rss": self.baseline_rss, "rss": process_rss(), "load_seconds": round(self.load_seconds, 3),
                "computed": [{"key": repr(k), "times": v} for k, v in self.once.computed.items()],
                "jobs": self.jobs.list()}


_POOL = None
_POOL_LOCK = threading.Lock()


def _pool():
    """The threads that compute a request's chunks side by side (shared by all requests)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            from concurrent.futures import ThreadPoolExecutor

            _POOL = ThreadPoolExecutor(COMPUTE_SLOTS * 2, thread_name_prefix="psm-chunks")
        return _POOL


@dataclass
class _Embedded:
    query: Any
    matrix: Any

    @property
    def nbytes(self) -> int:
        return int(self.matrix.mean.numel() * 4 * 3)


def _num(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None
