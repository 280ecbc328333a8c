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

    def to_score(self, values: np.ndarray) -> np.ndarray:
        """``values`` rescaled 0..1 over the raster's range (as :meth:`score`)."""
        lo, hi = np.float32(self.lo), np.float32(self.hi)
        v = np.asarray(values, np.float32) - lo
        return v / (hi - lo) if hi > lo else v

    def tile_values(self, x: int, y: int, z: int, resampling: str = "nearest") -> np.ndarray | None:
        """float32 ``[256, 256]`` of tile ``z/x/y`` (rio-tiler's Web Mercator tiler), NaN where there
        is no data; None when the tile does not touch the raster's valid pixels."""
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
        return np.where(valid, img.array.data[0], np.nan).astype(np.float32)


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
