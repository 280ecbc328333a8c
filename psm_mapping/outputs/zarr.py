"""The Zarr writer (local folder or any fsspec URL), chosen for xarray and QGIS/GDAL users.

Layout: one 2-D ``float32`` variable per band, dims ``(y, x)``, named from the band name with
unsafe characters replaced by ``_`` (e.g. ``similarity_birds_chirping_z1``); each variable keeps
``band_name``, ``description``, ``kind``, ``query`` and ``zoom`` in its attributes and
``grid_mapping = "spatial_ref"``; ``x``/``y`` hold pixel centres; ``spatial_ref`` carries the CRS
(CF + ``crs_wkt``) and ``GeoTransform`` as rioxarray writes them; the dataset attributes carry the
provenance tags and the band order (``band_names``, ``band_variables``, JSON lists). Metadata are
consolidated. Dask bands are written chunk by chunk."""
from __future__ import annotations

import json
import os

import numpy as np
from pyproj import CRS

from ..errors import OutputError
from .results import MapResult, check_result, full_tags, safe_name
from .staging import (FileOps, Stage, exists_error, is_local, local_path, move_aside_and_swap, raw_bytes,
                      staged_all, staged_name, write_error)


def to_dataset(result: MapResult, arrays: list | None = None):
    """The xarray Dataset written by :func:`write_zarr` (see the module docstring)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    arrays = check_result(result) if arrays is None else arrays
    h, w = arrays[0].shape
    arrays = [a.rechunk((min(h, 512), min(w, 512))) if hasattr(a, "dask") else a for a in arrays]
    t = result.transform
    x = t.c + (np.arange(w) + 0.5) * t.a
    y = t.f + (np.arange(h) + 0.5) * t.e
    taken: set[str] = set()
    data_vars = {}
    for band, arr in zip(result.bands, arrays):
        var = safe_name(band.name, taken)
        attrs = {"band_name": band.name, "description": band.description, "long_name": band.description,
                 "kind": band.kind}
        if band.query is not None:
            attrs["query"] = str(band.query)
        if band.zoom is not None:
            attrs["zoom"] = int(band.zoom)
        data_vars[var] = xr.DataArray(arr, dims=("y", "x"), attrs=attrs)
    ds = xr.Dataset(data_vars, coords={"x": ("x", x), "y": ("y", y)})
    ds.x.attrs.update({"axis": "X", "standard_name": "projection_x_coordinate", "units": "m",
                       "long_name": "x coordinate of pixel centre"})
    ds.y.attrs.update({"axis": "Y", "standard_name": "projection_y_coordinate", "units": "m",
                       "long_name": "y coordinate of pixel centre"})
    crs = CRS.from_user_input(result.crs)
    ds = ds.rio.write_crs(crs.to_wkt(), grid_mapping_name="spatial_ref")
    ds = ds.rio.write_transform(t, grid_mapping_name="spatial_ref")
    ds = ds.rio.write_coordinate_system()
    ds.attrs.update(full_tags(result))
    ds.attrs["band_variables"] = json.dumps(list(data_vars))
    ds.attrs["Conventions"] = "CF-1.8"
    for var in data_vars:
        ds[var].encoding["grid_mapping"] = "spatial_ref"  # rioxarray keeps it in encoding
        # list spatial_ref as a coordinate so plain xr.open_zarr (decode_coords=True) keeps it
        ds[var].encoding["coordinates"] = "spatial_ref"
        # GDAL's Zarr driver (QGIS) reads the CRS from this attribute
        ds[var].attrs["_CRS"] = {"wkt": crs.to_wkt()}
        ds[var].encoding.update({"_FillValue": np.float32("nan"), "chunks": (min(h, 512), min(w, 512))})
    return ds


def to_zarr(ds, target, zarr_format: int = 2) -> None:
    """``ds`` to a new Zarr at ``target`` (a path or a mapper), consolidated."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        ds.to_zarr(target, mode="w-", consolidated=True, zarr_format=zarr_format, compute=True)


def write_zarr_remote(ds, url: str, overwrite: bool, zarr_format: int = 2) -> str:
    """``ds`` to an fsspec URL: staged beside it and swapped in by :func:`move_aside_and_swap`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if fs.exists(root) and not overwrite:
        raise exists_error(url)
    parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
    tmp, old = (f"{parent}/{staged_name(name, k)}" if parent else staged_name(name, k) for k in ("tmp", "old"))
    try:
        to_zarr(ds, fs.get_mapper(tmp), zarr_format)
        move_aside_and_swap(tmp, root, old, FileOps.for_fsspec(fs))
    except BaseException as exc:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        err = None if isinstance(exc, OutputError) else write_error(exc, f"Zarr {url}")
        if err is not None:
            raise OutputError(f"{err}; for a remote URL check it and the credentials", option="out") from exc
        raise
    return url


def write_zarr(result: MapResult, path_or_url: str | os.PathLike, overwrite: bool = False,
               zarr_format: int = 2) -> str:
    """Write ``result`` as a consolidated Zarr store at a local path or any fsspec URL."""
    arrays = check_result(result)
    ds = to_dataset(result, arrays)
    if is_local(path_or_url):
        stage = Stage(local_path(path_or_url), overwrite)
        staged_all([stage], lambda: to_zarr(ds, str(stage.tmp), zarr_format), need_bytes=raw_bytes(arrays))
        return str(stage.dst)
    return write_zarr_remote(ds, os.fspath(path_or_url), overwrite, zarr_format)
