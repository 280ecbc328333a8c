"""Regions: a vector file (any CRS, one or many features) or a lon/lat bbox -> a geometry
in EPSG:4326.

A region that crosses the antimeridian is stored as parts on both sides of +-180 degrees
(RFC 7946 style); :attr:`Region.crosses_antimeridian` tells, and :meth:`Region.unwrapped`
gives one geometry with longitudes shifted past 180 for centroids and projections.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from .errors import RegionError

__all__ = ["Region", "load_region", "parse_bbox", "region_from_bbox"]

#: columns tried, in order, when a feature is chosen by name
NAME_COLUMNS = ("name", "NAME", "Name", "name_en", "NAME_EN", "label", "title", "id", "ID")


@dataclass
class Region:
    """An area to map: ``geometry`` (Polygon / MultiPolygon) in EPSG:4326 lon/lat degrees."""

    geometry: BaseGeometry
    name: str = "region"

    @property
    def crosses_antimeridian(self) -> bool:
        """True when the geometry has parts touching both +180 and -180 degrees."""
        w, _, e, _ = self.geometry.bounds
        if e - w <= 180.0:
            return False
        line_e = shapely.LineString([(180.0, -90.0), (180.0, 90.0)])
        line_w = shapely.LineString([(-180.0, -90.0), (-180.0, 90.0)])
        return bool(self.geometry.intersects(line_e) and self.geometry.intersects(line_w))

    def unwrapped(self) -> BaseGeometry:
        """The geometry with longitudes < 0 shifted by +360 when it crosses the antimeridian,
        so that it is one connected shape (longitudes then run past 180)."""
        if not self.crosses_antimeridian:
            return self.geometry
        return shapely.transform(
            self.geometry, lambda xy: _shift_negative_lon(xy)
        ).buffer(0)

    def centroid_lonlat(self) -> tuple[float, float]:
        """(lon, lat) of the centroid, longitude wrapped to [-180, 180)."""
        c = self.unwrapped().centroid
        return (wrap_lon(c.x), c.y)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(west, south, east, north); west > east when it crosses the antimeridian."""
        if self.crosses_antimeridian:
            w, s, e, n = self.unwrapped().bounds
            return (wrap_lon(w), s, wrap_lon(e), n)
        return tuple(self.geometry.bounds)  # type: ignore[return-value]

    def __repr__(self) -> str:
        w, s, e, n = self.bounds
        return f"Region({self.name!r}, bounds=({w:.5f}, {s:.5f}, {e:.5f}, {n:.5f}))"


def _shift_negative_lon(xy):
    xy = xy.copy()
    neg = xy[:, 0] < 0
    xy[neg, 0] += 360.0
    return xy


def wrap_lon(lon):
    """Longitude(s) in degrees into [-180, 180) (a float or an array)."""
    if isinstance(lon, (int, float)):
        return ((lon + 180.0) % 360.0) - 180.0
    return ((np.asarray(lon, dtype=np.float64) + 180.0) % 360.0) - 180.0


def parse_bbox(text: str | tuple | list) -> tuple[float, float, float, float]:
    """Parse ``"W,S,E,N"`` (degrees) into a tuple; W > E means crossing the antimeridian."""
    if isinstance(text, str):
        parts = [p for p in text.replace(" ", ",").split(",") if p]
    else:
        parts = list(text)
    try:
        vals = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise RegionError(f"bad --bbox {text!r}: give four numbers W,S,E,N in degrees, "
                          "e.g. --bbox 2.29,48.85,2.31,48.87") from None
    if len(vals) != 4 or not all(math.isfinite(v) for v in vals):
        raise RegionError(f"bad --bbox {text!r}: give four numbers W,S,E,N in degrees, "
                          "e.g. --bbox 2.29,48.85,2.31,48.87")
    w, s, e, n = vals
    if not (-180 <= w <= 180 and -180 <= e <= 180 and -90 <= s <= 90 and -90 <= n <= 90):
        raise RegionError(f"--bbox {text!r} is out of range: longitudes must be in [-180, 180] "
                          "and latitudes in [-90, 90] (order W,S,E,N)")
    if s >= n:
        raise RegionError(f"--bbox {text!r} is empty: south must be below north (order W,S,E,N)")
    if w == e:
        raise RegionError(f"--bbox {text!r} is empty: west equals east (order W,S,E,N)")
    return vals  # type: ignore[return-value]


def region_from_bbox(bbox, name: str | None = None) -> Region:
    """A :class:`Region` from a W,S,E,N bbox in degrees (string or 4 numbers)."""
    w, s, e, n = parse_bbox(bbox)
    if w < e:
        geom: BaseGeometry = box(w, s, e, n)
    else:  # crosses the antimeridian: two parts, one on each side
        geom = MultiPolygon([box(w, s, 180.0, n), box(-180.0, s, e, n)])
    return Region(geom, name or f"bbox({w:g},{s:g},{e:g},{n:g})")


def load_region(path: str | os.PathLike | None = None, bbox=None,
                feature: str | int | None = None) -> Region:
    """Load a region from a vector file (union of all features, or the one ``feature``
    chosen by name or index) or from a ``bbox`` W,S,E,N in degrees."""
    if path is None and bbox is None:
        raise RegionError("no region given: pass exactly one of a region file or --bbox W,S,E,N")
    if path is not None and bbox is not None:
        raise RegionError("both a region file and --bbox given: give exactly one of them")
    if bbox is not None:
        if feature is not None:
            raise RegionError("--feature only applies to a region file: drop it or use a file")
        return region_from_bbox(bbox)
    return _load_vector(os.fspath(path), feature)


def _load_vector(path: str, feature: str | int | None) -> Region:
    import geopandas as gpd

    if not os.path.exists(path):
        raise RegionError(f"region file {path!r} does not exist: check the path")
    if os.path.isdir(path) and not _looks_like_vector_dir(path):
        raise RegionError(f"region {path!r} is a folder, not a vector file: "
                          "pass a GeoJSON, GeoPackage, Shapefile or FlatGeobuf")
    try:
        gdf = gpd.read_file(path)
    except Exception as exc:  # pyogrio raises DataSourceError and friends
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RegionError(f"cannot read {path!r} as a vector dataset ({msg}): pass a GeoJSON, "
                          "GeoPackage, Shapefile or FlatGeobuf, or use --bbox W,S,E,N") from None
    if "geometry" not in gdf or gdf.geometry is None or len(gdf) == 0:
        raise RegionError(f"region file {path!r} has no features: add a polygon or use --bbox")
    name = os.path.splitext(os.path.basename(path.rstrip("/")))[0]
    if feature is not None:
        gdf, name = _select_feature(gdf, feature, path)
    gdf = gdf[gdf.geometry.notna() & ~gdf.geometry.is_empty]
    if len(gdf) == 0:
        raise RegionError(f"region file {path!r} holds only empty geometries: "
                          "add a polygon or use --bbox")
    if gdf.crs is None:
        minx, miny, maxx, maxy = gdf.total_bounds
        if not (-180 <= minx <= maxx <= 360 and -90 <= miny <= maxy <= 90):
            raise RegionError(f"region file {path!r} has no CRS and its coordinates are not "
                              "degrees: save it with its CRS (e.g. a .prj or GeoPackage) or "
                              "reproject it to EPSG:4326")
        gdf = gdf.set_crs("EPSG:4326")
    elif not gdf.crs.equals("EPSG:4326"):
        gdf = gdf.to_crs("EPSG:4326")
    jump = next((j for j in map(_antimeridian_jump, gdf.geometry) if j is not None), None)
    if jump is not None:
        raise RegionError(f"region {name!r} in {path!r} crosses the antimeridian inside one ring "
                          f"(longitude jumps from {jump[0]:g} to {jump[1]:g}), which reads as a strip "
                          "around the whole world: split it at 180 degrees into two polygons, one "
                          "east and one west of it (RFC 7946), or use --bbox W,S,E,N with W > E")
    geoms = [shapely.make_valid(g) for g in gdf.geometry]
    geom = shapely.union_all(geoms)
    geom = _polygonal(geom)
    if geom.is_empty or geom.area <= 0:
        raise RegionError(f"region {name!r} in {path!r} has no area (points or lines only): "
                          "give polygons or use --bbox")
    return Region(geom, name)


def _antimeridian_jump(geom: BaseGeometry) -> tuple[float, float] | None:
    """(lon before, lon after) of the first ring edge longer than 180 degrees of longitude."""
    for poly in getattr(geom, "geoms", [geom]):
        if not isinstance(poly, Polygon):
            continue
        for ring in (poly.exterior, *poly.interiors):
            lon = np.asarray(ring.coords)[:, 0]
            k = np.nonzero(np.abs(np.diff(lon)) > 180.0)[0]
            if len(k):
                return float(lon[k[0]]), float(lon[k[0] + 1])
    return None


def _looks_like_vector_dir(path: str) -> bool:
    # an ESRI File Geodatabase is a folder ending in .gdb
    return path.rstrip("/").lower().endswith(".gdb")


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Keep the polygon parts of a (possibly mixed) geometry."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", [geom]) if isinstance(g, (Polygon, MultiPolygon))]
    if not parts:
        return Polygon()
    return shapely.union_all(parts)


def _select_feature(gdf, feature, path):
    text = str(feature)
    cols = [c for c in NAME_COLUMNS if c in gdf.columns]
    for col in cols:
        hit = gdf[gdf[col].astype(str) == text]
        if len(hit):
            return hit, text
    if isinstance(feature, int) or text.lstrip("-").isdigit():
        idx = int(text)
        if -len(gdf) <= idx < len(gdf):
            row = gdf.iloc[[idx]]
            label = str(row[cols[0]].iloc[0]) if cols else f"feature{idx}"
            return row, label
    names = sorted({str(v) for c in cols[:1] for v in gdf[c].tolist()})[:10]
    hint = f" (names: {', '.join(names)})" if names else ""
    raise RegionError(f"no feature {feature!r} in {path!r}{hint}: pass --feature with a name "
                      f"from its '{cols[0] if cols else 'name'}' column or an index "
                      f"0..{len(gdf) - 1}")
