"""XYZ / TMS / WMTS tile addressing in Web Mercator (EPSG:3857): URL templates and tile math.

:func:`parse_template` checks a URL template's placeholders, :func:`format_tile_url` fills one in,
:func:`plan_tiles` picks the zoom and the tiles covering a window. (The reader:
:mod:`psm_mapping.imagery.xyz`.)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import morecantile
import numpy as np
from pyproj import CRS, Transformer
from rasterio.crs import CRS as RioCRS
from rasterio.warp import transform_bounds

from ..errors import ImageryError

__all__ = ["HALF_WORLD", "WORLD", "MAX_LAT", "TilePlan", "parse_template", "format_tile_url",
           "zoom_for_resolution", "tile_resolution", "plan_tiles", "requested_res", "lat_to_y"]

_TMS = morecantile.tms.get("WebMercatorQuad")
#: half the width of the Web Mercator world in metres
HALF_WORLD = float(_TMS.xy_bbox.right)
WORLD = 2.0 * HALF_WORLD
MAX_LAT = 85.0511287798066
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_KNOWN = {"z", "x", "y", "-y", "s", "q", "TileMatrix", "TileRow", "TileCol", "TileMatrixSet"}


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


def format_tile_url(template: str, z: int, x: int, y: int, subdomains: list[str],
                    tile_matrix_set: str) -> str:
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
            return subdomains[(x + y) % len(subdomains)]
        if key == "q":
            return _TMS.quadkey(morecantile.Tile(x, y, z))
        if key == "TileMatrixSet":
            return tile_matrix_set
        return m.group(0)  # pragma: no cover - rejected by parse_template

    return _PLACEHOLDER.sub(sub, template)


def plan_tiles(bounds, crs, shape, tile_size: int, min_zoom: int, max_zoom: int, max_tiles: int,
               host: str) -> TilePlan | None:
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
    res = requested_res(bounds, crs, shape)
    z = zoom_for_resolution(res, tile_size, min_zoom, max_zoom)
    ntiles = 2**z
    span = WORLD / ntiles
    x_w = math.radians(w) * 6378137.0
    x_e = math.radians(e) * 6378137.0 + (WORLD if crosses else 0.0)
    y_n = lat_to_y(n)
    y_s = lat_to_y(s)
    margin = 2 * span / tile_size  # two mosaic pixels, for the resampling kernel
    c0 = int(math.floor((x_w - margin + HALF_WORLD) / span))
    c1 = int(math.floor((x_e + margin + HALF_WORLD) / span))
    r0 = max(0, int(math.floor((HALF_WORLD - y_n - margin) / span)))
    r1 = min(ntiles - 1, int(math.floor((HALF_WORLD - y_s + margin) / span)))
    c0 = max(c0, 0)
    if not crosses:
        c1 = min(c1, ntiles - 1)
    plan = TilePlan(z, range(c0, c1 + 1), range(r0, r1 + 1), res, crosses)
    plan.tiles = [(c, r) for r in plan.rows for c in plan.cols]
    if len(plan.tiles) > max_tiles:
        raise ImageryError(
            f"window needs {len(plan.tiles)} tiles at zoom {z} from {host} "
            f"(limit {max_tiles}): read smaller blocks or raise max_tiles")
    return plan


def requested_res(bounds, crs: CRS, shape) -> float:
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


def lat_to_y(lat: float) -> float:
    lat = max(-MAX_LAT, min(MAX_LAT, lat))
    return 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
