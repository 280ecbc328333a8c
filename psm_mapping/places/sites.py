"""Sites: a CSV of longitude/latitude columns, or a point vector file in any CRS -> :class:`Sites`.

Coordinate columns are found by name, case-insensitively (``lon``/``lng``/``long``/``longitude``,
``lat``/``latitude``; ``lon_col``/``lat_col`` override), so the authors' mapping CSV
(``key,latitude,longitude``) and Darwin Core exports (``decimalLatitude``, ``decimalLongitude``)
work as they are. Optional per-site metadata columns ``month``, ``hour``,
``audio_source``, ``caption_source`` feed fusion per site (an empty cell: that item unknown for
that site). Every bad value is one :class:`~psm_mapping.errors.InputError` naming the rows.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..constants import AUDIO_SOURCES, CAPTION_SOURCES, HOUR_RANGE, MONTH_RANGE
from ..errors import ImageryError, InputError

__all__ = ["Sites", "load_sites", "check_sites_on_imagery",
           "sites_from_frame", "LON_NAMES", "LAT_NAMES", "METADATA_COLUMNS"]

LON_NAMES = ("lon", "lng", "long", "longitude", "decimallongitude")  # Darwin Core: decimalLongitude
LAT_NAMES = ("lat", "latitude", "decimallatitude")
METADATA_COLUMNS = ("month", "hour", "audio_source", "caption_source")
TABLE_SUFFIXES = (".csv", ".txt", ".tsv")


@dataclass
class Sites:
    """Points to score: ``frame`` the input rows (all columns kept; a GeoDataFrame for vector
    input), ``lon``/``lat`` float64 degrees (EPSG:4326) per row, and per-site metadata arrays
    (``month`` 0 = unknown, ``hour`` -1 = unknown, sources as indices, -1 = unknown) or None
    where the column is absent."""

    frame: object  # pandas.DataFrame | geopandas.GeoDataFrame
    lon: np.ndarray
    lat: np.ndarray
    name: str = "sites"
    month: np.ndarray | None = None
    hour: np.ndarray | None = None
    audio_source: np.ndarray | None = None
    caption_source: np.ndarray | None = None

    def __len__(self) -> int:
        return int(len(self.lon))

    def unique(self) -> tuple[np.ndarray, np.ndarray]:
        """``(keys [U, 2] float64 lon/lat, inverse [N])``: each distinct location once (a
        duplicate site is embedded once)."""
        ll = np.column_stack([np.round(self.lon, 9), np.round(self.lat, 9)])
        keys, inverse = np.unique(ll, axis=0, return_inverse=True)
        return keys, inverse.reshape(-1)


def _rows(mask: np.ndarray, limit: int = 5) -> str:
    """``"rows 2, 7"`` (1-based data rows, the header not counted)."""
    idx = np.nonzero(mask)[0] + 1
    s = ", ".join(str(i) for i in idx[:limit]) + (f" and {len(idx) - limit} more" if len(idx) > limit else "")
    return ("row " if len(idx) == 1 else "rows ") + s


def _find(columns, names, override, what, path) -> str:
    if override is not None:
        if override not in columns:
            raise InputError(f"{path} has no column {override!r} (columns: {', '.join(map(str, columns))}): "
                             f"pass --{what}-col with one of them", option=f"{what}_col")
        return override
    low = {str(c).strip().lower(): c for c in columns}
    for n in names:
        if n in low:
            return low[n]
    full = {"lon": "longitude", "lat": "latitude"}[what]
    raise InputError(f"{path} has no {full} column (looked for {', '.join(names)}; columns: "
                     f"{', '.join(map(str, columns)) or 'none'}): name it, or pass --{what}-col NAME",
                     option=f"{what}_col")


def _check_unambiguous(frame, names, taken, values: np.ndarray, path, what: str) -> None:
    """Two coordinate columns by the known names (``lon`` and ``longitude``) that disagree are
    ambiguous: refused, naming ``--lon-col``/``--lat-col``. Columns that agree are one column."""
    import pandas as pd

    low = {}
    for c in frame.columns:
        low.setdefault(str(c).strip().lower(), c)
    for n in names:
        other = low.get(n)
        if other is None or other == taken:
            continue
        v = pd.to_numeric(frame[other], errors="coerce").to_numpy(np.float64)
        differ = ~np.isclose(v, values, rtol=0.0, atol=1e-9) & ~(np.isnan(v) & np.isnan(values))
        if differ.any():
            i = int(np.nonzero(differ)[0][0])
            full = {"lon": "longitude", "lat": "latitude"}[what]
            raise InputError(f"{path} has two {full} columns that disagree ({taken!r} and {other!r}, e.g. "
                             f"{values[i]:g} vs {v[i]:g} in {_rows(np.arange(len(v)) == i)}): pass --{what}-col "
                             "with the one to use", option=f"{what}_col")


def _numbers(frame, col, lo, hi, path, what) -> np.ndarray:
    import pandas as pd

    v = pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        raise InputError(f"{path}: {what} column {col!r} is not a number in {_rows(bad)}: fix those rows")
    out = (v < lo) | (v > hi)
    if out.any():
        raise InputError(f"{path}: {what} column {col!r} is out of range [{lo:g}, {hi:g}] in {_rows(out)} "
                         f"(e.g. {v[out][0]:g}): fix those rows, or name the right columns with "
                         "--lon-col/--lat-col")
    return v


def _metadata_column(frame, col, path):
    """Per-site metadata from ``col`` (case-insensitive), None when absent."""
    import pandas as pd

    low = {str(c).strip().lower(): c for c in frame.columns}
    if col not in low:
        return None
    s = frame[low[col]]
    missing = s.isna().to_numpy() | (s.astype(str).str.strip() == "").to_numpy()
    if col in ("month", "hour"):
        v = pd.to_numeric(s, errors="coerce").to_numpy(np.float64)
        (lo, hi), unknown = (MONTH_RANGE, 0) if col == "month" else (HOUR_RANGE, -1)
        bad = ~missing & (~np.isfinite(v) | (v != np.round(v)) | (v < lo) | (v > hi))
        if bad.any():
            raise InputError(f"{path}: column {col!r} must be {lo}..{hi} (or empty: unknown); not in {_rows(bad)}")
        return np.where(missing, unknown, np.nan_to_num(v)).astype(np.int64)
    names = AUDIO_SOURCES if col == "audio_source" else CAPTION_SOURCES
    lower = {k.lower(): i for k, i in names.items()}
    out = np.full(len(s), -1, np.int64)
    for i, (m, v) in enumerate(zip(missing, s.tolist())):
        if m:
            continue
        key = str(v).strip().lower()
        if key in lower:
            out[i] = lower[key]
        elif key.isdigit() and int(key) < len(names):
            out[i] = int(key)
        else:
            raise InputError(f"{path}: column {col!r} has {v!r} in {_rows(np.arange(len(s)) == i)}: use one "
                             f"of {', '.join(names)} (or leave it empty)")
    return out


def sites_from_frame(frame, lon_col: str | None = None, lat_col: str | None = None,
                     name: str = "sites", path: str = "the table") -> Sites:
    """:class:`Sites` from a (Geo)DataFrame: point geometries (any CRS) or lon/lat columns."""
    if len(frame) == 0:
        raise InputError(f"{path} has no rows: give at least one site")
    geom = getattr(frame, "geometry", None) if hasattr(frame, "crs") else None
    if geom is not None and lon_col is None and lat_col is None:
        kinds = set(geom.geom_type.dropna().unique())
        if geom.isna().any() or geom.is_empty.any():
            raise InputError(f"{path}: empty geometry in {_rows((geom.isna() | geom.is_empty).to_numpy())}: "
                             "give each site a point")
        if kinds - {"Point"}:
            raise InputError(f"{path} holds {', '.join(sorted(kinds - {'Point'}))} geometries, not points: "
                             "psm-map points takes point sites (for polygons use psm-map zonal MAP ZONES)")
        g = geom if frame.crs is None or frame.crs.equals("EPSG:4326") else geom.to_crs("EPSG:4326")
        lon, lat = g.x.to_numpy(np.float64), g.y.to_numpy(np.float64)
        bad = ~np.isfinite(lon) | ~np.isfinite(lat) | (np.abs(lat) > 90) | (np.abs(lon) > 180)
        if bad.any():
            raise InputError(f"{path}: coordinates out of range in {_rows(bad)}"
                             + ("" if frame.crs is not None else " (the file has no CRS: save it with one)"))
    else:
        lon_c = _find(frame.columns, LON_NAMES, lon_col, "lon", path)
        lat_c = _find(frame.columns, LAT_NAMES, lat_col, "lat", path)
        lon = _numbers(frame, lon_c, -180.0, 180.0, path, "longitude")
        lat = _numbers(frame, lat_c, -90.0, 90.0, path, "latitude")
        if lon_col is None:
            _check_unambiguous(frame, LON_NAMES, lon_c, lon, path, "lon")
        if lat_col is None:
            _check_unambiguous(frame, LAT_NAMES, lat_c, lat, path, "lat")
    md = {c: _metadata_column(frame, c, path) for c in METADATA_COLUMNS}
    return Sites(frame=frame, lon=lon, lat=lat, name=name, **md)


def load_sites(path: str | os.PathLike, lon_col: str | None = None, lat_col: str | None = None) -> Sites:
    """Read a CSV (or TSV) with longitude/latitude columns, or any point vector file geopandas
    reads (GeoJSON, GPKG, Shapefile, GeoParquet, FlatGeobuf), in any CRS."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"sites file {p} does not exist: check the path")
    if p.is_file() and p.stat().st_size == 0:
        raise InputError(f"sites file {p} is empty: give a CSV with lon/lat columns or a point vector file")
    name = p.stem
    if p.suffix.lower() in TABLE_SUFFIXES:
        import pandas as pd

        try:
            frame = pd.read_csv(p, sep=None if p.suffix.lower() != ".csv" else ",", engine="python")
        except Exception as exc:  # pandas.errors.EmptyDataError, ParserError, UnicodeDecodeError
            raise InputError(f"cannot read {p} as a CSV ({str(exc).splitlines()[0] if str(exc) else exc}): "
                             "give a comma-separated file with a header row") from None
        return sites_from_frame(frame, lon_col, lat_col, name, str(p))
    frame = _read_vector(p)
    return sites_from_frame(frame, lon_col, lat_col, name, str(p))


def _read_vector(p: Path):
    import geopandas as gpd

    try:
        if p.suffix.lower() in (".parquet", ".geoparquet"):
            return gpd.read_parquet(p)
        return gpd.read_file(p)
    except Exception as exc:  # pyogrio / pyarrow raise various kinds
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"cannot read {p} as a vector file ({msg}): give a CSV with lon/lat columns, or a "
                         "GeoJSON, GPKG, Shapefile or GeoParquet of points") from None


def check_sites_on_imagery(source, keys: np.ndarray, sat_type: str, zoom_levels) -> None:
    """Sites whose largest chip misses the imagery everywhere: an error, as a region off the
    imagery is (a table of empty rows helps no one). Some sites off it: their rows are empty
    (``valid`` false, counted in the run's warning)."""
    from ..constants import footprint_m

    fp = source.footprint_lonlat()
    if fp is None or len(keys) == 0:
        return
    w, s, e, n = fp
    if w > e:  # a footprint across the antimeridian: not checked here
        return
    half = footprint_m(sat_type, max(zoom_levels)) / 2
    dlat = half / 111_000.0
    dlon = dlat / np.maximum(0.05, np.cos(np.radians(np.abs(keys[:, 1]))))
    on = ((keys[:, 0] + dlon >= w) & (keys[:, 0] - dlon <= e) & (keys[:, 1] + dlat >= s) & (keys[:, 1] - dlat <= n))
    if not on.any():
        lw, ls, le, ln = keys[:, 0].min(), keys[:, 1].min(), keys[:, 0].max(), keys[:, 1].max()
        raise ImageryError(f"none of the {len(keys):,} sites is on the imagery ({source.info.name} covers lon "
                           f"{w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f}; the sites lon {lw:.4f}..{le:.4f}, lat "
                           f"{ls:.4f}..{ln:.4f}): check the sites' coordinates (lon/lat swapped?) or choose "
                           "another --imagery")
