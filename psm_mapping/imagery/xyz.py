"""XYZ / TMS / WMTS tile servers in Web Mercator (EPSG:3857) from a URL template.

Placeholders: ``{z} {x} {y}``, ``{-y}`` (TMS, y flipped), ``{s}`` (subdomains), ``{q}``
(quadkey), WMTS ``{TileMatrix} {TileRow} {TileCol} {TileMatrixSet}``. The tile zoom is the
coarsest one whose pixels are not coarser than the requested window; the covering tiles are
fetched concurrently, mosaicked in 3857 and warped to the requested grid with antialiasing.
A 404 is a tile the server does not have (nodata). Failed tiles (5xx or 429 after the retries,
timeouts, corrupt bytes) are transient: their pixels are masked, marked in
:attr:`ImageryWindow.fault_mask` (so the tiler never embeds a chip that touches them), logged
once per read and counted in :attr:`ImageryWindow.faults`.
"""
from __future__ import annotations

import io
import logging
import math
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import morecantile
import numpy as np
from affine import Affine
from PIL import Image
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RioCRS
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.warp import reproject, transform_bounds
from tqdm.auto import tqdm

from ..errors import ImageryError, ServerDeadError
from .base import ImagerySource, ImageryWindow, SourceInfo, check_window
from .cache import TileCache
from .http import DEFAULT_USER_AGENT, FetchResult, HTTPClient, HTTPConfig

log = logging.getLogger(__name__)

_TMS = morecantile.tms.get("WebMercatorQuad")
#: half the width of the Web Mercator world in metres
HALF_WORLD = float(_TMS.xy_bbox.right)
WORLD = 2.0 * HALF_WORLD
MAX_LAT = 85.0511287798066
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KNOWN = {"z", "x", "y", "-y", "s", "q", "TileMatrix", "TileRow", "TileCol", "TileMatrixSet"}
_RESAMPLING = {
    "average": Resampling.average,
    "lanczos": Resampling.lanczos,
    "bilinear": Resampling.bilinear,
    "cubic": Resampling.cubic,
    "nearest": Resampling.nearest,
}
#: Web Mercator shifted to lon_0=180, for windows that cross the antimeridian
_MERC_180 = RioCRS.from_proj4(
    "+proj=merc +a=6378137 +b=6378137 +lat_ts=0 +lon_0=180 +x_0=0 +y_0=0 +k=1 +units=m "
    "+nadgrids=@null +wktext +no_defs")
_MERC = RioCRS.from_epsg(3857)


@dataclass
class XYZStats:
    """Counters over the life of a source (for logs and benchmarks)."""

    tiles: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    downloads: int = 0
    http_attempts: int = 0
    faults: int = 0
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0
    warp_seconds: float = 0.0


@dataclass
class TilePlan:
    """Tiles covering a window: zoom, column/row ranges (columns may pass 2**z when the
    window crosses the antimeridian) and the resolution asked for in 3857 metres."""

    zoom: int
    cols: range
    rows: range
    requested_res: float
    crosses_antimeridian: bool = False
    tiles: list[tuple[int, int]] = field(default_factory=list)


def parse_template(template: str) -> set[str]:
    """Placeholders of a URL template; raises :class:`ImageryError` if it cannot address tiles."""
    if not isinstance(template, str) or not template.strip():
        raise ImageryError("empty tile URL template: pass xyz:https://host/{z}/{x}/{y}.png")
    scheme = urlsplit(template.replace("{", "").replace("}", "")).scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageryError(
            f"tile URL {template!r} is not http(s): pass xyz:https://host/{{z}}/{{x}}/{{y}}.png "
            "or a local raster path")
    names = set(_PLACEHOLDER.findall(template))
    unknown = names - _KNOWN
    if unknown:
        raise ImageryError(
            f"unknown placeholder(s) {sorted(unknown)} in tile URL: use {{z}} {{x}} {{y}} {{-y}} "
            "{s} {q} or WMTS {TileMatrix} {TileRow} {TileCol} {TileMatrixSet}")
    has_q = "q" in names
    if not (has_q or ({"z", "TileMatrix"} & names and {"x", "TileCol"} & names
                      and {"y", "-y", "TileRow"} & names)):
        raise ImageryError(
            f"tile URL {template!r} lacks tile placeholders: it needs {{z}}, {{x}} and {{y}} "
            "(or {-y}, {q}, or WMTS {TileMatrix}/{TileRow}/{TileCol})")
    return names


def zoom_for_resolution(res_3857: float, tile_size: int, min_zoom: int, max_zoom: int) -> int:
    """Smallest zoom whose pixels (3857 metres) are not coarser than ``res_3857``."""
    z = math.ceil(math.log2(WORLD / (tile_size * res_3857)) - 1e-9)
    return int(min(max(z, min_zoom), max_zoom))


def tile_resolution(zoom: int, tile_size: int) -> float:
    """3857 metres per pixel of a tile at ``zoom``."""
    return WORLD / (tile_size * 2**zoom)


class XYZSource(ImagerySource):
    """A Web Mercator tile server read through a URL template."""

    def __init__(
        self,
        url_template: str,
        *,
        name: str | None = None,
        attribution: str = "",
        license: str = "",
        max_zoom: int = 19,
        min_zoom: int = 0,
        tile_size: int = 256,
        subdomains: str | list[str] = "abc",
        tile_matrix_set: str = "WebMercatorQuad",
        user_agent: str | None = None,
        timeout: float = 30.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_concurrency: int = 8,
        headers: dict[str, str] | None = None,
        dead_after: float = 30.0,
        cache_dir: str | None = None,
        cache_max_age: float | None = None,
        memory_cache_tiles: int = 256,
        resampling: str = "auto",
        max_tiles: int = 1024,
        sat_type: str | None = None,
        bounds_lonlat: tuple[float, float, float, float] | None = None,
        progress: bool = False,
    ):
        self.template = url_template
        self.placeholders = parse_template(url_template)
        if tile_size not in (256, 512):
            raise ImageryError(f"tile_size {tile_size} is not supported: use 256 or 512")
        if not 0 <= min_zoom <= max_zoom <= 30:
            raise ImageryError(f"bad zoom range {min_zoom}..{max_zoom}: use 0 <= min <= max <= 30")
        if not (isinstance(dead_after, (int, float)) and dead_after > 0):
            raise ImageryError(f"dead_after {dead_after!r} is not a positive number of seconds: "
                               "pass e.g. --imagery-option dead_after=30")
        if resampling != "auto" and resampling not in _RESAMPLING:
            raise ImageryError(
                f"unknown resampling {resampling!r}: use auto or one of {sorted(_RESAMPLING)}")
        self.subdomains = list(subdomains)
        if "s" in self.placeholders and not self.subdomains:
            raise ImageryError("tile URL has {s} but no subdomains: pass subdomains='abc'")
        self.host = urlsplit(url_template.replace("{s}", self.subdomains[0] if self.subdomains
                                                  else "")).hostname or "?"
        self.tile_size = int(tile_size)
        self.min_zoom, self.max_zoom = int(min_zoom), int(max_zoom)
        self.tile_matrix_set = tile_matrix_set
        self.resampling = resampling
        self.max_tiles = int(max_tiles)
        self.retries = int(retries)
        self.progress = progress
        self._bounds_lonlat = bounds_lonlat
        self.http = HTTPClient(HTTPConfig(
            user_agent=user_agent or DEFAULT_USER_AGENT, timeout=timeout, retries=retries,
            backoff=backoff, max_concurrency=max_concurrency, headers=dict(headers or {}),
            dead_after=float(dead_after)))
        self.cache = TileCache(cache_dir, url_template, cache_max_age) if cache_dir else None
        self._memory: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._memory_size = int(memory_cache_tiles)
        self._lock = threading.Lock()
        self.stats = XYZStats()
        kind = "wmts" if {"TileMatrix", "TileRow", "TileCol"} & self.placeholders else "xyz"
        self.info = SourceInfo(
            name=name or f"{kind}:{self.host}",
            kind=kind,
            attribution=attribution,
            license=license,
            native_resolution=tile_resolution(self.max_zoom, self.tile_size),
            extra={"max_zoom": self.max_zoom, "tile_size": self.tile_size,
                   "sat_type": sat_type, "host": self.host},
        )

    # -- URLs ---------------------------------------------------------------------------
    def tile_url(self, z: int, x: int, y: int) -> str:
        """URL of tile (z, x, y) in XYZ (top-left origin) numbering."""
        n = 2**z

        def sub(m: re.Match) -> str:
            key = m.group(1)
            if key in ("z", "TileMatrix"):
                return str(z)
            if key in ("x", "TileCol"):
                return str(x)
            if key in ("y", "TileRow"):
                return str(y)
            if key == "-y":
                return str(n - 1 - y)
            if key == "s":
                return self.subdomains[(x + y) % len(self.subdomains)]
            if key == "q":
                return _TMS.quadkey(morecantile.Tile(x, y, z))
            if key == "TileMatrixSet":
                return self.tile_matrix_set
            return m.group(0)  # pragma: no cover - rejected by parse_template

        return _PLACEHOLDER.sub(sub, self.template)

    # -- planning -----------------------------------------------------------------------
    def plan(self, bounds, crs, shape) -> TilePlan | None:
        """Zoom and tiles covering ``bounds`` in ``crs`` at ``shape``; None if off the map."""
        crs = CRS.from_user_input(crs)
        height, width = shape
        left, bottom, right, top = bounds
        w, s, e, n = transform_bounds(RioCRS.from_user_input(crs.to_wkt()), "EPSG:4326",
                                      left, bottom, right, top, densify_pts=21)
        s, n = max(s, -MAX_LAT), min(n, MAX_LAT)
        if s >= n:
            return None
        crosses = w > e
        res = self._requested_res(bounds, crs, shape)
        z = zoom_for_resolution(res, self.tile_size, self.min_zoom, self.max_zoom)
        ntiles = 2**z
        span = WORLD / ntiles
        x_w = math.radians(w) * 6378137.0
        x_e = math.radians(e) * 6378137.0 + (WORLD if crosses else 0.0)
        y_n = _lat_to_y(n)
        y_s = _lat_to_y(s)
        margin = 2 * span / self.tile_size  # two mosaic pixels, for the resampling kernel
        c0 = int(math.floor((x_w - margin + HALF_WORLD) / span))
        c1 = int(math.floor((x_e + margin + HALF_WORLD) / span))
        r0 = max(0, int(math.floor((HALF_WORLD - y_n - margin) / span)))
        r1 = min(ntiles - 1, int(math.floor((HALF_WORLD - y_s + margin) / span)))
        c0 = max(c0, 0)
        if not crosses:
            c1 = min(c1, ntiles - 1)
        plan = TilePlan(z, range(c0, c1 + 1), range(r0, r1 + 1), res, crosses)
        plan.tiles = [(c, r) for r in plan.rows for c in plan.cols]
        if len(plan.tiles) > self.max_tiles:
            raise ImageryError(
                f"window needs {len(plan.tiles)} tiles at zoom {z} from {self.host} "
                f"(limit {self.max_tiles}): read smaller blocks or raise max_tiles")
        return plan

    @staticmethod
    def _requested_res(bounds, crs: CRS, shape) -> float:
        """Finest 3857 pixel size the window asks for, sampled on a 3 x 3 grid of points."""
        height, width = shape
        left, bottom, right, top = bounds
        rx, ry = (right - left) / width, (top - bottom) / height
        tr = Transformer.from_crs(crs, 3857, always_xy=True)
        best = math.inf
        for fy in (0.0, 0.5, 1.0):
            for fx in (0.0, 0.5, 1.0):
                x = left + rx * (0.5 + fx * (width - 1))
                y = top - ry * (0.5 + fy * (height - 1))
                pts = tr.transform([x, x + rx, x], [y, y, y - ry])
                if not all(np.isfinite(v) for v in (*pts[0], *pts[1])):
                    continue
                (x0, x1, x2), (y0, y1, y2) = pts
                dx1 = (x1 - x0 + HALF_WORLD) % WORLD - HALF_WORLD
                dx2 = (x2 - x0 + HALF_WORLD) % WORLD - HALF_WORLD
                best = min(best, math.hypot(dx1, y1 - y0), math.hypot(dx2, y2 - y0))
        if not math.isfinite(best) or best <= 0:
            raise ImageryError(
                f"cannot place window {bounds} of {crs.to_string()} in Web Mercator: "
                "check the bounds and CRS")
        return best

    # -- fetching -----------------------------------------------------------------------
    def _memory_get(self, key):
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
            return data

    def _memory_put(self, key, data: bytes) -> None:
        if self._memory_size <= 0:
            return
        with self._lock:
            self._memory[key] = data
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_size:
                self._memory.popitem(last=False)

    def fetch_tiles(self, z: int, tiles: list[tuple[int, int]]):
        """Raw bytes per tile (``b""`` = known missing) or a fault reason string per tile."""
        n = 2**z
        out: dict[tuple[int, int], bytes | str] = {}
        todo: list[tuple[int, int]] = []
        for col, row in tiles:
            key = (z, col % n, row)
            data = self._memory_get(key)
            if data is not None:
                self.stats.memory_hits += 1
                out[(col, row)] = data
                continue
            if self.cache is not None:
                data = self.cache.get(*key)
                if data is not None:
                    self.stats.disk_hits += 1
                    out[(col, row)] = data
                    continue
            todo.append((col, row))
        if not todo:
            return out, []
        urls = [self.tile_url(z, col % n, row) for col, row in todo]
        bar = tqdm(total=len(urls), desc=f"tiles z{z}", unit="tile", disable=not self.progress,
                   leave=False)
        t0 = time.perf_counter()
        try:
            results = self.http.get_many(urls, on_done=lambda r: bar.update(1))
        finally:
            bar.close()
        self.stats.fetch_seconds += time.perf_counter() - t0
        self.stats.downloads += len(urls)
        self.stats.http_attempts += sum(r.attempts for r in results)
        for (col, row), res in zip(todo, results):
            key = (z, col % n, row)
            if res.ok:
                out[(col, row)] = res.content or b""
            elif res.status == 404:
                out[(col, row)] = b""
                if self.cache is not None:
                    self.cache.put_missing(*key)
            else:
                out[(col, row)] = _reason(res)
        return out, results

    # -- reading ------------------------------------------------------------------------
    def read(self, bounds, crs, shape) -> ImageryWindow:
        bounds, crs, height, width = check_window(bounds, crs, shape)
        data = np.zeros((3, height, width), np.uint8)
        mask = np.zeros((height, width), bool)
        plan = self.plan(bounds, crs, (height, width))
        if plan is None or not plan.tiles:
            return ImageryWindow(data, mask, bounds, crs, faults=0)
        got, results = self.fetch_tiles(plan.zoom, plan.tiles)
        self.check_alive()
        if results and all(r.unreachable for r in results) and not self.http.health.ever_answered \
                and not any(isinstance(v, bytes) and v for v in got.values()):
            err = results[0].error
            raise ImageryError(
                f"cannot reach tile server {self.host} after {self.retries + 1} tries "
                f"({type(err).__name__}: {err}): check the URL and your network, "
                "or use a local raster (--imagery PATH)")
        T = self.tile_size
        ncols, nrows = len(plan.cols), len(plan.rows)
        mosaic = np.zeros((4, nrows * T, ncols * T), np.uint8)
        bad: list[tuple[int, int]] = []  # mosaic (row, column) of tiles that failed
        reasons: Counter[str] = Counter()
        t0 = time.perf_counter()
        n = 2**plan.zoom
        for (col, row), value in got.items():
            i, j = row - plan.rows.start, col - plan.cols.start
            if isinstance(value, str):
                reasons[value] += 1
                bad.append((i, j))
                continue
            if not value:  # 404: the server has no tile there (nodata, not a fault)
                continue
            rgba = _decode(value, T)
            if rgba is None:
                reasons["corrupt image"] += 1
                bad.append((i, j))
                continue
            mosaic[:, i * T:(i + 1) * T, j * T:(j + 1) * T] = rgba
            key = (plan.zoom, col % n, row)
            self._memory_put(key, value)
            if self.cache is not None and not self.cache.path(*key).exists():
                self.cache.put(*key, value)
        self.stats.decode_seconds += time.perf_counter() - t0
        faults = sum(reasons.values())
        self.stats.tiles += len(plan.tiles)
        self.stats.faults += faults
        if faults:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(reasons.items()))
            log.warning("%d of %d tiles from %s at zoom %d failed (%s); their pixels are masked "
                        "and retried by the next run", faults, len(plan.tiles), self.host,
                        plan.zoom, detail)

        span = WORLD / n
        px = span / T
        x_left = plan.cols.start * span - HALF_WORLD
        y_top = HALF_WORLD - plan.rows.start * span
        src_crs = _MERC
        if plan.crosses_antimeridian:
            src_crs, x_left = _MERC_180, x_left - HALF_WORLD
        src_transform = Affine(px, 0.0, x_left, 0.0, -px, y_top)
        ratio = plan.requested_res / px
        resampling = self._resampling(ratio)
        out = np.zeros((4, height, width), np.uint8)
        t0 = time.perf_counter()
        reproject(
            mosaic, out,
            src_transform=src_transform, src_crs=src_crs,
            dst_transform=from_bounds(*bounds, width, height),
            dst_crs=RioCRS.from_user_input(crs.to_wkt()),
            src_alpha=4, dst_alpha=4, resampling=resampling, init_dest_nodata=True,
        )
        fault_mask = None
        if faults:
            # every output pixel the resampling kernel reaches from a failed tile: the tiles
            # grown by the kernel's reach (cubic: 2 source pixels x the downsampling ratio),
            # then each output pixel's footprint (max resampling)
            d = int(math.ceil(2 * max(ratio, 1.0))) + 2
            failed = np.zeros((1, nrows * T, ncols * T), np.uint8)
            for i, j in bad:
                failed[0, max(0, i * T - d):(i + 1) * T + d, max(0, j * T - d):(j + 1) * T + d] = 255
            hit = np.zeros((1, height, width), np.uint8)
            reproject(failed, hit, src_transform=src_transform, src_crs=src_crs,
                      dst_transform=from_bounds(*bounds, width, height),
                      dst_crs=RioCRS.from_user_input(crs.to_wkt()), resampling=Resampling.max,
                      init_dest_nodata=False)
            fault_mask = hit[0] > 0
        self.stats.warp_seconds += time.perf_counter() - t0
        mask = out[3] >= 128
        if fault_mask is not None:
            mask &= ~fault_mask
        data = out[:3]
        data[:, ~mask] = 0
        return ImageryWindow(np.ascontiguousarray(data), mask, bounds, crs, faults=faults,
                             fault_mask=fault_mask)

    def check_alive(self) -> None:
        """Raise :class:`ServerDeadError` once the server stopped answering (see
        :class:`~psm_mapping.imagery.http.ServerHealth`)."""
        health = self.http.health
        if not health.dead.is_set():
            return
        err = health.last_error
        raise ServerDeadError(
            f"tile server {self.host} stopped answering: no answer to any request for "
            f"{health.dead_after:g} s ({type(err).__name__}: {' '.join(str(err).split()) or 'no detail'}); "
            "the run stopped and no map was written; the finished pixels are kept in the store "
            "and rerunning the same command resumes once the server answers again (or wait "
            "longer: --imagery-option dead_after=SECONDS)")

    def _resampling(self, ratio: float) -> Resampling:
        if self.resampling != "auto":
            return _RESAMPLING[self.resampling]
        # cubic, like the local reader: GDAL antialiases it when downsampling (bicubic, as the spec)
        return Resampling.cubic if ratio > 1.01 else Resampling.bilinear

    def footprint_lonlat(self):
        return self._bounds_lonlat

    def identity(self) -> str:
        """The URL template and what shapes the pixels (zoom range, tile size, resampling)."""
        return (f"xyz:{self.template}|zooms={self.min_zoom}-{self.max_zoom}|tile={self.tile_size}"
                f"|resampling={self.resampling}")

    def close(self) -> None:
        self.http.close()


def _lat_to_y(lat: float) -> float:
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    return 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))


def _reason(res: FetchResult) -> str:
    if res.status is not None:
        return f"HTTP {res.status}"
    return type(res.error).__name__


def _decode(data: bytes, size: int) -> np.ndarray | None:
    """RGBA uint8 ``[4, size, size]`` from image bytes (alpha 255 where valid), None if corrupt."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (
                img.mode == "P" and "transparency" in img.info)
            img = img.convert("RGBA" if has_alpha else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(img)
    except Exception:  # PIL raises many types for bad bytes
        return None
    if arr.ndim != 3:
        return None
    out = np.empty((4, size, size), np.uint8)
    out[:3] = np.moveaxis(arr[..., :3], -1, 0)
    out[3] = np.where(arr[..., 3] >= 128, 255, 0) if arr.shape[-1] == 4 else 255
    return out
