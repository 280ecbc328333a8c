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

import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

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
    _not_a_store(s)
    try:
        info = read_info(s)
    except InputError:
        raise _not_psm(s, "not a raster psm-map reads") from None
    if any(b.get("dims") for b in info.bands):
        raise InputError(f"{s} is a month x hour cube, not a map of one setting: write the map of one month/hour "
                         "with psm-map query STORE --month M --hour H --out map.tif and give that", option="map")
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

        with warnings.catch_warnings():  # zarr's consolidated-metadata notes are not the user's concern
            warnings.simplefilter("ignore")
            ds = xr.open_zarr(s, consolidated=None)
        with ds:
            arrays = [np.asarray(ds[b["variable"]].values, np.float32) for b in info.bands]
            crs, transform = CRS.from_wkt(ds.rio.crs.to_wkt()), ds.rio.transform()
    return MapBands(s, names, kinds, arrays, transform, crs, dict(info.tags))


def _not_a_store(path: str) -> None:
    """An embedding or point store given where a map is expected: say what to do with it."""
    from ..storepath import store_attrs_at

    fmt = (store_attrs_at(path) or {}).get("format", "")
    if str(fmt).startswith("psm-mapping-store/"):
        raise InputError(f"{path} is an embedding store, not a map: make a map from it with psm-map query {path} "
                         "--query TEXT --out map.tif, and give that map", option="map")
    if str(fmt).startswith("psm-mapping-points/"):
        raise InputError(f"{path} is a point store, not a map: give a map written by psm-map (.tif or .zarr)",
                         option="map")


def load_zones(path: str | os.PathLike, warn: bool = True):
    """A polygon vector file (any CRS) as a GeoDataFrame; points, lines, features without a
    geometry or an empty file are an :class:`InputError`. Invalid polygons (self-intersecting
    rings, ...) are repaired with shapely's ``make_valid`` (their polygonal part), with a warning
    (``warn``)."""
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
    empty = (gdf.geometry.isna() | gdf.geometry.is_empty).to_numpy()
    if empty.any():
        from .sites import _rows

        raise InputError(f"zones file {p} has features without a geometry ({_rows(empty)}): give each a "
                         "polygon or remove those features", option="zones")
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
    return _repair(gdf, p, warn)


def _repair(gdf, path, warn: bool):
    """Invalid polygons made valid (shapely ``make_valid``, keeping the polygonal part): a
    self-intersecting ring counts its area once, as its repaired polygon does."""
    import shapely

    bad = ~gdf.geometry.is_valid.to_numpy()
    if not bad.any():
        return gdf
    from .sites import _rows

    geoms = gdf.geometry.to_numpy().copy()
    for i in np.nonzero(bad)[0]:
        fixed = shapely.make_valid(geoms[i])
        if fixed.geom_type == "GeometryCollection":  # lines or points from collapsed parts: dropped
            parts = [g for g in fixed.geoms if g.geom_type in ("Polygon", "MultiPolygon")]
            fixed = shapely.union_all(parts) if parts else shapely.Polygon()
        geoms[i] = fixed
    gdf = gdf.copy()
    gdf[gdf.geometry.name] = gdf.geometry.__class__(geoms, crs=gdf.crs, index=gdf.index)
    if warn:
        log.warning("zones file %s has %d invalid polygon(s) (%s: self-intersecting or otherwise invalid rings): "
                    "repaired with make_valid for these statistics; fix them in the file to silence this",
                    path, int(bad.sum()), _rows(bad))
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


def _check_zones_meet_map(m: MapBands, gdf, fidx: np.ndarray, cov: np.ndarray) -> None:
    """Zones that miss the map entirely: all of them is an error (as a region off the imagery is);
    some of them a warning (their rows are empty)."""
    F = len(gdf)
    touches = np.bincount(fidx[cov > 0], minlength=F) > 0 if len(fidx) else np.zeros(F, bool)
    if touches.all():
        return
    if not touches.any():
        from ..outputs.results import lonlat_bounds

        t, (H, W) = m.transform, m.shape
        w, s_, e, n = lonlat_bounds(m.crs, (t.c, t.f + H * t.e, t.c + W * t.a, t.f))
        zw, zs, ze, zn = gdf.to_crs("EPSG:4326").total_bounds
        raise InputError(f"none of the {F} zones overlaps the map {m.path} (the map covers lon {w:.4f}..{e:.4f}, "
                         f"lat {s_:.4f}..{n:.4f}; the zones lon {zw:.4f}..{ze:.4f}, lat {zs:.4f}..{zn:.4f}): give "
                         "zones over the mapped area, or map their area first", option="zones")
    from .sites import _rows

    log.warning("%d of %d zones do not overlap the map (%s): their statistics are empty (count 0)",
                int((~touches).sum()), F, _rows(~touches))


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
    _check_zones_meet_map(m, gdf, fidx, cov)
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


def check_zones_out(zones_path, map_out, overwrite: bool = False, region=None) -> str:
    """Refuse a bad zones file, zones that all miss ``region`` (a
    :class:`~psm_mapping.region.Region`, the map's) or an existing table before a map run starts;
    the table's path."""
    from .tables import check_table_out

    gdf = load_zones(zones_path, warn=False)
    if region is not None and not gdf.to_crs("EPSG:4326").intersects(region.geometry).any():
        w, s, e, n = region.geometry.bounds
        raise InputError(f"none of the {len(gdf)} zones of {zones_path} overlaps the region (lon {w:.4f}..{e:.4f}, "
                         f"lat {s:.4f}..{n:.4f}): give zones over the region, or leave out --zones", option="zones")
    out = zones_out_path(map_out)
    check_table_out(out, overwrite)
    return out
