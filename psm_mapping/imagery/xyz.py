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

import logging
import math
import time
from collections import Counter
from urllib.parse import urlsplit

import numpy as np
from affine import Affine
from rasterio.crs import CRS as RioCRS
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.warp import reproject

from ..errors import ImageryError
from .base import ImagerySource, ImageryWindow, SourceInfo, check_window
from .cache import TileCache
from .http import DEFAULT_USER_AGENT, HTTPClient, HTTPConfig
from .xyz_fetch import TileFetcher, XYZStats, decode_tile
from .xyz_tiles import (HALF_WORLD, MAX_LAT, WORLD, TilePlan, format_tile_url, parse_template,
                        plan_tiles, requested_res, tile_resolution, zoom_for_resolution)

__all__ = ["XYZSource", "XYZStats", "TilePlan", "parse_template", "zoom_for_resolution",
           "tile_resolution", "HALF_WORLD", "WORLD", "MAX_LAT"]

log = logging.getLogger(__name__)

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
        self.fetcher = TileFetcher(self.http, self.cache, self.tile_url, self.host,
                                   memory_cache_tiles, progress)
        self.stats = self.fetcher.stats
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
    # -- URLs and planning (:mod:`.xyz_tiles`) --------------------------------------------
    def tile_url(self, z: int, x: int, y: int) -> str:
        """URL of tile (z, x, y) in XYZ (top-left origin) numbering."""
        return format_tile_url(self.template, z, x, y, self.subdomains, self.tile_matrix_set)

    def plan(self, bounds, crs, shape) -> TilePlan | None:
        """Zoom and tiles covering ``bounds`` in ``crs`` at ``shape``; None if off the map."""
        return plan_tiles(bounds, crs, shape, self.tile_size, self.min_zoom, self.max_zoom,
                          self.max_tiles, self.host)

    _requested_res = staticmethod(requested_res)

    # -- fetching (:mod:`.xyz_fetch`) ---------------------------------------------------
    def fetch_tiles(self, z: int, tiles: list[tuple[int, int]]):
        """Raw bytes per tile (``b""`` = known missing) or a fault reason string per tile."""
        return self.fetcher.fetch(z, tiles)

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
            rgba = decode_tile(value, T)
            if rgba is None:
                reasons["corrupt image"] += 1
                bad.append((i, j))
                continue
            mosaic[:, i * T:(i + 1) * T, j * T:(j + 1) * T] = rgba
            self.fetcher.keep((plan.zoom, col % n, row), value)
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
        self.fetcher.check_alive()

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
