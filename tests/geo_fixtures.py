"""Helpers that write tiny synthetic geodata for tests and benchmarks (plain module: import it
after putting tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import from_origin


def write_raster(path, data: np.ndarray, crs, transform, nodata=None, overviews=(),
                 colorinterp=None, tiled: bool = True) -> Path:
    """Write ``data`` [bands, H, W] as a GeoTIFF (optionally with overviews)."""
    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    count, h, w = data.shape
    prof = dict(driver="GTiff", width=w, height=h, count=count, dtype=data.dtype.name,
                crs=crs, transform=transform, nodata=nodata)
    if tiled and h >= 256 and w >= 256:
        prof.update(tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(path, "w", **prof) as dst:
        dst.write(data)
        if colorinterp is not None:
            dst.colorinterp = colorinterp
        if overviews:
            dst.build_overviews(list(overviews), Resampling.average)
    return Path(path)


def checkerboard(h: int, w: int, square_px: float, lo: int = 0, hi: int = 255) -> np.ndarray:
    """uint8 [3, h, w] checkerboard with squares of ``square_px`` pixels (colours differ per
    band so that band order is checked too)."""
    yy, xx = np.mgrid[0:h, 0:w]
    cb = ((np.floor(yy / square_px) + np.floor(xx / square_px)) % 2).astype(bool)
    out = np.empty((3, h, w), dtype=np.uint8)
    out[0] = np.where(cb, hi, lo)
    out[1] = np.where(cb, lo, hi)
    out[2] = np.where(cb, hi // 2, lo)
    return out


def texture(h: int, w: int, seed: int = 0, smooth_px: int = 4) -> np.ndarray:
    """Smooth random uint8 RGB texture [3, h, w] (blocky noise blurred a little)."""
    rng = np.random.default_rng(seed)
    hs, ws = h // smooth_px + 2, w // smooth_px + 2
    coarse = rng.random((3, hs, ws)).astype(np.float32)
    ys = np.linspace(0, hs - 1.001, h)
    xs = np.linspace(0, ws - 1.001, w)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    a = coarse[:, y0][:, :, x0]
    b = coarse[:, y0][:, :, x0 + 1]
    c = coarse[:, y0 + 1][:, :, x0]
    d = coarse[:, y0 + 1][:, :, x0 + 1]
    v = a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx
    return np.clip(v * 255, 0, 255).astype(np.uint8)


def utm_scene(path, data: np.ndarray, res: float, origin=(500_000.0, 5_600_000.0),
              crs="EPSG:32633", **kw) -> Path:
    """A raster in UTM with its top-left corner at ``origin``."""
    return write_raster(path, data, crs, from_origin(origin[0], origin[1], res, res), **kw)


def write_vector(path, geoms, crs="EPSG:4326", names=None, driver=None) -> Path:
    """Write shapely geometries with an optional ``name`` column via geopandas."""
    import geopandas as gpd

    data = {"name": names} if names is not None else {}
    gdf = gpd.GeoDataFrame(data, geometry=list(geoms), crs=crs)
    gdf.to_file(path, driver=driver) if driver else gdf.to_file(path)
    return Path(path)


RGB = [ColorInterp.red, ColorInterp.green, ColorInterp.blue]
