"""Field observations: a table or point file -> :class:`Observations` (sites, outcome, kind).

Coordinates are read as ``psm-map points`` reads sites (:mod:`psm_mapping.places.sites`: any CRS
for vector files; CSV columns ``lon``/``longitude``/``decimalLongitude`` ... ``lat``/``latitude``/
``decimalLatitude``), plus CSV ``x``/``y`` columns: degrees, or in the CRS ``crs`` names.

The outcome: ``column`` when given; else Darwin Core ``occurrenceStatus`` (present / absent);
else ``individualCount`` (0 = absent); else every row is a presence. The kind, unless set:
present/absent-like values (present, absent, yes, no, true, false, 1, 0, detected, not
detected) -> ``presence-absence`` (or ``presence-only`` when none is absent); other numbers ->
``numeric``. Rows with an empty outcome are left out and counted.

Event time: with an ``eventDate`` column (ISO 8601, Darwin Core) each site gets its month and, when
the date has a time of day, its hour (the clock time as written: Darwin Core records local time
with an optional offset, and PSM's hour is local time). An interval (``a/b``) gives its month only
when both ends fall in the same month, its hour only when both ends share the hour. A site's own
``month``/``hour`` column values win.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError

__all__ = ["Observations", "load_observations", "KINDS", "PRESENT", "ABSENT", "file_sha256"]

KINDS = ("auto", "presence-absence", "presence-only", "numeric")
PRESENT = {"present", "presence", "yes", "y", "true", "t", "1", "1.0", "detected", "detection"}
ABSENT = {"absent", "absence", "no", "n", "false", "f", "0", "0.0", "not detected", "undetected",
          "nondetection", "non-detection"}
_ISO = re.compile(r"^\s*(\d{4})-(\d{2})(?:-(\d{2}))?(?:[T ](\d{2})(?::\d{2})?)?")


@dataclass
class Observations:
    """Sites with an outcome: ``sites`` (:class:`~psm_mapping.places.Sites`, only rows with an
    outcome), ``value`` float64 (1/0 for presence-absence, 1 for presence-only, numbers),
    ``rows`` the 0-based input row of each site, ``kind``, the ``column`` read (None: every row a
    presence), ``dropped`` rows without an outcome, the input ``path`` and its ``sha256``,
    ``event_time`` whether month/hour came from ``eventDate``."""

    sites: object
    value: np.ndarray
    rows: np.ndarray
    kind: str
    column: str | None
    n_rows: int
    dropped: int = 0
    path: str | None = None
    sha256: str | None = None
    event_time: bool = False

    @property
    def present(self) -> np.ndarray:
        return self.value > 0


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _col(frame, name: str):
    low = {str(c).strip().lower(): c for c in frame.columns}
    return low.get(name.lower())


def _read(path: Path, crs: str | None, name: str):
    """Sites of ``path`` (a CSV's ``x``/``y`` columns: in ``crs``, or degrees)."""
    from ..places.sites import TABLE_SUFFIXES, load_sites, sites_from_frame

    if path.suffix.lower() not in TABLE_SUFFIXES or not path.is_file() or path.stat().st_size == 0:
        return load_sites(path)
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep=None if path.suffix.lower() != ".csv" else ",", engine="python")
    except Exception:
        return load_sites(path)  # its error line
    x, y = _col(frame, "x"), _col(frame, "y")
    from ..places.sites import LAT_NAMES, LON_NAMES

    named = any(_col(frame, n) for n in LON_NAMES + LAT_NAMES)
    if crs is None and (named or x is None or y is None):
        return sites_from_frame(frame, name=name, path=str(path))
    if x is None or y is None:
        raise InputError(f"{path}: --crs {crs} reads x/y columns, and the table has none: name them x and y",
                         option="crs")
    import geopandas as gpd

    xs = pd.to_numeric(frame[x], errors="coerce")
    ys = pd.to_numeric(frame[y], errors="coerce")
    bad = ~(np.isfinite(xs.to_numpy(float)) & np.isfinite(ys.to_numpy(float)))
    if bad.any():
        raise InputError(f"{path}: x/y is not a number in row {int(np.nonzero(bad)[0][0]) + 1}: fix it")
    try:
        gdf = gpd.GeoDataFrame(frame, geometry=gpd.points_from_xy(xs, ys), crs=crs or "EPSG:4326")
    except Exception as exc:
        raise InputError(f"--crs {crs}: not a CRS pyproj knows ({exc}): give e.g. EPSG:32633", option="crs") from None
    return sites_from_frame(gdf, name=name, path=str(path))


def _tokens(series):
    """1.0 / 0.0 / NaN (empty) per value of a present/absent-like column; None if any value is
    neither (then the caller tries numbers)."""
    out = np.full(len(series), np.nan)
    for i, v in enumerate(series.tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)) or str(v).strip() == "":
            continue
        key = str(v).strip().lower()
        if key in PRESENT or (isinstance(v, bool) and v):
            out[i] = 1.0
        elif key in ABSENT or (isinstance(v, bool) and not v):
            out[i] = 0.0
        else:
            return None
    return out


def _outcome(frame, column: str | None, kind: str, path: str):
    """``(values float64 with NaN for empty, kind, column name or None)``."""
    import pandas as pd

    n = len(frame)
    if column is not None:
        col = column if column in frame.columns else _col(frame, column)
        if col is None:
            cols = ", ".join(str(c) for c in frame.columns if str(c) != "geometry")
            raise InputError(f"{path} has no column {column!r} (columns: {cols}): pass --column with one of them",
                             option="column")
    else:
        col = _col(frame, "occurrenceStatus") or _col(frame, "individualCount")
    if col is None:
        if kind in ("presence-absence", "numeric"):
            raise InputError(f"{path}: --kind {kind} needs an outcome column: pass --column NAME "
                             "(or give occurrenceStatus / individualCount)", option="column")
        return np.ones(n), "presence-only", None
    s = frame[col]
    tok = _tokens(s)
    num = pd.to_numeric(s.where(s.astype(str).str.strip() != ""), errors="coerce").to_numpy(np.float64)
    empty = s.isna().to_numpy() | (s.astype(str).str.strip() == "").to_numpy()
    is_count = str(col).lower() == "individualcount" and column is None
    if kind == "numeric":
        bad = ~empty & ~np.isfinite(num)
        if bad.any():
            raise InputError(f"{path}: column {col!r} is not a number in row {int(np.nonzero(bad)[0][0]) + 1} "
                             f"({s.iloc[int(np.nonzero(bad)[0][0])]!r}): fix it, or choose --kind", option="column")
        return np.where(empty, np.nan, num), kind, str(col)
    if tok is None and (is_count or kind in ("presence-absence", "presence-only")):
        bad = ~empty & ~np.isfinite(num)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            raise InputError(f"{path}: column {col!r} has {s.iloc[i]!r} in row {i + 1}: use present/absent, "
                             "yes/no, 1/0 or a count", option="column")
        tok = np.where(empty, np.nan, (num > 0).astype(float))
    if tok is None:
        bad = ~empty & ~np.isfinite(num)
        if bad.any():
            i = int(np.nonzero(bad)[0][0])
            raise InputError(f"{path}: column {col!r} has {s.iloc[i]!r} in row {i + 1}, neither a number nor "
                             "present/absent: fix it, or choose another --column", option="column")
        return np.where(empty, np.nan, num), "numeric", str(col)
    if kind == "auto":
        seen = set(tok[np.isfinite(tok)].tolist())
        kind = "presence-absence" if seen == {0.0, 1.0} else "presence-only"
        if seen == {0.0}:
            raise InputError(f"{path}: column {col!r} has no presences (every value is absent): an AUC needs "
                             "presences; check the column or pass --column", option="column")
    if kind == "presence-only":
        tok = np.where(tok == 1.0, 1.0, np.nan)  # absences are not used
    return tok, kind, str(col)


def _event_time(frame, sites) -> bool:
    """Fill ``sites.month`` / ``sites.hour`` from ``eventDate`` where the site has none."""
    col = _col(frame, "eventDate")
    if col is None:
        return False
    n = len(frame)
    month, hour = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    for i, v in enumerate(frame[col].tolist()):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            continue
        if hasattr(v, "month") and hasattr(v, "hour"):  # a parsed datetime column (GeoParquet, GPKG)
            month[i], hour[i] = v.month, v.hour if (v.hour or v.minute or v.second) else -1
            continue
        ends = [_ISO.match(p) for p in str(v).split("/")]
        if not all(ends):
            continue
        ms = {(m.group(1), m.group(2)) for m in ends}
        if len(ms) == 1 and 1 <= int(ends[0].group(2)) <= 12:
            month[i] = int(ends[0].group(2))
        hs = {m.group(4) for m in ends}
        if len(ms) == 1 and len(hs) == 1 and ends[0].group(4) is not None and 0 <= int(ends[0].group(4)) <= 23:
            if len({m.group(3) for m in ends}) == 1:
                hour[i] = int(ends[0].group(4))
    sites.month = month if sites.month is None else np.where(sites.month > 0, sites.month, month)
    sites.hour = hour if sites.hour is None else np.where(sites.hour >= 0, sites.hour, hour)
    return bool((month > 0).any() or (hour >= 0).any())


def load_observations(path: str | os.PathLike, column: str | None = None, kind: str = "auto",
                      crs: str | None = None, event_time: bool = True) -> Observations:
    """Read ``path`` (see the module docstring)."""
    from ..places.sites import Sites

    if kind not in KINDS:
        raise InputError(f"--kind {kind}: choose one of {', '.join(KINDS)}", option="kind")
    p = Path(path)
    sites = _read(p, crs, p.stem)
    frame = sites.frame
    value, kind, col = _outcome(frame, column, kind, str(p))
    timed = _event_time(frame, sites) if event_time else False
    keep = np.isfinite(value)
    rows = np.nonzero(keep)[0]
    sub = frame.iloc[rows]
    pick = (lambda a: None if a is None else a[rows])
    kept = Sites(frame=sub, lon=sites.lon[rows], lat=sites.lat[rows], name=sites.name, month=pick(sites.month),
                 hour=pick(sites.hour), audio_source=pick(sites.audio_source),
                 caption_source=pick(sites.caption_source))
    return Observations(sites=kept, value=value[rows], rows=rows, kind=kind, column=col, n_rows=len(frame),
                        dropped=int((~keep).sum()), path=str(p), sha256=file_sha256(p) if p.is_file() else None,
                        event_time=timed)
