"""Result types and band naming: what every writer takes (plain arrays plus georeferencing)."""
from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import affine
import numpy as np
from pyproj import CRS, Transformer

from ..errors import InputError

BAND_KINDS = ("similarity", "uncertainty", "score")
COLORMAPS = {"similarity": "viridis", "uncertainty": "magma", "score": "viridis"}
#: the file name endings each output format writes
FORMAT_SUFFIXES = {"cog": (".tif", ".tiff"), "zarr": (".zarr",)}


@dataclass
class MapBand:
    """One output band: ``data`` float32 ``[H, W]`` (NumPy or dask), NaN = nodata."""

    name: str  # e.g. "similarity:birds chirping:z1", "uncertainty:z3"
    data: Any
    description: str  # human text naming query and zoom
    kind: str  # "similarity" | "uncertainty" | "score"
    query: str | None = None
    zoom: int | None = None

    def band_tags(self) -> dict[str, str]:
        tags = {"name": self.name, "kind": self.kind}
        if self.query is not None:
            tags["query"] = str(self.query)
        if self.zoom is not None:
            tags["zoom"] = str(int(self.zoom))
        return tags


@dataclass
class MapResult:
    """The bands of a map on one grid: ``transform`` maps pixel (col, row) to ``crs``."""

    bands: list[MapBand]
    crs: CRS
    transform: affine.Affine
    tags: dict[str, str] = field(default_factory=dict)
    region_geojson: dict | None = None  # region outline in EPSG:4326

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bands[0].data.shape) if self.bands else (0, 0)  # type: ignore[return-value]

    @property
    def lazy(self) -> bool:
        """Whether the bands hold dask arrays (then the writers work chunk by chunk)."""
        return any(hasattr(b.data, "dask") for b in self.bands)

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs``."""
        h, w = self.shape
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((0, 0), (w, 0), (0, h), (w, h))))
        return min(xs), min(ys), max(xs), max(ys)


def safe_name(name: str, taken: set[str] | None = None) -> str:
    """A variable / file name from a band name: ``[A-Za-z0-9_]``, unique within ``taken``."""
    s = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "band"
    if s[0].isdigit():
        s = "b_" + s
    if s in {"x", "y", "spatial_ref", "band"}:
        s = s + "_band"
    if taken is not None:
        base, i = s, 2
        while s in taken:
            s = f"{base}_{i}"
            i += 1
        taken.add(s)
    return s


def software_version() -> str:
    try:
        from importlib.metadata import version

        return version("psm-mapping")
    except Exception:  # not installed (e.g. running from a checkout)
        return "unknown"


def full_tags(result: MapResult) -> dict[str, str]:
    """``result.tags`` as strings plus ``software``, ``created`` and ``band_names`` unless given."""
    tags = {str(k): str(v) for k, v in result.tags.items()}
    tags.setdefault("software", f"psm-mapping {software_version()}")
    tags.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tags.setdefault("band_names", json.dumps([b.name for b in result.bands]))
    return tags


def check_result(result: MapResult) -> list:
    """Validate ``result`` and return its band arrays as float32 (dask arrays stay lazy)."""
    if not result.bands:
        raise InputError("the map has no bands: give at least one query")
    names = [b.name for b in result.bands]
    if len(set(names)) != len(names):
        raise InputError(f"band names repeat in {names}: give each query/zoom band a unique name")
    shape = result.bands[0].data.shape
    arrays = []
    for b in result.bands:
        if b.kind not in BAND_KINDS:
            raise InputError(f"band {b.name!r} has kind {b.kind!r}: use one of {BAND_KINDS}")
        a = b.data if hasattr(b.data, "dask") else np.asarray(b.data)
        if a.ndim != 2 or a.shape != shape or 0 in a.shape:
            raise InputError(f"band {b.name!r} has shape {a.shape}, expected a 2-D array like the first "
                             f"band {shape}: give all bands the grid's shape")
        arrays.append(a.astype(np.float32, copy=False))
    if result.crs is None:
        raise InputError("the map has no CRS: give MapResult.crs")
    t = result.transform
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise InputError(f"transform {tuple(t)[:6]} is not north-up: give a north-up grid transform")
    return arrays


def check_format(fmt: str) -> str:
    """``fmt`` lower-cased, if it is an output format ("cog" or "zarr")."""
    fmt = str(fmt).lower()
    if fmt not in FORMAT_SUFFIXES:
        raise InputError(f"output format {fmt!r} is unknown: use --format cog or --format zarr",
                         option="format")
    return fmt


def format_for(out: str, fmt: str | None = None) -> str:
    """The format given, else the one ``out``'s name implies (``.zarr`` -> zarr, else cog)."""
    if fmt:
        return fmt
    return "zarr" if str(out).rstrip("/").endswith(".zarr") else "cog"


def lonlat_bounds(crs: CRS, bounds: tuple[float, float, float, float]) -> tuple[float, ...]:
    """(west, south, east, north) in degrees of ``bounds`` given in ``crs`` (densified)."""
    tr = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
    return tuple(float(v) for v in tr.transform_bounds(*bounds, densify_pts=21))


def crs_label(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.name


def describe_outputs(outputs: dict) -> dict[str, str]:
    """``write_outputs``' answer as printable strings (a file list becomes its count and folder)."""
    out = {}
    for k, v in outputs.items():
        if isinstance(v, (list, tuple)):
            out[k] = f"{len(v)} files in {Path(v[0]).parent}" if v else "none"
        else:
            out[k] = str(v)
    return out


def build_map_result(maps, grid_or_store, tags: dict, region=None, score: bool = False) -> MapResult:
    """Bands per (query, zoom) plus uncertainty per zoom, NaN outside the region.

    ``maps`` is a :class:`~psm_mapping.query.QueryMaps`; ``grid_or_store`` an output grid (with
    ``crs``, ``transform`` and ``mask``) or an embedding store (its ``spec`` gives the grid)."""
    if hasattr(grid_or_store, "mask") and hasattr(grid_or_store, "transform"):
        crs, transform, mask = grid_or_store.crs, grid_or_store.transform, grid_or_store.mask
    else:
        spec = grid_or_store.spec
        crs, transform = CRS.from_wkt(spec.crs_wkt), affine.Affine(*spec.transform)
        mask = None
    bands = []
    probabilistic = any(q.embedding.logvar is not None for q in maps.queries)
    for qi, q in enumerate(maps.queries):
        sc = maps.score(qi) if score else None
        for k, z in enumerate(maps.zoom_levels):
            data = _masked(maps.similarity[qi][k], mask)
            what = "similarity (negative csd)" if probabilistic else "similarity (cosine)"
            bands.append(MapBand(f"similarity:{q.label}:z{z}", data,
                                 f"{what} to {q.kind} query '{q.label}' at zoom {z}", "similarity", q.label, z))
            if sc is not None:
                bands.append(MapBand(f"score:{q.label}:z{z}", _masked(sc[k], mask),
                                     f"0-1 score for '{q.label}' at zoom {z}", "score", q.label, z))
    if probabilistic:
        for k, z in enumerate(maps.zoom_levels):
            bands.append(MapBand(f"uncertainty:z{z}", _masked(maps.uncertainty[k], mask),
                                 f"image embedding uncertainty (std norm) at zoom {z}", "uncertainty", None, z))
    t = dict(tags)
    t["queries"] = " | ".join(f"{q.kind}:{q.label}" for q in maps.queries)
    geojson = None
    if region is not None:
        from shapely.geometry import mapping

        geojson = mapping(region.geometry)
    return MapResult(bands, crs, transform, t, geojson)


def _masked(a, mask):
    if hasattr(a, "dask") and mask is None:  # a lazy dask array (distributed runs) stays lazy
        return a.astype(np.float32)
    a = np.asarray(a, dtype=np.float32)
    return a if mask is None else np.where(mask, a, np.nan).astype(np.float32)
