"""A psm-map map (COG or Zarr) read as little as the question needs: the pixels under the sites
(COG: each internal tile that holds a site, once; Zarr: the chunks that hold one), whole bands
only for background points, a decimated band (COG overviews) for the report's picture."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["MapFile", "open_map"]


@dataclass
class MapFile:
    """A map's description: band names, kinds, query labels and zooms, grid and CRS."""

    path: str
    format: str
    names: list[str]
    kinds: list[str]
    bands: list[dict]
    transform: object  # affine.Affine
    crs: object  # pyproj.CRS
    width: int
    height: int
    tags: dict

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _band(self, name: str) -> dict:
        return self.bands[self.names.index(name)]

    def read_pixels(self, names, rows: np.ndarray, cols: np.ndarray) -> dict[str, np.ndarray]:
        """float64 values of bands ``names`` at pixels ``(rows, cols)``."""
        out = {n: np.full(len(rows), np.nan) for n in names}
        if len(rows) == 0:
            return out
        if self.format == "cog":
            import rasterio
            from rasterio.windows import Window

            with rasterio.open(self.path) as src:
                bh, bw = src.block_shapes[0]
                idx = [self._band(n)["index"] for n in names]
                tile = (rows // bh) * (-(-self.width // bw)) + cols // bw
                order = np.argsort(tile, kind="stable")
                starts = np.concatenate([[0], np.nonzero(np.diff(tile[order]))[0] + 1, [len(order)]])
                for a, b in zip(starts[:-1], starts[1:]):
                    sel = order[a:b]
                    r0, c0 = (rows[sel[0]] // bh) * bh, (cols[sel[0]] // bw) * bw
                    win = Window(c0, r0, min(bw, self.width - c0), min(bh, self.height - r0))
                    block = src.read(idx, window=win)
                    for k, n in enumerate(names):
                        out[n][sel] = block[k, rows[sel] - r0, cols[sel] - c0]
            return out
        import xarray as xr

        with xr.open_zarr(self.path, consolidated=None) as ds:
            ri, ci = xr.DataArray(rows, dims="site"), xr.DataArray(cols, dims="site")
            for n in names:
                out[n] = np.asarray(ds[self._band(n)["variable"]].isel(y=ri, x=ci).values, np.float64)
        return out

    def read_band(self, name: str) -> np.ndarray:
        """A whole band, float32 ``[H, W]``."""
        if self.format == "cog":
            import rasterio

            with rasterio.open(self.path) as src:
                return src.read(self._band(name)["index"]).astype(np.float32)
        import xarray as xr

        with xr.open_zarr(self.path, consolidated=None) as ds:
            return np.asarray(ds[self._band(name)["variable"]].values, np.float32)

    def preview(self, name: str, max_px: int = 800):
        """``(array, transform, crs)``: band ``name`` at most ``max_px`` on its longest side."""
        from affine import Affine

        step = max(1, int(np.ceil(max(self.shape) / max_px)))
        h, w = -(-self.height // step), -(-self.width // step)
        if self.format == "cog":
            import rasterio

            with rasterio.open(self.path) as src:
                a = src.read(self._band(name)["index"], out_shape=(h, w)).astype(np.float32)
        else:
            import xarray as xr

            with xr.open_zarr(self.path, consolidated=None) as ds:
                a = np.asarray(ds[self._band(name)["variable"]].values[::step, ::step], np.float32)
        sx, sy = self.width / a.shape[1], self.height / a.shape[0]
        return a, self.transform @ Affine.scale(sx, sy), self.crs


def _not_psm(path, why: str) -> InputError:
    return InputError(f"{path} is not a psm-map output ({why}): give a map written by psm-map (a .tif COG or a "
                      ".zarr map), or a store", option="map")


def open_map(path: str | os.PathLike) -> MapFile:
    """Describe a psm-map map (no pixels read); anything else is an :class:`InputError`."""
    from affine import Affine
    from pyproj import CRS

    from ..outputs.info import read_info

    s = os.fspath(path)
    if not Path(s).exists():
        raise InputError(f"map {s} does not exist: give the path of a map written by psm-map", option="map")
    try:
        info = read_info(s)
    except InputError:
        raise _not_psm(s, "not a raster psm-map reads") from None
    kinds = [b.get("kind") for b in info.bands]
    if not info.bands or any(k not in ("similarity", "score", "uncertainty") for k in kinds):
        raise _not_psm(s, "its bands carry no psm-map band kinds")
    if info.crs == "none" or any("dims" in b for b in info.bands):
        raise _not_psm(s, "it has no CRS" if info.crs == "none" else "a month x hour cube, not a map")
    if info.format == "cog":
        import rasterio

        with rasterio.open(s) as src:
            crs = CRS.from_wkt(src.crs.to_wkt())
    else:
        import rioxarray  # noqa: F401
        import xarray as xr

        with xr.open_zarr(s, consolidated=None) as ds:
            crs = CRS.from_wkt(ds.rio.crs.to_wkt())
    return MapFile(s, info.format, [b["name"] for b in info.bands], kinds, info.bands, Affine(*info.transform), crs,
                   info.width, info.height, dict(info.tags))
