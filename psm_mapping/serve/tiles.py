"""Web Mercator tiles: where a tile falls on the store's grid, the reprojection of a window's
values onto it (rasterio), and the tile encodings.

:func:`tile_target` gives a tile's window on the store's output grid and its pixel size (what
picks the store level, as rio-tiler picks a COG overview); :func:`warp_to_tile` reprojects the
window's values (cells of that level) onto the tile's 256 px Web Mercator grid; the encoders
write PNG (coloured over a range with a rio-tiler colour map, alpha where no data), a float32
GeoTIFF and TiTiler's ``.npy``.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
# imported once, here: rio_tiler's package imports are circular and fail when two request threads
# import it for the first time at once
import rio_tiler.io  # noqa: F401
import rio_tiler.utils  # noqa: F401
from rio_tiler.colormap import cmap as _cmaps

# the mean over zoom levels of a tile's all-NaN pixels. Filters are process-wide (set once at
# import): catch_warnings() is not thread-safe in a threaded server.
warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)

TILE_SIZE = 256
MAX_TILE_ZOOM = 24


@dataclass(frozen=True)
class TileTarget:
    """Where XYZ tile ``z/x/y`` falls on a store's output grid: ``rows``/``cols`` (pixel slices,
    clipped to the grid) and ``pixel_size`` (the tile's pixel in the store's CRS units, as
    rio-tiler's overview choice measures it)."""

    z: int
    x: int
    y: int
    rows: slice
    cols: slice
    pixel_size: float


def tile_target(z: int, x: int, y: int, crs, transform, height: int, width: int,
                merc_bounds: tuple[float, float, float, float]) -> TileTarget | None:
    """The part of a ``height`` x ``width`` grid (``crs``, affine ``transform``; ``merc_bounds``
    its bounds in EPSG:3857) under tile ``z/x/y``, or None when the tile misses the grid. Only the
    tile's overlap with the grid is transformed (edges densified), so world tiles work too."""
    from rasterio.warp import transform_bounds

    b = tile_bounds(z, x, y)
    ml, mb, mr, mt = merc_bounds
    il, ib, ir, it = max(b.left, ml), max(b.bottom, mb), min(b.right, mr), min(b.top, mt)
    if ir <= il or it <= ib:
        return None
    left, bottom, right, top = transform_bounds("EPSG:3857", crs, il, ib, ir, it, densify_pts=21)
    if not all(np.isfinite((left, bottom, right, top))):
        return None
    inv = ~transform
    cs, rs = zip(*(inv @ (px, py) for px, py in ((left, top), (right, top), (left, bottom), (right, bottom))))
    r0, r1 = max(0, int(np.floor(min(rs)))), min(height, int(np.ceil(max(rs))))
    c0, c1 = max(0, int(np.floor(min(cs)))), min(width, int(np.ceil(max(cs))))
    if r1 <= r0 or c1 <= c0:
        return None
    # the tile's pixel in store units: the overlap's size in the store's CRS over its size in tile pixels
    nx = (ir - il) / (b.right - b.left) * TILE_SIZE
    ny = (it - ib) / (b.top - b.bottom) * TILE_SIZE
    size = min((right - left) / nx, (top - bottom) / ny)
    return TileTarget(z, x, y, slice(r0, r1), slice(c0, c1), float(size))


def warp_to_tile(values: np.ndarray, src_transform, src_crs, z: int, x: int, y: int,
                 resampling: str = "nearest") -> np.ndarray:
    """``values`` (float32 ``[h, w]`` on ``src_transform`` in ``src_crs``, NaN: no data) reprojected
    onto tile ``z/x/y`` (256 px, EPSG:3857) with rasterio: float32, NaN where there is no data."""
    from rasterio.enums import Resampling
    from rasterio.transform import from_bounds
    from rasterio.warp import reproject

    b = tile_bounds(z, x, y)
    out = np.full((TILE_SIZE, TILE_SIZE), np.nan, np.float32)
    reproject(np.ascontiguousarray(values, np.float32), out, src_transform=src_transform, src_crs=src_crs,
              src_nodata=np.nan, dst_transform=from_bounds(b.left, b.bottom, b.right, b.top, TILE_SIZE, TILE_SIZE),
              dst_crs="EPSG:3857", dst_nodata=np.nan, resampling=getattr(Resampling, resampling), num_threads=1)
    return out


#: tile formats: extension -> media type (float formats as TiTiler serves them)
TILE_FORMATS = {"png": "image/png", "tif": "image/tiff; application=geotiff", "npy": "application/x-binary"}


def encode_png(values: np.ndarray, vmin: float, vmax: float, colormap: str) -> bytes:
    """``values`` (float ``[h, w]``, NaN: no data) coloured over ``vmin..vmax`` with ``colormap``
    as rio-tiler's rescale + colormap would (one lookup table), as an RGBA PNG (NaN transparent),
    lightly compressed (tiles are small; latency matters more than bytes)."""
    valid = np.isfinite(values)
    v = np.asarray(values, np.float64)
    hi = vmax if vmax > vmin else vmin + 1e-6
    idx = ((np.clip(v, vmin, hi) - vmin) / (hi - vmin) * 255.0)
    idx = np.where(valid, np.nan_to_num(idx), 0).astype(np.uint8)
    rgba = lut(colormap)[idx]
    rgba[..., 3] = np.where(valid, rgba[..., 3], 0)
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def tile_bounds(z: int, x: int, y: int):
    """Web Mercator (EPSG:3857) bounds of XYZ tile ``z/x/y`` (morecantile's WebMercatorQuad)."""
    import morecantile

    return morecantile.tms.get("WebMercatorQuad").xy_bounds(morecantile.Tile(x, y, z))


def encode_tif(values: np.ndarray, z: int, x: int, y: int) -> bytes:
    """``values`` as a one-band float32 GeoTIFF of tile ``z/x/y``: EPSG:3857, the tile's bounds,
    NaN nodata (rio-tiler's GTiff renderer)."""
    from rasterio.crs import CRS
    from rasterio.transform import from_bounds
    from rio_tiler.utils import render

    b = tile_bounds(z, x, y)
    h, w = values.shape
    return render(np.asarray(values, np.float32)[None], None, img_format="GTiff", crs=CRS.from_epsg(3857),
                  transform=from_bounds(b.left, b.bottom, b.right, b.top, w, h), nodata=float("nan"),
                  compress="deflate", predictor=3)


def encode_npy(values: np.ndarray) -> bytes:
    """``values`` as TiTiler's ``.npy`` (rio-tiler's NPY renderer): float32 ``[2, h, w]``, band 0
    the values (NaN: no data), band 1 the mask (255 valid, 0 no data), row 0 at the north."""
    from rio_tiler.utils import render

    v = np.asarray(values, np.float32)
    mask = np.where(np.isfinite(v), 255, 0).astype(np.float32)
    return render(v[None], mask, img_format="NPY")


@lru_cache(maxsize=None)
def lut(name: str) -> np.ndarray:
    """The colour map as a ``[256, 4]`` uint8 lookup table."""
    cm = cmap(name)
    return np.array([cm.get(i, (0, 0, 0, 0)) for i in range(256)], np.uint8)


@lru_cache(maxsize=None)
def cmap(name: str) -> dict:
    return _cmaps.get(name)


def colormap_names() -> list[str]:
    return sorted(_cmaps.list())


@lru_cache(maxsize=1)
def transparent_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (TILE_SIZE, TILE_SIZE), (0, 0, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


@lru_cache(maxsize=64)
def legend_png(name: str, width: int = 256, height: int = 12) -> bytes:
    from PIL import Image

    cm = cmap(name)
    row = np.array([cm[int(round(1 + i * 254 / max(1, width - 1)))] for i in range(width)], np.uint8)
    img = np.repeat(row[None], height, axis=0)
    buf = io.BytesIO()
    Image.fromarray(img, "RGBA").save(buf, format="PNG")
    return buf.getvalue()
