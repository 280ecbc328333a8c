"""``psm-map info``: what a map file (COG/GeoTIFF or Zarr) holds."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from pyproj import CRS

from ..errors import InputError
from .results import crs_label, lonlat_bounds
from .staging import is_local, local_path


@dataclass
class MapInfo:
    """What a map file holds (``psm-map info``)."""

    path: str
    format: str  # "cog" | "zarr"
    width: int
    height: int
    crs: str  # e.g. "EPSG:32633"
    transform: tuple[float, ...]  # affine a, b, c, d, e, f
    bounds_lonlat: tuple[float, float, float, float] | None
    bands: list[dict[str, Any]]  # name, description, kind, query, zoom, valid_fraction?
    tags: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)  # compression, blocksize, overviews...

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
            "transform": list(self.transform),
            "bounds_lonlat": list(self.bounds_lonlat) if self.bounds_lonlat else None,
            "bands": self.bands,
            "tags": self.tags,
            **self.extra,
        }

    def summary(self) -> str:
        a, _, c, _, e, f = self.transform
        lines = [
            f"{self.path} ({self.format}): {self.width} x {self.height} px, {self.crs}, "
            f"pixel {abs(a):g} x {abs(e):g}, origin ({c:.3f}, {f:.3f})",
        ]
        if self.bounds_lonlat:
            w, s, e_, n = self.bounds_lonlat
            lines.append(f"  lon/lat bounds: W {w:.6f} S {s:.6f} E {e_:.6f} N {n:.6f}")
        for k, v in self.extra.items():
            lines.append(f"  {k}: {v}")
        lines.append(f"  {len(self.bands)} band(s):")
        for i, b in enumerate(self.bands, 1):
            lines.append(f"    {i}. {b.get('name')}: {b.get('description', '')}")
        if self.tags:
            lines.append("  tags:")
            for k in sorted(self.tags):
                lines.append(f"    {k} = {self.tags[k]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

def _looks_like_zarr(path: str) -> bool:
    if not is_local(path):
        return True
    p = local_path(path)
    return p.is_dir() or p.suffix.lower() == ".zarr"


def read_info(path: str | os.PathLike) -> MapInfo:
    """Describe a map file (COG/GeoTIFF or Zarr): size, CRS, transform, bands, tags.
    ``info.as_dict()`` is JSON-ready; ``info.summary()`` / ``str(info)`` is printable."""
    s = os.fspath(path)
    if is_local(s) and not local_path(s).exists():
        raise InputError(f"map {s} does not exist: give the path of a map written by psm-map")
    return _zarr_info(s) if _looks_like_zarr(s) else _cog_info(s)


def _cog_info(path: str) -> MapInfo:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        src_ctx = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"cannot read map {path} ({exc}): give a GeoTIFF or Zarr map") from None
    with src_ctx as src:
        bands = []
        for i in src.indexes:
            t = src.tags(i)
            b: dict[str, Any] = {"index": i, "name": t.get("name", f"band {i}"),
                                 "description": src.descriptions[i - 1] or ""}
            for k in ("kind", "query"):
                if k in t:
                    b[k] = t[k]
            if "zoom" in t:
                b["zoom"] = int(t["zoom"])
            if "STATISTICS_VALID_PERCENT" in t:
                b["valid_percent"] = float(t["STATISTICS_VALID_PERCENT"])
            bands.append(b)
        crs = CRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        ll = lonlat_bounds(crs, tuple(src.bounds)) if crs else None
        ist = src.tags(ns="IMAGE_STRUCTURE")
        extra = {"dtype": src.dtypes[0], "nodata": src.nodata,
                 "blocksize": list(src.block_shapes[0]),
                 "compression": src.compression.name if src.compression else None,
                 "predictor": ist.get("PREDICTOR"), "overviews": src.overviews(1)}
        return MapInfo(path=path, format="cog", width=src.width, height=src.height,
                       crs=crs_label(crs) if crs else "none", transform=tuple(src.transform)[:6],
                       bounds_lonlat=ll, bands=bands, tags=dict(src.tags()), extra=extra)


def _zarr_info(path: str) -> MapInfo:
    import rioxarray  # noqa: F401
    import xarray as xr

    import warnings

    try:
        with warnings.catch_warnings():  # zarr's consolidated-metadata notes: not the user's concern
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(path, consolidated=None)
    except Exception as exc:  # zarr raises many kinds
        raise InputError(f"cannot read Zarr map {path} ({exc}): give a map written by psm-map") from None
    with ds:
        variables = json.loads(ds.attrs.get("band_variables", "null")) or json.loads(
            ds.attrs.get("cube_variables", "null")) or [v for v in ds.data_vars if set(ds[v].dims) == {"y", "x"}]
        bands = []
        for i, v in enumerate(variables, 1):
            a = ds[v].attrs
            b: dict[str, Any] = {"index": i, "variable": v, "name": a.get("band_name", v),
                                 "description": a.get("description", "")}
            for k in ("kind", "query", "zoom"):
                if k in a:
                    b[k] = a[k]
            if ds[v].ndim > 2:  # a month x hour cube's variable
                b["dims"] = dict(ds[v].sizes)
            bands.append(b)
        rcrs = ds.rio.crs
        crs = CRS.from_wkt(rcrs.to_wkt()) if rcrs else None
        transform = ds.rio.transform()
        w, h = ds.sizes["x"], ds.sizes["y"]
        bnds = (transform.c, transform.f + h * transform.e, transform.c + w * transform.a, transform.f)
        tags = {k: str(v) for k, v in ds.attrs.items() if k not in ("band_variables",)}
        return MapInfo(path=path, format="zarr", width=w, height=h,
                       crs=crs_label(crs) if crs else "none", transform=tuple(transform)[:6],
                       bounds_lonlat=lonlat_bounds(crs, bnds) if crs else None, bands=bands,
                       tags=tags, extra={"variables": variables})
