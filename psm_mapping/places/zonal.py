"""Zonal statistics of a psm-map map (COG or Zarr) per polygon of a vector file, any CRS.

Pixel coverage comes from exactextract (the exact fraction of each pixel inside each polygon; no
rasterisation here), once per zone layer; every band's statistics are then coverage-weighted over
the pixels with a value (NaN is no value). Columns per band, with the map's band name as prefix
(``<band>:<stat>``, e.g. ``similarity:birds:z1:mean``):

* ``count``       coverage-weighted number of valid pixels (a pixel half inside counts 0.5);
* ``area``        ``count`` x pixel area, in the map CRS's units squared (m² for psm-map maps);
* ``mean``        coverage-weighted mean; ``min`` / ``max`` over pixels touched with a value;
* ``median``, ``p10``, ``p90``  coverage-weighted quantiles (exactextract's definition: with equal
  weights, NumPy's default linear quantile);
* ``frac_above``  (similarity and score bands) the fraction of the valid area whose 0-1 score is
  above ``threshold`` (a similarity band's score: min-max over the map, as ``--score`` bands).

A zone outside the map (or over NaN only) gets count 0 and empty values.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

STATS = ("count", "area", "mean", "median", "min", "max", "p10", "p90")
QUANTILES = {"median": 0.5, "p10": 0.1, "p90": 0.9}


@dataclass
class MapBands:
    """A psm-map map in memory: ``arrays[i]`` float32 ``[H, W]`` named ``names[i]`` (kind ``kinds[i]``)."""

    path: str
    names: list[str]
    kinds: list[str]
    arrays: list[np.ndarray]
    transform: object  # affine.Affine
    crs: object  # pyproj.CRS
    tags: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.arrays[0].shape


def _not_psm(path, why: str) -> InputError:
    return InputError(f"{path} is not a psm-map output ({why}): give a map written by psm-map "
                      "(a .tif COG or a .zarr map)", option="map")


def read_map(path: str | os.PathLike) -> MapBands:
    """A COG or Zarr map written by psm-map (its bands carry a ``kind``); anything else is an
    :class:`InputError`."""
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
    if info.crs == "none":
        raise _not_psm(s, "it has no CRS")
    names = [b["name"] for b in info.bands]
    if info.format == "cog":
        import rasterio

        with rasterio.open(s) as src:
            arrays = [a.astype(np.float32) for a in src.read()]
            crs, transform = CRS.from_wkt(src.crs.to_wkt()), src.transform
    else:
        import rioxarray  # noqa: F401
        import xarray as xr

        with xr.open_zarr(s, consolidated=None) as ds:
            arrays = [np.asarray(ds[b["variable"]].values, np.float32) for b in info.bands]
            crs, transform = CRS.from_wkt(ds.rio.crs.to_wkt()), ds.rio.transform()
    return MapBands(s, names, kinds, arrays, transform, crs, dict(info.tags))


def load_zones(path: str | os.PathLike):
    """A polygon vector file (any CRS) as a GeoDataFrame; points, lines or an empty file are an
    :class:`InputError`."""
    import geopandas as gpd

    p = Path(path)
    if not p.exists():
        raise InputError(f"zones file {p} does not exist: check the path", option="zones")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"zones file {p} is empty: give a polygon vector file", option="zones")
    try:
        gdf = gpd.read_parquet(p) if p.suffix.lower() in (".parquet", ".geoparquet") else gpd.read_file(p)
    except Exception as exc:  # pyogrio / pyarrow errors
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {p} as a vector file ({msg}): give a GeoJSON, GPKG, Shapefile or "
                         "GeoParquet of polygons", option="zones") from None
    if not isinstance(gdf, gpd.GeoDataFrame) or gdf.geometry is None or len(gdf) == 0:
        raise InputError(f"zones file {p} has no features: give polygons", option="zones")
    kinds = set(gdf.geometry.dropna().geom_type.unique())
    if not kinds or kinds - {"Polygon", "MultiPolygon"}:
        other = ", ".join(sorted(kinds - {"Polygon", "MultiPolygon"})) or "no geometries"
        raise InputError(f"zones file {p} holds {other}, not polygons: psm-map zonal takes polygons (for "
                         "point sites use psm-map points)", option="zones")
    if gdf.crs is None:
        minx, miny, maxx, maxy = gdf.total_bounds
        if not (-180 <= minx <= maxx <= 180 and -90 <= miny <= maxy <= 90):
            raise InputError(f"zones file {p} has no CRS and its coordinates are not degrees: save it with its "
                             "CRS", option="zones")
        gdf = gdf.set_crs("EPSG:4326")
    return gdf


def _coverage(m: MapBands, zones_in_map_crs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """exactextract's pixel coverage: ``(feature index, cell index, coverage fraction)``, flat."""
    from exactextract import exact_extract
    from exactextract.raster import NumPyRasterSource

    H, W = m.shape
    t = m.transform
    xmin, ymax = t.c, t.f
    xmax, ymin = t.c + W * t.a, t.f + H * t.e
    rast = NumPyRasterSource(np.zeros((H, W), np.float32), xmin, ymin, xmax, ymax, name="cov",
                             srs_wkt=m.crs.to_wkt())
    vec = zones_in_map_crs[[zones_in_map_crs.geometry.name]].copy()
    vec["psm_fid"] = np.arange(len(vec))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        df = exact_extract(rast, vec, ["cell_id", "coverage"], include_cols=["psm_fid"], output="pandas")
    df = df.iloc[np.argsort(df["psm_fid"].to_numpy(), kind="stable")]
    fid = df["psm_fid"].to_numpy()
    cells = [np.asarray(c, np.int64) for c in df["cell_id"]]
    covs = [np.asarray(c, np.float64) for c in df["coverage"]]
    n = np.array([len(c) for c in cells])
    return (np.repeat(fid, n), np.concatenate(cells) if cells else np.zeros(0, np.int64),
            np.concatenate(covs) if covs else np.zeros(0))


def weighted_quantiles(x: np.ndarray, w: np.ndarray, qs) -> np.ndarray:
    """Quantiles ``qs`` of sorted values ``x`` with weights ``w`` (exactextract's definition; equal
    weights give NumPy's default linear quantile)."""
    qs = np.asarray(qs, np.float64)
    n = len(x)
    if n == 0:
        return np.full(len(qs), np.nan)
    if n == 1:
        return np.full(len(qs), float(x[0]))
    cum = np.cumsum(w) - w
    s = np.arange(n) * w + (n - 1) * cum
    target = qs * (n - 1) * (cum[-1] + w[-1])
    i = np.clip(np.searchsorted(s, target, side="right") - 1, 0, n - 1)
    j = np.minimum(i + 1, n - 1)
    d = s[j] - s[i]
    frac = np.where(d > 0, (target - s[i]) / np.where(d > 0, d, 1.0), 0.0)
    out = x[i] + (x[j] - x[i]) * frac
    out[i >= n - 1] = x[-1]
    return out


def weighted_quantile(x: np.ndarray, w: np.ndarray, q: float) -> float:
    """One quantile of :func:`weighted_quantiles`."""
    return float(weighted_quantiles(x, w, [q])[0])


def _band_score(m: MapBands, i: int) -> np.ndarray | None:
    """The 0-1 score behind band ``i``: itself for score bands, the map-wide min-max rescale of a
    similarity band (:meth:`QueryMaps.score`), None for uncertainty."""
    from ..query import QueryMaps

    if m.kinds[i] == "score":
        return m.arrays[i]
    if m.kinds[i] != "similarity":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return QueryMaps((0,), [], [m.arrays[i][None]], None).score(0)[0]


def zonal_stats(map_: MapBands | str | os.PathLike, zones, threshold: float = 0.5):
    """Per feature of ``zones`` (a polygon GeoDataFrame or vector file) and per band of ``map_``:
    the statistics of the module docstring. Returns the zones (attributes and geometry as given)
    with ``<band>:<stat>`` columns."""
    import geopandas as gpd

    if not 0.0 <= float(threshold) <= 1.0:
        raise InputError(f"--threshold {threshold} must be in [0, 1] (a 0-1 score)", option="threshold")
    m = map_ if isinstance(map_, MapBands) else read_map(map_)
    gdf = zones if isinstance(zones, gpd.GeoDataFrame) else load_zones(zones)
    F = len(gdf)
    fidx, cells, cov = _coverage(m, gdf.to_crs(m.crs))  # grouped by feature, in order
    bounds = np.searchsorted(fidx, np.arange(F + 1), "left")
    t = m.transform
    pixel_area = abs(t.a * t.e - t.b * t.d)
    qs = list(QUANTILES.values())
    cols: dict[str, np.ndarray] = {}
    for i, name in enumerate(m.names):
        v = m.arrays[i].reshape(-1)[cells].astype(np.float64)
        ok = np.isfinite(v)
        w = np.where(ok, cov, 0.0)
        x0 = np.where(ok, v, 0.0)
        count = np.bincount(fidx, weights=w, minlength=F)
        empty = count <= 0
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(empty, np.nan, np.bincount(fidx, weights=w * x0, minlength=F) / count)
        res = {s: np.full(F, np.nan) for s in ("min", "max", *QUANTILES)}
        for j in np.nonzero(~empty)[0]:
            a, b = bounds[j], bounds[j + 1]
            sel = ok[a:b]
            x, ww = v[a:b][sel], cov[a:b][sel]
            o = np.argsort(x, kind="stable")
            x, ww = x[o], ww[o]
            res["min"][j], res["max"][j] = x[0], x[-1]
            for s, val in zip(QUANTILES, weighted_quantiles(x, ww, qs)):
                res[s][j] = val
        out = {"count": count, "area": count * pixel_area, "mean": mean, **res}
        score = _band_score(m, i)
        if score is not None:
            above = score.reshape(-1)[cells] > threshold  # NaN: not above
            with np.errstate(invalid="ignore", divide="ignore"):
                frac = np.bincount(fidx, weights=w * above, minlength=F) / count
            frac[empty] = np.nan
            out["frac_above"] = frac
        for s in (*STATS, "frac_above"):
            if s in out:
                cols[f"{name}:{s}"] = out[s]
    taken = [c for c in cols if c in gdf.columns]
    if taken:
        raise InputError(f"the zones already have columns {', '.join(taken[:3])}: rename them", option="zones")
    stats = gpd.pd.DataFrame(cols, index=gdf.index)
    table = gpd.GeoDataFrame(gpd.pd.concat([gdf.drop(columns=gdf.geometry.name), stats], axis=1),
                             geometry=gdf.geometry, crs=gdf.crs)
    table.attrs["psm:geometry_in_csv"] = True
    return table


def zonal_provenance(m: MapBands, zones_path, threshold: float) -> dict:
    """What a zonal table came from: the map's provenance tags plus the zonal settings."""
    import datetime as dt

    return {**{k: v for k, v in m.tags.items()}, "zonal_map": str(m.path), "zonal_zones": str(zones_path),
            "zonal_threshold": threshold, "zonal_coverage": "exactextract (exact pixel coverage fractions)",
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "columns": {"<band>:count": "coverage-weighted number of valid pixels",
                        "<band>:area": "count x pixel area (map CRS units squared)",
                        "<band>:mean|median|p10|p90": "coverage-weighted (exactextract's quantile definition)",
                        "<band>:min|max": "over pixels touched with a value",
                        "<band>:frac_above": f"fraction of the valid area with a 0-1 score above {threshold:g}"}}


def write_zonal(map_path, zones_path, out, threshold: float = 0.5, overwrite: bool = False) -> dict:
    """:func:`zonal_stats` of two files, written to ``out`` (by suffix) with provenance."""
    from .tables import check_table_out, write_table

    check_table_out(out, overwrite)
    m = read_map(map_path)
    gdf = load_zones(zones_path)
    table = zonal_stats(m, gdf, threshold)
    return write_table(table, out, zonal_provenance(m, zones_path, threshold), overwrite)


def zones_out_path(map_out) -> str:
    """Where ``psm-map REGION --zones ZONES`` writes the table: ``<out>.zonal.csv``."""
    return str(map_out).rstrip("/") + ".zonal.csv"


def check_zones_out(zones_path, map_out, overwrite: bool = False) -> str:
    """Refuse a bad zones file or an existing table before a map run starts; the table's path."""
    from .tables import check_table_out

    load_zones(zones_path)
    out = zones_out_path(map_out)
    check_table_out(out, overwrite)
    return out
