"""Local rasters: anything GDAL opens (GeoTIFF, COG, VRT, JP2, ...), in any CRS.

Reads come from the overview level closest to (and not coarser than) the requested
resolution, with cubic resampling. A request in the raster's own CRS is a resampled windowed
read (GDAL RasterIO, ~15x faster than a warp); any other CRS goes through a ``WarpedVRT``.
Both widen the cubic kernel when they downsample, so reads are antialiased (the PSM
preprocessing is a bicubic antialiased resize).

8-bit sources are used as they are. Other types are stretched linearly to 8 bit:
``(value - lo) / (hi - lo) * 255`` clipped to [0, 255] with ``stretch=(lo, hi)``; the default
is ``(0, 3000)`` for integer data (Sentinel-2 L2A surface reflectance x 10000: reflectance 0 to
0.3 is the usual true-colour range) and ``(0.0, 0.3)`` for float data (reflectance 0..1).
"""
from __future__ import annotations

import hashlib
import math
import os
import threading

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioIOError
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from rasterio.windows import Window

from ..errors import ImageryError
from .base import ImagerySource, ImageryWindow, SourceInfo, check_window

__all__ = ["LocalRasterSource", "DEFAULT_STRETCH_INT", "DEFAULT_STRETCH_FLOAT"]

DEFAULT_STRETCH_INT = (0.0, 3000.0)
DEFAULT_STRETCH_FLOAT = (0.0, 0.3)


class LocalRasterSource(ImagerySource):
    """RGB reader over a GDAL raster. ``bands`` = three 1-based band indexes (default: the
    bands labelled red/green/blue, else the first three); ``stretch`` = (lo, hi) for non-8-bit
    data; ``resampling`` = a rasterio ``Resampling`` name (default cubic)."""

    def __init__(self, path: str | os.PathLike, stretch: tuple[float, float] | None = None,
                 bands: tuple[int, int, int] | list[int] | None = None,
                 resampling: str = "cubic", use_overviews: bool = True):
        self.path = os.fspath(path)
        self._lock = threading.Lock()
        self._owner = threading.get_ident()
        self._datasets: dict = {}
        self._same_crs_cache: dict[str, bool] = {}
        try:
            src = rasterio.open(self.path)
        except RasterioIOError as exc:
            exists = os.path.exists(self.path) or "://" in self.path
            why = "is not a raster GDAL can read" if exists else "does not exist"
            raise ImageryError(f"imagery {self.path!r} {why} ({str(exc).splitlines()[0]}): "
                               "pass a GeoTIFF/COG/VRT path, xyz:URL, stac:URL or a preset "
                               "name") from None
        self._datasets[None] = src
        if src.crs is None:
            self.close()
            raise ImageryError(f"imagery {self.path!r} has no CRS: georeference it "
                               "(e.g. gdal_translate -a_srs EPSG:... -a_ullr ...)")
        self.crs = CRS.from_user_input(src.crs.to_wkt())
        self.bands = self._pick_bands(src, bands)
        self.dtype = np.dtype(src.dtypes[self.bands[0] - 1])
        if stretch is None:
            if self.dtype == np.uint8:
                self.stretch: tuple[float, float] | None = None
            elif np.issubdtype(self.dtype, np.floating):
                self.stretch = DEFAULT_STRETCH_FLOAT
            else:
                self.stretch = DEFAULT_STRETCH_INT
        else:
            lo, hi = (float(v) for v in stretch)
            if not hi > lo:
                self.close()
                raise ImageryError(f"bad stretch {stretch!r}: give (lo, hi) with hi > lo, "
                                   "e.g. --stretch 0,3000")
            self.stretch = (lo, hi)
        try:
            self.resampling = Resampling[resampling]
        except KeyError:
            self.close()
            raise ImageryError(f"unknown resampling {resampling!r}: use one of cubic, "
                               "bilinear, average, lanczos") from None
        self.use_overviews = use_overviews
        self.overviews = list(src.overviews(self.bands[0])) if use_overviews else []
        self._alpha = self._alpha_band(src)
        self.info = SourceInfo(
            name=os.path.basename(self.path.rstrip("/")) or self.path,
            kind="local",
            native_resolution=_native_resolution_m(src),
            extra={"path": self.path, "bands": list(self.bands), "crs": self.crs.to_string(),
                   "stretch": list(self.stretch) if self.stretch else None},
        )

    # ------------------------------------------------------------------ setup helpers
    def _pick_bands(self, src, bands) -> tuple[int, int, int]:
        if bands is not None:
            bands = tuple(int(b) for b in bands)
            if len(bands) != 3 or not all(1 <= b <= src.count for b in bands):
                self.close()
                raise ImageryError(f"bad bands {bands} for {self.path!r} with {src.count} "
                                   f"bands: give three 1-based indexes in 1..{src.count}")
            return bands  # type: ignore[return-value]
        ci = list(src.colorinterp)
        want = (ColorInterp.red, ColorInterp.green, ColorInterp.blue)
        if all(c in ci for c in want):
            return tuple(ci.index(c) + 1 for c in want)  # type: ignore[return-value]
        colour = [i + 1 for i, c in enumerate(ci) if c not in (ColorInterp.alpha,)]
        if len(colour) < 3:
            self.close()
            raise ImageryError(f"imagery {self.path!r} has {len(colour)} colour band(s), not "
                               "RGB: pass an RGB raster, or choose bands explicitly "
                               "(bands=(1, 1, 1) for grey)")
        return tuple(colour[:3])  # type: ignore[return-value]

    @staticmethod
    def _alpha_band(src) -> int | None:
        for i, c in enumerate(src.colorinterp):
            if c == ColorInterp.alpha:
                return i + 1
        return None

    def _dataset(self, level: int | None):
        """This thread's handle of ``level`` (GDAL handles are not shared between threads, so
        parallel readers read concurrently; call with the lock held)."""
        key = level if threading.get_ident() == self._owner else (threading.get_ident(), level)
        ds = self._datasets.get(key)
        if ds is None:
            ds = rasterio.open(self.path, overview_level=level)
            self._datasets[key] = ds
        return ds

    def _overview_level(self, bounds, crs: CRS, shape) -> int | None:
        """Coarsest overview level whose pixels are still finer than the request."""
        if not self.overviews:
            return None
        src = self._datasets[None]
        try:
            l, b, r, t = transform_bounds(crs, src.crs, *bounds, densify_pts=21)
        except Exception:
            return None
        if not all(math.isfinite(v) for v in (l, b, r, t)):
            return None
        want = min((r - l) / shape[1], (t - b) / shape[0])  # source units per output pixel
        native = max(abs(src.res[0]), abs(src.res[1]))
        level = None
        for i, f in enumerate(self.overviews):
            if native * f <= want * 1.01:
                level = i
        return level

    # ------------------------------------------------------------------ reading
    def read(self, bounds, crs, shape) -> ImageryWindow:
        (left, bottom, right, top), crs, h, w = check_window(bounds, crs, shape)
        with self._lock:
            level = self._overview_level((left, bottom, right, top), crs, (h, w))
            src = self._dataset(level)
            direct = self._is_same_grid_crs(src, crs)
        try:  # outside the lock: each thread reads through its own handle
            if direct:
                raw, mask = self._read_direct(src, (left, bottom, right, top), (h, w))
            else:
                raw, mask = self._read_warped(src, crs, (left, bottom, right, top), (h, w))
        except ImageryError:
            raise
        except Exception as exc:
            raise ImageryError(f"cannot read {self.path!r} ({str(exc).splitlines()[0]}): "
                               "check the file opens with gdalinfo and covers the "
                               "region") from None
        data = self._to_uint8(raw)
        data[:, ~mask] = 0
        return ImageryWindow(data=data, mask=mask, bounds=(left, bottom, right, top), crs=crs)

    def _is_same_grid_crs(self, src, crs: CRS) -> bool:
        """True when the request is in the raster's own (north-up) CRS: no warp needed."""
        t = src.transform
        if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
            return False
        key = crs.to_wkt()
        hit = self._same_crs_cache.get(key)
        if hit is None:
            hit = self.crs == crs
            self._same_crs_cache[key] = hit
        return hit

    def _out_dtype(self) -> str:
        return "uint8" if self.stretch is None and self.dtype == np.uint8 else "float32"

    def _read_direct(self, src, bounds, shape):
        """Resampled windowed read (GDAL RasterIO, antialiased kernels) in the raster's CRS.
        Output pixels not wholly inside the raster are masked."""
        left, bottom, right, top = bounds
        h, w = shape
        rx, ry = (right - left) / w, (top - bottom) / h
        t = src.transform
        x_min, x_max = t.c, t.c + src.width * t.a
        y_max, y_min = t.f, t.f + src.height * t.e
        eps = 1e-6
        c0 = min(max(math.ceil((x_min - left) / rx - eps), 0), w)
        c1 = min(max(math.floor((x_max - left) / rx + eps), 0), w)
        r0 = min(max(math.ceil((top - y_max) / ry - eps), 0), h)
        r1 = min(max(math.floor((top - y_min) / ry + eps), 0), h)
        raw = np.zeros((3, h, w), dtype=self._out_dtype())
        mask = np.zeros((h, w), dtype=bool)
        if c1 <= c0 or r1 <= r0:
            return raw, mask
        win = Window((left + c0 * rx - t.c) / t.a, (t.f - (top - r0 * ry)) / -t.e,
                     (c1 - c0) * rx / t.a, (r1 - r0) * ry / -t.e)
        oh, ow = r1 - r0, c1 - c0
        raw[:, r0:r1, c0:c1] = src.read(list(self.bands), window=win, out_shape=(3, oh, ow),
                                        resampling=self.resampling,
                                        out_dtype=self._out_dtype())
        if self._needs_mask(src):
            m = src.dataset_mask(window=win, out_shape=(oh, ow)) > 0
            if src.nodata is not None and self._alpha is None:
                # nodata in the RGB bands only (dataset_mask also looks at other bands)
                m = np.all(src.read_masks(list(self.bands), window=win,
                                          out_shape=(3, oh, ow)) > 0, axis=0)
            mask[r0:r1, c0:c1] = m
        else:
            mask[r0:r1, c0:c1] = True
        return raw, mask

    def _needs_mask(self, src) -> bool:
        return src.nodata is not None or self._alpha is not None or _has_mask(src)

    def _read_warped(self, src, crs: CRS, bounds, shape):
        left, bottom, right, top = bounds
        h, w = shape
        kw = {}
        if not self._needs_mask(src):
            kw["add_alpha"] = True
        transform = Affine((right - left) / w, 0.0, left, 0.0, -(top - bottom) / h, top)
        with WarpedVRT(src, crs=crs.to_wkt(), transform=transform, width=w, height=h,
                       resampling=self.resampling, **kw) as vrt:
            raw = vrt.read(indexes=list(self.bands), out_dtype=self._out_dtype())
            mask = vrt.dataset_mask() > 0
        return raw, mask

    def _to_uint8(self, raw: np.ndarray) -> np.ndarray:
        if raw.dtype == np.uint8:
            return raw
        if self.stretch is None:
            return np.clip(np.rint(raw), 0, 255).astype(np.uint8)
        lo, hi = self.stretch
        out = (raw - lo) * (255.0 / (hi - lo))
        np.nan_to_num(out, copy=False, nan=0.0)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)

    def footprint_lonlat(self):
        src = self._datasets[None]
        return tuple(transform_bounds(src.crs, "EPSG:4326", *src.bounds, densify_pts=21))

    def identity(self) -> str:
        """The content of every file behind the raster (a VRT's sources too): per file its
        size, modification time and a SHA-256 of sampled bytes (the first and last 64 KiB and
        six 64 KiB samples between them; only the first 16 KiB per file past 16 files), plus
        the read settings. At most ~8 MiB is read, whatever the raster's size: cheap on a
        10 GB VRT. Replacing or rewriting a file changes it; copying a file elsewhere with
        its time kept (``cp -p``) does not, and the store is reused."""
        src = self._datasets[None]
        try:
            files = [f for f in (src.files or [self.path]) if os.path.isfile(f)]
        except Exception:  # pragma: no cover - drivers without a file list
            files = [self.path] if os.path.isfile(self.path) else []
        h = hashlib.sha256()
        h.update(repr((list(self.bands), self.stretch, self.resampling.name,
                       self.use_overviews)).encode())
        for k, f in enumerate(files):
            st = os.stat(f)
            h.update(f"|{st.st_size}|{st.st_mtime_ns}|".encode())
            h.update(_sample_hash(f, st.st_size, full=k < 16))
        if not files:  # /vsicurl/, a URL GDAL reads: the path is the identity
            h.update(self.path.encode())
        return f"local:{h.hexdigest()[:32]}"

    def close(self) -> None:
        with self._lock:
            handles = list(self._datasets.values())
            self._datasets.clear()
        for ds in handles:
            try:
                ds.close()
            except Exception:  # pragma: no cover
                pass

    def __repr__(self) -> str:
        return f"LocalRasterSource({self.path!r}, bands={self.bands}, stretch={self.stretch})"


def _sample_hash(path: str, size: int, full: bool, block: int = 1 << 16) -> bytes:
    """SHA-256 of sampled bytes of a file (see :meth:`LocalRasterSource.identity`)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not full:
            h.update(f.read(block // 4))
            return h.digest()
        for off in sorted({0, *(int(size * k / 7) for k in range(1, 7)), max(0, size - block)}):
            f.seek(off)
            h.update(f.read(block))
    return h.digest()


def _has_mask(src) -> bool:
    from rasterio.enums import MaskFlags

    flags = src.mask_flag_enums[0] if src.mask_flag_enums else ()
    return MaskFlags.per_dataset in flags and MaskFlags.alpha not in flags


def _native_resolution_m(src) -> float | None:
    """Ground metres per pixel at the raster centre (geodesic, so any CRS works)."""
    from pyproj import Geod, Transformer

    try:
        tr = Transformer.from_crs(src.crs.to_wkt(), "EPSG:4326", always_xy=True)
        col, row = src.width / 2.0, src.height / 2.0
        pts = [src.transform @ p for p in ((col, row), (col + 1, row), (col, row + 1))]
        lon, lat = tr.transform([p[0] for p in pts], [p[1] for p in pts])
        geod = Geod(ellps="WGS84")
        _, _, dx = geod.inv(lon[0], lat[0], lon[1], lat[1])
        _, _, dy = geod.inv(lon[0], lat[0], lon[2], lat[2])
        res = math.sqrt(dx * dy)
        return res if math.isfinite(res) and res > 0 else None
    except Exception:  # pragma: no cover - exotic CRS
        return None
