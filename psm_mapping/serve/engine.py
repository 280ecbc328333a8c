"""The explorer's engine: one store session (:func:`psm_mapping.session.open_session`), answers
read window by window through :mod:`psm_mapping.engine`, byte-bounded caches; no HTTP here.

* A tile reads the store level whose cell is the largest not coarser than the tile's pixel
  (rio-tiler's overview choice), over the tile's window only: the level's cells are computed in
  chunks of 64 to 128 cells a side (similarity from the cells' averaged mean and
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

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cache import ByteLRU, Once
from .requests import BANDS, MEAN, Jobs, QuerySpec, RequestError, whole, zoom_index
from .planes import COMPUTE_SLOTS, MAX_CHUNK, LevelCells
from .tiles import warp_to_tile
from .uploads import DEFAULT_UPLOAD_CACHE_BYTES, MAX_AUDIO_SECONDS, Uploads

log = logging.getLogger(__name__)

__all__ = ["Explorer", "QuerySpec", "RequestError", "BANDS", "MEAN"]


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


class Explorer(LevelCells):
    """A store opened for answering; tiles, points, ranges and exports from caches.

    ``memory_limit`` (bytes): the server's memory target. The caches (store cells, similarity
    chunks, rendered tiles, query embeddings) share half of what is left of it after the model is
    loaded, less a reserve for the chunks being computed (at least 64 MB in all); the other half
    is for reads in flight and the allocator's slack."""

    def __init__(self, store_url: str, checkpoint: str | None = None, clap_config: str | None = None,
                 tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
                 memory_limit: float = 1.5e9, max_upload_bytes: int = 20 << 20,
                 storage_options: dict | None = None, preload: bool = True,
                 max_audio_seconds: float = MAX_AUDIO_SECONDS,
                 upload_cache_bytes: int = DEFAULT_UPLOAD_CACHE_BYTES):
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
        reserve = COMPUTE_SLOTS * MAX_CHUNK * MAX_CHUNK * (spec.fc_dim * 4 * 3 + 64)
        # half of what the loaded model leaves: the other half is for reads in flight (a point
        # computes its map window, up to 64 MB of means) and the allocator's slack
        budget = max(64 << 20, (self.memory_limit - self.baseline_rss) // 2 - reserve)
        self.cache_budget = int(budget)
        self.planes = ByteLRU(int(budget * 0.55), "store cells")
        self.chunks = ByteLRU(int(budget * 0.3), "similarity chunks")
        self.tiles = ByteLRU(int(budget * 0.1), "tiles")
        self.embeddings = ByteLRU(max(8 << 20, int(budget * 0.05)), "query embeddings")
        self.once = Once()
        self.jobs = Jobs()
        self._slots = threading.BoundedSemaphore(COMPUTE_SLOTS)
        self._model_lock = threading.Lock()
        self._refusions: dict[tuple, Any] = {}
        self._windows: dict | None = None
        # uploaded clips: duration-checked, a byte-bounded LRU of files, deleted by close()
        self.uploads = Uploads(self.max_upload_bytes, max_audio_seconds, upload_cache_bytes)
        self.ranges: dict[tuple, dict] = {}
        self._ranges_lock = threading.Lock()
        self._valid = [self._valid_pixels(zi) for zi in range(len(self.zoom_levels))] if preload else None
        if preload:  # the tiler's first use (imports, GDAL's projection set-up) before the first request
            warp_to_tile(np.zeros((2, 2), np.float32), self.transform, self.crs, 0, 0, 0)
        self.load_seconds = time.perf_counter() - t0

    def close(self) -> None:
        self.uploads.close()

    # ------------------------------------------------------------------ validation
    def zoom_index(self, zoom_level) -> int | str:
        return zoom_index(self.zoom_levels, zoom_level)

    def query_spec(self, text=None, audio=None, month=None, hour=None, need_query: bool = True) -> QuerySpec:
        text = None if text is None or not str(text).strip() else " ".join(str(text).split())
        if text is not None and len(text) > 1000:
            raise RequestError("text is longer than 1000 characters: give a shorter query")
        audio = None if audio is None or not str(audio).strip() else str(audio).strip()
        if audio is not None and audio not in self.uploads:
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
        aid, new = self.uploads.add(data, filename)
        if new:
            try:
                self.embedding(QuerySpec(audio=aid))
            except Exception:
                self.uploads.remove(aid)
                raise
        return aid

    def audio_name(self, aid: str) -> str:
        """The file name an uploaded clip came with."""
        return self._clip(aid)[1]

    def _clip(self, aid: str) -> tuple[Path, str]:
        clip = self.uploads.get(aid)
        if clip is None:  # evicted since the request was checked
            raise RequestError(f"audio id {aid!r} was dropped from the upload cache: upload the clip again", 404)
        return clip

    def embedding(self, q: QuerySpec):
        """``(query, QueryMatrix)`` of ``q``'s text/audio, cached (month/hour enter the image side only)."""

        def compute():
            texts = [q.text] if q.text else []
            clip = self._clip(q.audio) if q.audio else None
            audio = [clip[0]] if clip else []
            with self._model_lock:
                query = self.session.queries(texts, audio, combine=True,
                                             max_audio_seconds=self.uploads.max_seconds)[0]
            if clip:
                label = clip[1]
                query.label = f"{q.text} + {label}" if q.text else label
            return _Embedded(query, self.session.query_matrix([query]))

        e = self.once.get_or_compute(self.embeddings, ("embedding", q.query_key), compute)
        return e.query, e.matrix

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

    def _map_window(self, row: int, col: int):
        """The window of :func:`psm_mapping.maps.output_windows` (what ``psm-map query`` computes
        at once) that holds pixel ``(row, col)``."""
        import bisect

        from ..maps import output_windows

        if self._windows is None:
            by_row: dict[int, list] = {}
            for w in output_windows(self.store):
                by_row.setdefault(w.row_off, []).append(w)
            self._windows = by_row
        ws = self._windows[row - row % self.store.spec.block_size]
        return ws[bisect.bisect_right([w.col_off for w in ws], col) - 1]

    def _point_window(self, q: QuerySpec, zi: int, w) -> tuple[np.ndarray, np.ndarray]:
        """Similarity and uncertainty of map window ``w`` at zoom ``zi``, full resolution, computed
        as the map's writers compute it (the same window: the same float arithmetic as ``psm-map
        query``); cached."""
        from ..engine import window_similarity

        def compute():
            with self._slots:
                r = window_similarity(self.store, zi, w, self.embedding(q)[1], refusion=self.refusion(q))
            return r.similarity[0], r.uncertainty

        return self.once.get_or_compute(self.chunks, ("point", q.query_key, q.md_key, zi, w.row_off, w.col_off),
                                        compute)

    def point(self, q: QuerySpec, lon: float, lat: float) -> dict:
        """Values of ``q`` at one pixel, every zoom at full resolution (equal to ``psm-map query``)."""
        row, col = self.pixel(lon, lat)
        cx, cy = self.transform @ (col + 0.5, row + 0.5)
        clon, clat = self.to_lonlat.transform(cx, cy)
        sims, uncs = [], []
        w = self._map_window(row, col)
        for zi in range(len(self.zoom_levels)):
            s, u = self._point_window(q, zi, w)
            sims.append(float(s[row - w.row_off, col - w.col_off]))
            uncs.append(float(u[row - w.row_off, col - w.col_off]))
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
        from ..session import metadata_tags

        spec = self.store.spec
        # the map is built in memory before the COG is written: similarity (and score) and
        # uncertainty per zoom, float32, about twice over while writing
        need = len(self.zoom_levels) * spec.height * spec.width * 4 * (3 if score else 2) * 2
        if need > self.memory_limit // 2:
            raise RequestError(f"the download of this store's map needs about {need / 1e6:,.0f} MB, over half "
                               f"of --memory-limit ({self.memory_limit / 1e6:,.0f} MB): write it with `psm-map "
                               f"query {self.store_url} --query TEXT --out map.tif` (streamed), or restart the "
                               "server with a larger --memory-limit", 413)
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

    # ------------------------------------------------------------------ info
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
            "max_upload_bytes": self.max_upload_bytes, "ranges": self._ranges_list(),
            # a demo checkpoint with random weights: the page says the map is meaningless
            "untrained": str(prov.get("untrained_weights", "")).lower() == "true"
            or bool(self.model.source.get("hyper_parameters", {}).get("untrained")),
        }

    def _ranges_list(self) -> list[dict]:
        with self._ranges_lock:
            return list(self.ranges.values())

    @property
    def held_bytes(self) -> int:
        return sum(c.bytes for c in (self.planes, self.chunks, self.tiles, self.embeddings))

    def stats(self) -> dict:
        return {"caches": {c.name: c.stats() for c in (self.planes, self.chunks, self.tiles, self.embeddings)},
                "held_bytes": self.held_bytes, "cache_budget": self.cache_budget,
                "baseline_rss": self.baseline_rss, "rss": process_rss(), "load_seconds": round(self.load_seconds, 3),
                "computed": [{"key": repr(k), "times": v} for k, v in self.once.counts()],
                "computed_dropped": self.once.computed_dropped, "uploads": self.uploads.stats(),
                "jobs": self.jobs.list()}


@dataclass
class _Embedded:
    query: Any
    matrix: Any

    @property
    def nbytes(self) -> int:
        return int(self.matrix.mean.numel() * 4 * 3)


def _num(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None
