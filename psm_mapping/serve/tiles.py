"""Web Mercator tiles from an in-memory raster with rio-tiler.

A :class:`Raster` is one float32 band on the store's grid (NaN = no data), written once into an
in-memory GeoTIFF (internal tiles and overviews); every tile is cut from it by rio-tiler's
``Reader.tile`` (WebMercatorQuad), rescaled, coloured and encoded as a 256 px PNG with alpha.
"""
from __future__ import annotations

import io
import warnings
from functools import lru_cache

import numpy as np
# imported once, here: rio_tiler's package imports are circular and fail when two request threads
# import it for the first time at once
import rio_tiler.io  # noqa: F401
from rio_tiler.colormap import cmap as _cmaps
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader

TILE_SIZE = 256
MAX_TILE_ZOOM = 24


class Raster:
    """One band in memory and as an in-memory GeoTIFF (``lo``/``hi``: its finite range)."""

    def __init__(self, data: np.ndarray, crs, transform):
        import rasterio
        from rasterio.enums import Resampling
        from rasterio.io import MemoryFile

        self.data = np.ascontiguousarray(data, dtype=np.float32)
        finite = np.isfinite(self.data)
        self.valid = int(finite.sum())
        self.lo = float(self.data[finite].min()) if self.valid else None
        self.hi = float(self.data[finite].max()) if self.valid else None
        h, w = self.data.shape
        self.crs = rasterio.crs.CRS.from_wkt(crs.to_wkt()) if hasattr(crs, "to_wkt") else crs
        self._mem = MemoryFile()
        block = 256 if min(h, w) >= 256 else None
        profile = dict(driver="GTiff", width=w, height=h, count=1, dtype="float32", crs=self.crs,
                       transform=transform, nodata=float("nan"))
        if block:
            profile.update(tiled=True, blockxsize=block, blockysize=block)
        with self._mem.open(**profile) as ds:
            ds.write(self.data, 1)
            levels = [2 ** k for k in range(1, 12) if max(h, w) / 2 ** k >= 128]
            if levels:
                ds.build_overviews(levels, Resampling.average)
        self.nbytes = int(self.data.nbytes * 2.4)  # the array, the GeoTIFF and its overviews

    def score(self, v: float) -> float | None:
        """``v`` rescaled 0..1 over the raster's range (as ``QueryMaps.score``)."""
        if self.lo is None or not np.isfinite(v):
            return None
        return float((np.float32(v) - np.float32(self.lo)) / np.float32(self.hi - self.lo)) if self.hi > self.lo \
            else float(np.float32(v) - np.float32(self.lo))

    def tile(self, x: int, y: int, z: int, vmin: float, vmax: float, colormap: str,
             resampling: str = "nearest") -> bytes | None:
        """The PNG of tile ``z/x/y``; None when the tile does not touch the raster."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with self._mem.open() as ds, Reader(None, dataset=ds) as r:
                try:
                    img = r.tile(x, y, z, tilesize=TILE_SIZE, resampling_method=resampling)
                except TileOutsideBounds:
                    return None
            if not img.mask.any():
                return None
            hi = vmax if vmax > vmin else vmin + 1e-6
            img.rescale(in_range=((vmin, hi),))
            return img.render(img_format="PNG", colormap=cmap(colormap), ZLEVEL=1)


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
