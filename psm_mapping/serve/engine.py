"""The explorer's engine: one read-only store, one model, caches; no HTTP here.

A query (text and/or an uploaded clip, month, hour) becomes, per zoom level, a similarity raster
over the whole store computed once (``query.zoom_similarity`` over the store's ``mean`` held in
memory when it fits ``memory_limit``, streamed from the store otherwise) and kept in a byte-bounded
LRU; tiles, points and exports are cut from those rasters.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import PSMError, StoreError
from ..query import (QueryMaps, ZoomArrays, build_queries, load_zoom, prepare_query, zoom_nbytes,
                     zoom_similarity)
from ..store import EmbeddingStore
from .cache import ByteLRU, Once
from .tiles import Raster
from .uploads import AUDIO_SUFFIXES, DEFAULT_UPLOAD_CACHE_BYTES, MAX_AUDIO_SECONDS, Uploads  # noqa: F401

log = logging.getLogger(__name__)

#: the pseudo zoom level whose raster is the mean over the store's zoom levels
MEAN = "mean"
BANDS = ("similarity", "score", "uncertainty")


class RequestError(PSMError):
    """A bad request: ``status`` is the HTTP status, the message says what and how to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class QuerySpec:
    """Everything that determines a query's maps (what a URL's query string says)."""

    text: str | None = None
    audio: str | None = None  # an id from :meth:`Explorer.add_audio`
    month: int | None = None
    hour: int | None = None

    @property
    def query_key(self) -> tuple:
        return (self.text, self.audio)

    @property
    def md_key(self) -> tuple:
        return (self.month, self.hour)


@dataclass
class Job:
    what: str
    done: int = 0
    total: int = 1
    started: float = field(default_factory=time.time)


class Explorer:
    """A store opened read-only with its checkpoint; answers queries from caches.

    ``memory_limit`` (bytes): the store's means are held in memory when every zoom level fits in
    60% of it (else streamed from the store per query); re-fused zoom levels (month/hour) share
    25%; similarity rasters and rendered tiles the rest.
    """

    def __init__(self, store_url: str, checkpoint: str | None = None, clap_config: str | None = None,
                 tokenizer: str | None = None, device: str = "cpu", dtype: str = "auto",
                 memory_limit: float = 6e9, max_upload_bytes: int = 20 << 20,
                 storage_options: dict | None = None, preload: bool = True,
                 max_audio_seconds: float = MAX_AUDIO_SECONDS,
                 upload_cache_bytes: int = DEFAULT_UPLOAD_CACHE_BYTES):
        from ..model.checkpoint import file_sha256
        from ..run import MapConfig, load_model, reuse_text_setup

        self.store_url = str(store_url)
        self.store = EmbeddingStore.open(self.store_url, storage_options=storage_options, mode="r")
        spec = self.store.spec
        cfg = MapConfig(checkpoint=checkpoint, clap_config=clap_config, tokenizer=tokenizer,
                        device=device, dtype=dtype)
        if not cfg.checkpoint and not os.environ.get("PSM_CHECKPOINT"):
            cfg.checkpoint = self.store.attrs.get("checkpoint_path")
        reuse_text_setup(self.store, cfg)  # the tokenizer and CLAP config the store was built with
        self.model, ckpt, _ = load_model(cfg, encoders=("text", "audio"))  # no images are embedded
        sha = file_sha256(ckpt)
        if sha != spec.checkpoint_sha256:
            raise StoreError(f"{Path(ckpt).name} is not the checkpoint this store was built with "
                             f"(sha256 {sha[:12]} != {spec.checkpoint_sha256[:12]}): pass the same --checkpoint")
        self.checkpoint, self.checkpoint_sha256 = Path(ckpt), sha
        self.tokenizer = cfg.tokenizer
        self.zoom_levels = tuple(int(z) for z in spec.zoom_levels)
        self.stored_md = self.store.attrs.get("metadata_options")
        self.metadata_adjustable = bool(self.model.config.uses_metadata)
        self.memory_limit = int(memory_limit)
        self.max_upload_bytes = int(max_upload_bytes)
        from affine import Affine
        from pyproj import CRS, Transformer

        self.crs = CRS.from_wkt(spec.crs_wkt)
        self.transform = Affine(*spec.transform)
        self.to_store = Transformer.from_crs("EPSG:4326", self.crs, always_xy=True)
        self.to_lonlat = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True)
        from ..outputs.results import lonlat_bounds

        h, w = spec.height, spec.width
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((0, 0), (w, h))))
        self.bounds = (min(xs), min(ys), max(xs), max(ys))
        self.lonlat_bounds = lonlat_bounds(self.crs, self.bounds)

        per_zoom = zoom_nbytes(self.store)
        self.hold_means = per_zoom * len(self.zoom_levels) <= 0.6 * self.memory_limit
        self.refused = ByteLRU(int(0.25 * self.memory_limit), "re-fused zoom levels")
        rest = max(64 << 20, int(0.15 * self.memory_limit))
        self.rasters = ByteLRU(int(rest * 0.75), "rasters")
        self.tiles = ByteLRU(int(rest * 0.25), "tiles")
        self.embeddings = ByteLRU(64 << 20, "query embeddings")
        self.once = Once()
        self._model_lock = threading.Lock()
        self._base: dict[int, ZoomArrays] = {}
        self._base_lock = threading.Lock()
        self._jobs: dict[int, Job] = {}
        self._job_id = 0
        self._jobs_lock = threading.Lock()
        # uploaded clips: duration-checked, a byte-bounded LRU of files, deleted by close()
        self.uploads = Uploads(self.max_upload_bytes, max_audio_seconds, upload_cache_bytes)
        self.ranges: dict[tuple, dict] = {}
        self.load_seconds = 0.0
        if preload:
            t0 = time.perf_counter()
            for zi in range(len(self.zoom_levels)):
                self.base(zi)
            self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        self.uploads.close()

    @property
    def held_bytes(self) -> int:
        return sum(a.nbytes for a in self._base.values())

    # ------------------------------------------------------------------ validation
    def zoom_index(self, zoom_level: str | int | None) -> int | str:
        """The index of ``zoom_level`` in the store, or :data:`MEAN`; None: the first level."""
        if zoom_level is None or zoom_level == "":
            return 0
        if str(zoom_level).strip().lower() == MEAN:
            return MEAN
        try:
            z = int(str(zoom_level).strip())
        except ValueError:
            z = None
        if z not in self.zoom_levels:
            have = ", ".join(str(v) for v in self.zoom_levels)
            raise RequestError(f"zoom_level {zoom_level!r} is not in this store: use one of {have} or mean")
        return self.zoom_levels.index(z)

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
        m = self._whole("month", month, 1, 12)
        h = self._whole("hour", hour, 0, 23)
        if (m is not None or h is not None) and not self.metadata_adjustable:
            raise RequestError(f"the checkpoint {self.checkpoint.name} has no metadata fusion: month and "
                               "hour cannot change its maps; drop month= and hour=")
        return QuerySpec(text, audio, m, h)

    @staticmethod
    def _whole(name: str, value, lo: int, hi: int) -> int | None:
        if value is None or str(value).strip() == "":
            return None
        try:
            v = int(str(value).strip())
        except ValueError:
            raise RequestError(f"{name} {value!r} is not a whole number: give one of {lo}..{hi} "
                               "(or leave it out for unknown)") from None
        if not lo <= v <= hi:
            raise RequestError(f"{name} {v} is out of range: give one of {lo}..{hi} (or leave it out for unknown)")
        return v

    # ------------------------------------------------------------------ metadata
    def metadata(self, q: QuerySpec):
        from ..embed import MetadataOptions

        return MetadataOptions(q.month, q.hour)

    def needs_refusion(self, q: QuerySpec) -> bool:
        md = self.metadata(q).as_dict()
        return self.stored_md is not None and md != self.stored_md

    # ------------------------------------------------------------------ jobs (progress)
    def _job(self, what: str, total: int = 1) -> int:
        with self._jobs_lock:
            self._job_id += 1
            self._jobs[self._job_id] = Job(what, 0, total)
            return self._job_id

    def _job_update(self, jid: int, done: int, total: int) -> None:
        with self._jobs_lock:
            j = self._jobs.get(jid)
            if j is not None:
                j.done, j.total = done, total

    def _job_end(self, jid: int) -> None:
        with self._jobs_lock:
            self._jobs.pop(jid, None)

    def jobs(self) -> list[dict]:
        with self._jobs_lock:
            return [{"what": j.what, "done": j.done, "total": j.total,
                     "seconds": round(time.time() - j.started, 2)} for j in self._jobs.values()]

    # ------------------------------------------------------------------ the store's arrays
    def base(self, zi: int) -> ZoomArrays:
        """Zoom ``zi`` with the stored metadata (means held when they fit the memory limit)."""
        a = self._base.get(zi)
        if a is None:
            with self._base_lock:
                a = self._base.get(zi)
                if a is None:
                    a = load_zoom(self.store, zi, with_mean=self.hold_means)
                    self._base[zi] = a
        return a

    def zoom_arrays(self, q: QuerySpec, zi: int) -> ZoomArrays:
        if not self.needs_refusion(q):
            return self.base(zi)

        def compute():
            md = self.metadata(q)
            jid = self._job(f"fusion for month={q.month} hour={q.hour} at zoom {self.zoom_levels[zi]}")
            try:
                with self._model_lock:
                    return load_zoom(self.store, zi, model=self.model, metadata=md,
                                     progress=lambda d, t: self._job_update(jid, d, t))
            finally:
                self._job_end(jid)

        return self.once.get_or_compute(self.refused, ("refused", q.md_key, zi), compute)

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
        """``(query, qm, qvs)`` of ``q``'s text/audio, cached (it does not depend on month/hour:
        the metadata enter the image side only)."""

        def compute():
            texts = [q.text] if q.text else []
            clip = self._clip(q.audio) if q.audio else None
            audio = [clip[0]] if clip else []
            with self._model_lock:
                queries = build_queries(self.model, texts, audio, tokenizer=self.tokenizer, combine=True,
                                        max_audio_seconds=self.uploads.max_seconds)
            query = queries[0]
            if clip:
                label = clip[1]
                query.label = f"{q.text} + {label}" if q.text else label
            qm, qvs, _ = prepare_query(self.store, [query], None)
            return _Embedded(query, qm, qvs)

        e = self.once.get_or_compute(self.embeddings, ("embedding", q.query_key), compute)
        return e.query, e.qm, e.qvs

    def similarity(self, q: QuerySpec, zi: int | str) -> Raster:
        """The query's similarity raster at zoom index ``zi`` (or the mean over zooms)."""
        key = ("similarity", q.query_key, q.md_key, zi)

        def compute():
            if zi == MEAN:
                stack = np.stack([self.similarity(q, k).data for k in range(len(self.zoom_levels))])
                with np.errstate(invalid="ignore"):
                    data = np.nanmean(stack, axis=0).astype(np.float32)
                data[~np.isfinite(stack).any(0)] = np.nan
            else:
                _, qm, qvs = self.embedding(q)
                arrays = self.zoom_arrays(q, zi)
                src = arrays if arrays.mean is not None else self.store
                jid = self._job(f"similarity at zoom {self.zoom_levels[zi]}")
                try:
                    data = zoom_similarity(src, qm, qvs, zoom_index=zi)[0]
                finally:
                    self._job_end(jid)
            r = Raster(data, self.crs, self.transform)
            self._note_range(q, zi, r)
            return r

        return self.once.get_or_compute(self.rasters, key, compute)

    def uncertainty(self, q: QuerySpec, zi: int | str) -> Raster:
        key = ("uncertainty", q.md_key, zi)

        def compute():
            if zi == MEAN:
                stack = np.stack([self.uncertainty(q, k).data for k in range(len(self.zoom_levels))])
                with np.errstate(invalid="ignore"):
                    data = np.nanmean(stack, axis=0).astype(np.float32)
            else:
                data = np.asarray(self.zoom_arrays(q, zi).uncertainty, np.float32)
            return Raster(data, self.crs, self.transform)

        return self.once.get_or_compute(self.rasters, key, compute)

    def raster(self, q: QuerySpec, zi: int | str, band: str) -> Raster:
        return self.uncertainty(q, zi) if band == "uncertainty" else self.similarity(q, zi)

    def _note_range(self, q: QuerySpec, zi, r: Raster) -> None:
        label = q.text or ""
        if q.audio:
            label = (label + " + " if label else "") + self.audio_name(q.audio)
        zl = MEAN if zi == MEAN else self.zoom_levels[zi]
        self.ranges[(q.query_key, q.md_key, zi)] = {
            "query": label, "month": q.month, "hour": q.hour, "zoom_level": zl,
            "min": _num(r.lo), "max": _num(r.hi), "valid_pixels": r.valid}
        while len(self.ranges) > 50:
            self.ranges.pop(next(iter(self.ranges)))

    def levels(self) -> list:
        return [*self.zoom_levels, MEAN]

    def summary(self, q: QuerySpec) -> dict:
        """Compute every zoom's raster of ``q``; their value ranges (what the page's legend shows)."""
        out = []
        for zi in [*range(len(self.zoom_levels)), MEAN]:
            s, u = self.similarity(q, zi), self.uncertainty(q, zi)
            out.append({"zoom_level": MEAN if zi == MEAN else self.zoom_levels[zi],
                        "similarity": {"min": _num(s.lo), "max": _num(s.hi)},
                        "score": {"min": 0.0 if s.valid else None, "max": 1.0 if s.valid else None},
                        "uncertainty": {"min": _num(u.lo), "max": _num(u.hi)},
                        "valid_pixels": s.valid})
        return {"query": self.embedding(q)[0].label, "month": q.month, "hour": q.hour, "zoom_levels": out}

    # ------------------------------------------------------------------ points
    def pixel(self, lon: float, lat: float) -> tuple[int, int]:
        x, y = self.to_store.transform(lon, lat)
        col, row = ~self.transform @ (x, y)
        spec = self.store.spec
        if not (np.isfinite(col) and np.isfinite(row)) or not (0 <= col < spec.width and 0 <= row < spec.height):
            w, s, e, n = self.lonlat_bounds
            raise RequestError(f"lon {lon}, lat {lat} is outside the store (lon {w:.5f}..{e:.5f}, "
                               f"lat {s:.5f}..{n:.5f}): click inside its outline")
        return int(row), int(col)

    def point(self, q: QuerySpec, lon: float, lat: float) -> dict:
        row, col = self.pixel(lon, lat)
        cx, cy = self.transform @ (col + 0.5, row + 0.5)
        clon, clat = self.to_lonlat.transform(cx, cy)
        sim, score, unc = {}, {}, {}
        for zi in [*range(len(self.zoom_levels)), MEAN]:
            name = MEAN if zi == MEAN else str(self.zoom_levels[zi])
            s = self.similarity(q, zi)
            v = float(s.data[row, col])
            sim[name] = _num(v)
            score[name] = _num(s.score(v))
            unc[name] = _num(float(self.uncertainty(q, zi).data[row, col]))
        return {"query": self.embedding(q)[0].label, "month": q.month, "hour": q.hour,
                "lon": lon, "lat": lat, "row": row, "col": col,
                "pixel_centre": {"lon": clon, "lat": clat, "x": cx, "y": cy},
                "valid": sim[str(self.zoom_levels[0])] is not None,
                "similarity": sim, "score": score, "uncertainty": unc}

    # ------------------------------------------------------------------ export
    def query_maps(self, q: QuerySpec) -> QueryMaps:
        query, _, _ = self.embedding(q)
        Z = len(self.zoom_levels)
        sims = np.stack([self.similarity(q, k).data for k in range(Z)])
        unc = np.stack([self.uncertainty(q, k).data for k in range(Z)])
        return QueryMaps(self.zoom_levels, [query], [sims], unc)

    def export_cog(self, q: QuerySpec, path: Path, score: bool = False) -> Path:
        """The query's COG as ``psm-map query STORE --query TEXT`` writes it."""
        from ..outputs import build_map_result
        from ..run import metadata_tags
        from ..outputs import write_cog

        prov = dict(self.store.attrs.get("provenance", {}))
        prov.update(metadata_tags(self.model, self.metadata(q)))
        result = build_map_result(self.query_maps(q), self.store, prov, None, score=score)
        return write_cog(result, path, overwrite=True)

    # ------------------------------------------------------------------ footprint and info
    def footprint(self) -> dict:
        """The store's valid area (pixels with an embedding at the first zoom) in lon/lat GeoJSON."""
        import rasterio.features
        from shapely.geometry import mapping, shape
        from shapely.ops import transform as shp_transform, unary_union

        valid = np.isfinite(self.base(0).var_sum)
        geoms = [shape(g) for g, v in rasterio.features.shapes(valid.astype(np.uint8), mask=valid,
                                                                transform=self.transform) if v == 1]
        feats = []
        if geoms:
            g = unary_union(geoms).simplify(abs(self.transform.a) * 0.5)
            g = shp_transform(lambda x, y: self.to_lonlat.transform(x, y), g.segmentize(abs(self.transform.a) * 16))
            feats.append({"type": "Feature", "properties": {"name": "store footprint"}, "geometry": mapping(g)})
        return {"type": "FeatureCollection", "features": feats}

    def info(self) -> dict:
        spec = self.store.spec
        from pyproj import CRS

        epsg = CRS.from_wkt(spec.crs_wkt).to_epsg()
        return {
            "store": self.store_url, "store_key": spec.key(),
            "crs": f"EPSG:{epsg}" if epsg else spec.crs_wkt, "bounds": list(self.bounds),
            "lonlat_bounds": list(self.lonlat_bounds), "width": spec.width, "height": spec.height,
            "pixels": spec.width * spec.height,
            "valid_pixels": int(np.isfinite(self.base(0).var_sum).sum()),
            "pixel_size_m": spec.stride, "zoom_levels": list(self.zoom_levels), "levels": self.levels(),
            "sat_type": spec.sat_type, "imagery": spec.imagery, "probabilistic": spec.probabilistic,
            "checkpoint": self.checkpoint.name, "checkpoint_sha256": self.checkpoint_sha256,
            "metadata_adjustable": self.metadata_adjustable, "stored_metadata": self.stored_md,
            "bands": list(BANDS), "means_in_memory": self.hold_means, "memory_limit": self.memory_limit,
            "held_bytes": self.held_bytes, "max_upload_bytes": self.max_upload_bytes,
            "ranges": list(self.ranges.values()),
            # a demo checkpoint with random weights: the page says the map is meaningless
            "untrained": str(self.store.attrs.get("provenance", {}).get("untrained_weights", "")).lower() == "true"
            or bool(self.model.source.get("hyper_parameters", {}).get("untrained")),
        }

    def stats(self) -> dict:
        return {"caches": {c.name: c.stats() for c in (self.rasters, self.tiles, self.embeddings, self.refused)},
                "held_bytes": self.held_bytes, "load_seconds": round(self.load_seconds, 3),
                "computed": [{"key": repr(k), "times": v} for k, v in self.once.counts()],
                "computed_dropped": self.once.computed_dropped, "uploads": self.uploads.stats(),
                "jobs": self.jobs()}


@dataclass
class _Embedded:
    query: Any
    qm: Any
    qvs: Any

    @property
    def nbytes(self) -> int:
        return int(self.qm.numel() * 4 * 3)


def _num(v) -> float | None:
    return float(v) if v is not None and np.isfinite(v) else None

