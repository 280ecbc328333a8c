"""Month x hour cubes as outputs: Zarr (the cube's natural home), COG (one multi-band file, or a
folder of one COG per setting), previews (``cube_preview``) and a STAC Item, staged together.

**Zarr**: per query a variable ``similarity_<query>`` (and ``score_<query>`` with ``--score``),
and ``uncertainty``, each float32 with dims ``(month, hour, zoom, y, x)`` (an axis the cube does
not have is left out). Coordinates: ``month`` (1..12, with ``month_name``), ``hour`` (0..23,
with ``hour_label`` ``"14:00"``), ``zoom`` (the chip-size multiplier), ``x``/``y`` (pixel
centres); the CRS in ``spatial_ref`` as rioxarray writes it, so
``xr.open_zarr(p).sel(month=5, hour=14, zoom=1)`` is the single-setting map's band.

Chunks: ``(1 month, every hour, 1 zoom, T, T)`` with ``T`` the multiple of 16 that makes a chunk
about 1 MiB (``T`` = 96 for 24 hours, 512 at most, the grid's size at least). So one (month,
hour) slice reads one month's chunks (24 hours at once: 24x the bytes of the slice, but one
chunk per tile, no small reads), and one pixel's whole profile reads one chunk per month and
zoom (12 x ~1 MiB), not one per setting (288). ``ds.chunk(...)`` rechunks for other uses.

**COG**: ``--out cube.tif`` is one COG whose bands are the single-setting map's bands (per query
and zoom, then uncertainty per zoom) for each setting in turn, descriptions ending
``"[month 5, hour 14]"``, band tags ``month``/``hour``; past :data:`MAX_COG_BANDS` bands it is
refused (Zarr, or the folder). ``--cube-layout folder`` writes the folder ``cube/`` (the name
without ``.tif``) of ``cube_m05_h14.tif`` (``_m05`` / ``_h14`` alone for one axis), each file a
single-setting map. The STAC Item is ``<out>.stac.json`` and the previews ``<out>.preview/``
(``<folder>.stac.json``, ``<folder>.preview/`` for the folder)."""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import CRS

from ..errors import InputError, OutputError
from .results import MapBand, MapResult, full_tags, safe_name
from .staging import Stage, is_local, local_path, raw_bytes, staged_all
from .cube_result import (CUBE_SOURCE, CubeResult, _as_map, build_cube_result, cube_tags,  # noqa: F401
                          preview_data)

#: bands past which one multi-band COG is refused (use Zarr or the folder layout)
MAX_COG_BANDS = 200
#: bytes a Zarr chunk aims at
CHUNK_BYTES = 1 << 20


def tile_side(inner: int) -> int:
    """``T``: the multiple of 16 (32..512) that makes a chunk of ``inner`` settings ~1 MiB."""
    return max(32, min(512, int(np.sqrt(CHUNK_BYTES / (4 * inner))) // 16 * 16))


def cube_chunks(result: CubeResult) -> dict[str, int]:
    """Chunk sizes per dim (see the module docstring): 1 month, every hour, 1 zoom, ``T x T``."""
    h, w = result.shape
    tile = tile_side(len(result.hours) if result.hours is not None else (len(result.months) if result.months else 1))
    out = {"zoom": 1, "y": min(h, tile), "x": min(w, tile)}
    if result.months is not None:
        out["month"] = 1 if result.hours is not None else len(result.months)
    if result.hours is not None:
        out["hour"] = len(result.hours)
    return out


def cube_dataset(result: CubeResult):
    """The xarray Dataset of a cube (see the module docstring)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    h, w = result.shape
    t = result.transform
    dims = (*result.dims, "zoom", "y", "x")
    shape = (*(len(v) for v in (result.months, result.hours) if v is not None), len(result.zoom_levels), h, w)
    coords: dict[str, Any] = {"x": ("x", t.c + (np.arange(w) + 0.5) * t.a),
                              "y": ("y", t.f + (np.arange(h) + 0.5) * t.e),
                              "zoom": ("zoom", np.asarray(result.zoom_levels, np.int32))}
    if result.months is not None:
        from .labels import MONTH_NAMES

        coords["month"] = ("month", np.asarray(result.months, np.int32))
        coords["month_name"] = ("month", np.asarray([MONTH_NAMES[m - 1] for m in result.months]))
    if result.hours is not None:
        coords["hour"] = ("hour", np.asarray(result.hours, np.int32))
        coords["hour_label"] = ("hour", np.asarray([f"{hh:02d}:00" for hh in result.hours]))
    taken: set[str] = {"month", "hour", "zoom", "month_name", "hour_label"}
    data_vars = {}
    for v in result.variables:
        var = "uncertainty" if v.kind == "uncertainty" else safe_name(v.name, taken)
        attrs = {"band_name": v.name, "description": v.description, "long_name": v.description, "kind": v.kind}
        if v.query is not None:
            attrs["query"] = str(v.query)
        if hasattr(v.data, "dask"):  # a streamed cube: written chunk by chunk
            ch = cube_chunks(result)
            data = v.data.astype(np.float32).reshape(shape).rechunk(tuple(ch[d] for d in dims))
        else:
            data = np.asarray(v.data, np.float32).reshape(shape)
        data_vars[var] = xr.DataArray(data, dims=dims, attrs=attrs)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.x.attrs.update({"axis": "X", "standard_name": "projection_x_coordinate", "units": "m",
                       "long_name": "x coordinate of pixel centre"})
    ds.y.attrs.update({"axis": "Y", "standard_name": "projection_y_coordinate", "units": "m",
                       "long_name": "y coordinate of pixel centre"})
    ds.zoom.attrs.update({"long_name": "zoom level (chip size = zoom x base tile)", "units": "1"})
    if "month" in ds.coords:
        ds.month.attrs.update({"long_name": "month of the year (fusion metadata)", "units": "1",
                               "valid_range": [1, 12]})
    if "hour" in ds.coords:
        ds.hour.attrs.update({"long_name": "hour of the day (fusion metadata)", "units": "h",
                              "valid_range": [0, 23]})
    crs = CRS.from_user_input(result.crs)
    ds = ds.rio.write_crs(crs.to_wkt(), grid_mapping_name="spatial_ref")
    ds = ds.rio.write_transform(t, grid_mapping_name="spatial_ref")
    ds = ds.rio.write_coordinate_system()
    tags = full_tags(_as_map(result))
    tags.update(cube_tags(result))
    ds.attrs.update(tags)
    ds.attrs["cube_variables"] = json.dumps(list(data_vars))
    ds.attrs["Conventions"] = "CF-1.8"
    ch = cube_chunks(result)
    for var in data_vars:
        ds[var].encoding.update({"grid_mapping": "spatial_ref", "coordinates": "spatial_ref",
                                 "_FillValue": np.float32("nan"), "chunks": tuple(ch[d] for d in dims)})
        ds[var].attrs["_CRS"] = {"wkt": crs.to_wkt()}
    return ds


# --------------------------------------------------------------------------- COG
def cog_band_count(result: CubeResult) -> int:
    return len(result.settings) * len(result.zoom_levels) * len(result.variables)


def check_cog_layout(result: CubeResult, layout: str) -> str:
    """"bands" or "folder" for ``layout`` ("auto", "bands", "folder"); past the band limit a
    multi-band COG is refused with what to do instead."""
    return check_band_limit(len(result.settings), len(result.zoom_levels), len(result.variables), layout)


def check_band_limit(settings: int, zooms: int, variables: int, layout: str) -> str:
    """:func:`check_cog_layout` from the counts (the drivers call it before any work)."""
    n = settings * zooms * variables
    if layout == "folder":
        return "folder"
    if n > MAX_COG_BANDS:
        raise OutputError(f"this cube makes {n} COG bands ({settings} settings x {zooms} zooms x {variables} "
                          f"variables), over the limit of {MAX_COG_BANDS} for one file: write --out NAME.zarr (the "
                          "cube's natural home) or pass --cube-layout folder (one COG per month/hour)",
                          option="cube_layout")
    return "bands"


def bands_result(result: CubeResult) -> MapResult:
    """All settings' single-setting bands in one MapResult, descriptions and names naming the setting."""
    bands = []
    for s in range(len(result.settings)):
        label = result.setting_text(s)
        for b in result.slice_result(s).bands:
            bands.append(dataclasses.replace(b, name=f"{b.name}:{result.setting_stem(s)}",
                                             description=f"{b.description} [{label}]"))
    tags = dict(result.tags)
    tags.update(cube_tags(result))
    return MapResult(bands, result.crs, result.transform, tags, result.region_geojson)


def folder_for(out: str | os.PathLike) -> Path:
    """``cube.tif`` -> the folder ``cube/`` of the folder layout."""
    p = local_path(out)
    return p.with_suffix("") if p.suffix.lower() in (".tif", ".tiff") else p


def folder_file(folder: Path, result: CubeResult, s: int) -> str:
    return f"{folder.name}_{result.setting_stem(s)}.tif"


# --------------------------------------------------------------------------- all outputs
def write_cube_outputs(result: CubeResult, out: str | os.PathLike, fmt: str = "zarr", layout: str = "auto",
                       previews: bool = True, overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Write the cube (Zarr, one COG, or a folder of COGs), its STAC Item and its previews, all
    staged and swapped into place together. Returns ``{"map": ..., "stac": ..., "previews":
    [...], "html": ...}`` (``"files"``: the folder's COGs)."""
    from . import cube_preview
    from .cog import write_cog_any
    from .qml import qml_path, write_qml
    from .stac import stac_path
    from .write import default_preview_dir
    from .zarr import to_zarr

    fmt = str(fmt).lower()
    if not is_local(out):
        raise OutputError(f"cube output {out} is not a local path: write it locally, then upload", option="out")
    if fmt not in ("zarr", "cog"):
        raise InputError(f"output format {fmt!r} is unknown: use --format cog or --format zarr", option="format")
    layout = check_cog_layout(result, layout) if fmt == "cog" else "zarr"
    target = folder_for(out) if layout == "folder" else local_path(out)
    stages = [Stage(target, overwrite), Stage(stac_path(target), overwrite)]
    prev = Stage(default_preview_dir(target), overwrite) if previews else None
    if prev is not None:
        stages.append(prev)
    style = Stage(qml_path(target), overwrite) if layout == "bands" else None
    if style is not None:
        stages.append(style)
    kind, vrange = first_band_range(result) if layout != "zarr" else ("similarity", None)
    files: list[str] = []
    names: list[str] = []
    arrays = [v.data for v in result.variables]

    def write() -> None:
        tmp = stages[0].tmp
        if layout == "zarr":
            to_zarr(cube_dataset(result), str(tmp))
        elif layout == "bands":
            mr = bands_result(result)
            write_cog_any(mr, [_band(b.data) for b in mr.bands], tmp)
            write_qml(style.tmp, kind, None, vrange)
        else:
            tmp.mkdir()
            for s in range(len(result.settings)):
                mr = result.slice_result(s)
                name = folder_file(target, result, s)
                write_cog_any(mr, [_band(b.data) for b in mr.bands], tmp / name)
                write_qml(qml_path(tmp / name), kind, None, vrange)
                files.append(name)
        stages[1].tmp.write_text(cube_item_json(result, target, layout, files), encoding="utf-8")
        if prev is not None:
            names.extend(cube_preview.write_cube_previews(result, prev.tmp, progress))

    staged_all(stages, write, need_bytes=raw_bytes(arrays) * (2 if layout != "zarr" else 1))
    outputs: dict[str, Any] = {"map": stages[0].dst, "stac": stages[1].dst}
    if style is not None:
        outputs["style"] = style.dst
    if files:
        outputs["files"] = [stages[0].dst / f for f in files]
    if prev is not None:
        outputs["previews"] = [prev.dst / n for n in names if not n.endswith(".html")]
        outputs["html"] = prev.dst / "index.html"
    return outputs


def _band(a):
    """A band for the COG writers: dask stays lazy (the streamed writer), else float32 NumPy."""
    return a.astype(np.float32) if hasattr(a, "dask") else np.asarray(a, np.float32)


def first_band_range(result: CubeResult) -> tuple[str, tuple[float, float]]:
    """(kind, colour range) of the band QGIS shows first in every COG of the cube (the first
    variable at the first zoom): the cube previews' one range over every setting, so the month
    and hour files of a folder share one colour scale."""
    from .cube_preview import cube_range

    sims = [v for v in result.variables if v.kind != "uncertainty"]
    v = (sims or result.variables)[0]
    return v.kind, cube_range(v.kind, preview_data(v.data)[:, 0])


# --------------------------------------------------------------------------- STAC
def cube_item_json(result: CubeResult, target: Path, layout: str, files: list[str]) -> str:
    """The STAC Item of a cube: valid area, ``proj``, ``psm:*`` provenance plus ``psm:cube``
    (dims, months, hours, how they were made), one ``data`` asset (Zarr, COG) or one asset per
    file of the folder (keyed by ``m05_h14``)."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from shapely.geometry import box, mapping, shape

    from .results import lonlat_bounds
    from .stac import PROVENANCE, _valid_geometry, item_json

    tags = full_tags(_as_map(result))
    tags.update(cube_tags(result))
    valid = np.zeros(result.shape, bool)
    for v in result.variables:
        valid |= np.asarray(np.isfinite(v.data).any(axis=(0, 1)))
    geometry = _valid_geometry(valid, result.transform, result.crs) or mapping(
        box(*lonlat_bounds(result.crs, _as_map(result).bounds())))
    try:
        created = _dt.datetime.fromisoformat(tags["created"])
    except (KeyError, ValueError):
        created = _dt.datetime.now(_dt.timezone.utc)
    props = {f"psm:{k}": tags[k] for k in PROVENANCE if k in tags}
    props["psm:queries"] = sorted({v.query for v in result.variables if v.query is not None})
    props["psm:cube"] = {"dims": [*result.dims, "zoom", "y", "x"], "months": list(result.months or []),
                         "hours": list(result.hours or []), "fixed_month": result.month, "fixed_hour": result.hour,
                         "settings": len(result.settings), "source": CUBE_SOURCE, "layout": layout}
    props["psm:variables"] = [v.name for v in result.variables]
    props["psm:tags"] = {k: v for k, v in tags.items() if k not in PROVENANCE}
    name = target.name
    item = pystac.Item(id=name, geometry=geometry, bbox=list(shape(geometry).bounds), datetime=created,
                       properties=props)
    item.common_metadata.created = created
    from .qml import qml_path
    from .stac import add_style_asset

    if layout == "folder":
        for s, f in enumerate(files):
            item.add_asset(result.setting_stem(s), pystac.Asset(
                href=f"./{name}/{f}", media_type=pystac.MediaType.COG, roles=["data"],
                title=f"soundscape map, {result.setting_text(s)}"))
            add_style_asset(item, f"{name}/{qml_path(f).name}", key=f"{result.setting_stem(s)}_style")
    else:
        media = pystac.MediaType.COG if layout == "bands" else "application/vnd+zarr"
        item.add_asset("data", pystac.Asset(href=f"./{name}", media_type=media, roles=["data"],
                                            title=f"soundscape cube ({'COG' if layout == 'bands' else 'Zarr'})"))
        if layout == "bands":
            add_style_asset(item, qml_path(name).name)
    epsg = result.crs.to_epsg()
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        epsg=epsg, wkt2=None if epsg else result.crs.to_wkt("WKT2_2019"), shape=list(result.shape),
        transform=list(result.transform)[:6])
    return item_json(item)
