"""Web Mercator tiles from an in-memory raster with rio-tiler.

A :class:`Raster` is one float32 band on the store's grid (NaN = no data), written once into an
in-memory GeoTIFF (internal tiles and overviews); every tile is cut from it by rio-tiler's
``Reader.tile`` (WebMercatorQuad), rescaled, coloured and encoded as a 256 px PNG with alpha.
"""
from __future__ import annotations

import io
import threading
import warnings
from functools import lru_cache

import numpy as np
from PIL import Image
# imported once, here: rio_tiler's package imports are circular and fail when two request threads
# import it for the first time at once
import rio_tiler.io  # noqa: F401
from rio_tiler.colormap import cmap as _cmaps
from rio_tiler.errors import TileOutsideBounds
from rio_tiler.io import Reader

# rio-tiler casts NaN fill values of masked float tiles to uint8 (harmless; masked pixels stay
# transparent). Filters are process-wide: catch_warnings() is not thread-safe in a threaded server.
warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning)
warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)

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
        # open readers, reused (a rasterio dataset serves one thread at a time)
        self._readers: list = []
        self._pool_lock = threading.Lock()

    def _reader(self):
        with self._pool_lock:
            if self._readers:
                return self._readers.pop()
        return Reader(None, dataset=self._mem.open())

    def _release(self, reader) -> None:
        with self._pool_lock:
            if len(self._readers) < 4:
                self._readers.append(reader)
                return
        reader.dataset.close()

    def score(self, v: float) -> float | None:
        """``v`` rescaled 0..1 over the raster's range (as ``QueryMaps.score``)."""
        if self.lo is None or not np.isfinite(v):
            return None
        return float((np.float32(v) - np.float32(self.lo)) / np.float32(self.hi - self.lo)) if self.hi > self.lo \
            else float(np.float32(v) - np.float32(self.lo))

    def tile(self, x: int, y: int, z: int, vmin: float, vmax: float, colormap: str,
             resampling: str = "nearest") -> bytes | None:
        """The PNG of tile ``z/x/y`` (cut by rio-tiler's Web Mercator tiler); None when the tile does
        not touch the raster's valid pixels."""
        r = self._reader()
        try:
            img = r.tile(x, y, z, tilesize=TILE_SIZE, resampling_method=resampling)
        except TileOutsideBounds:
            return None
        finally:
            self._release(r)
        valid = ~np.ma.getmaskarray(img.array)[0] & np.isfinite(img.array.data[0])
        if not valid.any():
            return None
        # colour it as rio-tiler's rescale + colormap would, with one lookup table, and encode the
        # PNG with light compression (tiles are small; latency matters more than bytes)
        v = np.asarray(img.array.data[0], np.float64)
        hi = vmax if vmax > vmin else vmin + 1e-6
        idx = ((np.clip(v, vmin, hi) - vmin) / (hi - vmin) * 255.0)
        idx = np.where(valid, np.nan_to_num(idx), 0).astype(np.uint8)
        rgba = lut(colormap)[idx]
        rgba[..., 3] = np.where(valid, rgba[..., 3], 0)
        buf = io.BytesIO()
        Image.fromarray(rgba, "RGBA").save(buf, format="PNG", compress_level=1)
        return buf.getvalue()


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
