"""Values at sites: the pixel of a psm-map map (COG or Zarr) that contains each site, per band,
and background points drawn uniformly over the map's valid area.

A band to assess is a ``similarity`` band per (query, zoom) (a ``score`` band where the map has
no similarity band for that pair: the score is a monotone rescale, so every figure but Pearson's r
is the same); ``uncertainty`` bands per zoom ride along as covariates. A site outside the map's
pixels is ``outside``; on a NaN pixel (no data, too little valid imagery, a pending or failed
pixel of the store the map came from) it is ``no_value``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Band", "SiteValues", "sample_map", "draw_background"]

OUTSIDE, NO_VALUE, NO_IMAGERY = "outside", "no_value", "no_imagery"


@dataclass
class Band:
    """One band to assess: its name in the map/table, query label, zoom and kind."""

    name: str
    query: str
    zoom: int
    kind: str = "similarity"

    @property
    def label(self) -> str:
        return f"{self.query}, zoom {self.zoom}"


@dataclass
class SiteValues:
    """Values per band at the sites (``values[i]`` float64 ``[n]``, NaN where not scored) with
    the reason a site is not scored (``reasons[i]``: "" scored, "outside", "no_value",
    "no_imagery"), uncertainty per zoom (covariates), and where they came from."""

    bands: list[Band]
    values: list[np.ndarray]
    reasons: list[np.ndarray]
    uncertainty: dict[int, np.ndarray] = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    #: band name -> the map (:class:`~psm_mapping.assessment.mapread.MapFile`) under the sites in the report
    rasters: dict = field(default_factory=dict)


def pick_bands(names, kinds, queries, zooms, wanted=()) -> list[Band]:
    """The (query, zoom) bands to assess, similarity preferred; ``wanted`` query labels filter."""
    pairs: dict[tuple[str, int], Band] = {}
    for name, kind, q, z in zip(names, kinds, queries, zooms):
        if kind not in ("similarity", "score") or q is None or z is None:
            continue
        key = (str(q), int(z))
        if key not in pairs or (kind == "similarity" and pairs[key].kind == "score"):
            pairs[key] = Band(name, str(q), int(z), kind)
    bands = list(pairs.values())
    if wanted:
        missing = [w for w in wanted if not any(b.query == w for b in bands)]
        if missing:
            have = ", ".join(sorted({b.query for b in bands}))
            from ..errors import InputError

            raise InputError(f"the map has no band for query {missing[0]!r} (its queries: {have}): pass one of "
                             "them to --query, or none for all", option="queries")
        bands = [b for b in bands if b.query in wanted]
    return bands


def apply_affine(t, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``t * (x, y)`` for arrays."""
    return t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f


def _pixels(m, lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, col, inside)`` of the pixel holding each lon/lat in map ``m``."""
    from pyproj import Transformer

    x, y = Transformer.from_crs("EPSG:4326", m.crs, always_xy=True).transform(lon, lat)
    inv = ~m.transform
    col_f, row_f = apply_affine(inv, np.asarray(x), np.asarray(y))
    H, W = m.shape
    ok = np.isfinite(col_f) & np.isfinite(row_f)
    col = np.floor(np.where(ok, col_f, -1)).astype(np.int64)
    row = np.floor(np.where(ok, row_f, -1)).astype(np.int64)
    inside = ok & (row >= 0) & (row < H) & (col >= 0) & (col < W)
    return np.where(inside, row, 0), np.where(inside, col, 0), inside


def sample_map(m, lon, lat, wanted=()) -> SiteValues:
    """The values of map ``m`` (:class:`~psm_mapping.assessment.mapread.MapFile`) at the sites:
    only the tiles (COG) or chunks (Zarr) that hold a site are read."""
    bands = pick_bands(m.names, m.kinds, [b.get("query") for b in m.bands], [b.get("zoom") for b in m.bands], wanted)
    row, col, inside = _pixels(m, np.asarray(lon, np.float64), np.asarray(lat, np.float64))
    unc_names = {int(bi["zoom"]): n for n, k, bi in zip(m.names, m.kinds, m.bands)
                 if k == "uncertainty" and bi.get("zoom") is not None}
    px = m.read_pixels([b.name for b in bands] + list(unc_names.values()), row[inside], col[inside])

    def full(name):
        v = np.full(len(row), np.nan)
        v[inside] = px[name]
        return v

    values, reasons = [], []
    for b in bands:
        v = full(b.name)
        values.append(v)
        reasons.append(np.where(~inside, OUTSIDE, np.where(np.isfinite(v), "", NO_VALUE)).astype(object))
    unc = {z: full(n) for z, n in unc_names.items()}
    return SiteValues(bands, values, reasons, unc, {"kind": "map", "path": str(m.path), "format": m.format,
                                                    "crs": m.crs.to_string(), "tags": dict(m.tags)},
                      {b.name: m for b in bands})


def draw_background(m, bands: list[Band], n: int, seed: int | None):
    """``n`` points uniform over the pixels valid in every band of ``bands`` (pixels are equal
    areas of the map's projected grid; a point is uniform within its pixel): ``(lon, lat,
    values [bands, n])``."""
    from pyproj import Transformer

    from ..errors import InputError

    arrays = [m.read_band(b.name) for b in bands]
    valid = np.ones(m.shape, bool)
    for a in arrays:
        valid &= np.isfinite(a)
    flat = np.flatnonzero(valid)
    if len(flat) == 0:
        raise InputError(f"{m.path} has no valid pixel to draw background points from: give a map with values",
                         option="map")
    rng = np.random.default_rng(seed)
    pick = flat[rng.integers(0, len(flat), n)]
    row, col = np.divmod(pick, m.shape[1])
    cx, cy = apply_affine(m.transform, col + rng.random(n), row + rng.random(n))
    lon, lat = Transformer.from_crs(m.crs, "EPSG:4326", always_xy=True).transform(cx, cy)
    vals = np.stack([a[row, col].astype(np.float64) for a in arrays])
    return np.asarray(lon), np.asarray(lat), vals
