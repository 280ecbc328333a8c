"""A STAC Item beside every map output: ``<out>.stac.json`` (``birds.tif`` -> ``birds.tif.stac.json``).

Written with pystac: geometry and bbox in lon/lat of the valid area (pixels where any band has a
value), the ``proj`` extension (EPSG code, or WKT2 when the CRS has none; shape; transform), the
``raster`` extension per band (data type, nodata, statistics), one ``data`` asset whose href is the
output's name relative to the Item (media type COG or Zarr), a ``style`` asset for a COG's QGIS
style ``<name>.qml`` (media type ``text/xml``, role ``style``), ``created``, and the provenance as
``psm:*`` properties (checkpoint and sha256, zoom levels, queries, metadata, imagery source and
licence). The Item is staged and swapped into place together with its output."""
from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path

import numpy as np
from pyproj import CRS, Transformer

from .results import MapResult, full_tags

STAC_SUFFIX = ".stac.json"
#: provenance tags that become ``psm:<name>`` properties (the rest go to ``psm:tags``)
PROVENANCE = ("checkpoint", "checkpoint_sha256", "model", "loss_type", "sat_type", "metadata_type",
              "zoom_levels", "stride_m", "fusion", "metadata", "queries", "region", "imagery_source",
              "imagery_kind", "imagery_attribution", "imagery_license", "software")


def stac_path(out: str | Path) -> Path:
    """Where the Item of output ``out`` goes."""
    p = Path(out)
    return p.with_name(p.name.rstrip("/") + STAC_SUFFIX)


def _valid_geometry(valid: np.ndarray, transform, crs) -> dict | None:
    """Lon/lat GeoJSON of the valid pixels (polygons of the mask, simplified to a pixel)."""
    from rasterio.features import shapes
    from shapely.geometry import mapping, shape
    import shapely
    from shapely.ops import unary_union

    if not valid.any():
        return None
    polys = [shape(g) for g, v in shapes(valid.astype(np.uint8), mask=valid, transform=transform) if v == 1]
    geom = unary_union(polys).simplify(abs(transform.a) / 2)
    tr = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
    geom = shapely.transform(geom.segmentize(abs(transform.a) * 64),
                             lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))
    return mapping(geom)


def _stats(arrays: list) -> list[dict]:
    def one(a):
        f = a[np.isfinite(a)]
        return (a.size, f.size, f.min() if f.size else np.nan, f.max() if f.size else np.nan,
                f.astype(np.float64).mean() if f.size else np.nan, f.astype(np.float64).std() if f.size else np.nan)

    lazy = [a for a in arrays if hasattr(a, "dask")]
    if lazy:  # one pass over the cluster's chunks
        import dask
        import dask.array as da

        parts = [(a.size, da.isfinite(a).sum(), da.nanmin(a), da.nanmax(a), da.nanmean(a.astype(np.float64)),
                  da.nanstd(a.astype(np.float64))) for a in arrays]
        rows = dask.compute(*parts)
    else:
        rows = [one(np.asarray(a)) for a in arrays]
    out = []
    for n, k, lo, hi, mean, std in rows:
        s = {"valid_percent": 100.0 * float(k) / max(1, n)}
        if k:
            s.update(minimum=float(lo), maximum=float(hi), mean=float(mean), stddev=float(std))
        out.append(s)
    return out


def make_item(result: MapResult, arrays: list, out: Path, fmt: str, valid: np.ndarray | None = None,
              valid_transform=None, style: str | None = None):
    """The pystac Item of ``result`` written at ``out`` (its href is ``./<out name>``). ``valid``
    (optional, with ``valid_transform``) is a coarser valid mask for large lazy maps; ``style``:
    the file name of the QGIS style beside it (the asset ``style``)."""
    import pystac
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import DataType, RasterBand, RasterExtension, Statistics

    tags = full_tags(result)
    crs = CRS.from_user_input(result.crs)
    if valid is None:
        valid = np.zeros(result.shape, bool)
        for a in arrays:
            valid |= np.isfinite(np.asarray(a))
        valid_transform = result.transform
    geometry = _valid_geometry(valid, valid_transform, crs)
    if geometry is None:  # nothing valid: the map's footprint
        from shapely.geometry import box, mapping

        from .results import lonlat_bounds

        geometry = mapping(box(*lonlat_bounds(crs, result.bounds())))
    from shapely.geometry import shape

    bbox = list(shape(geometry).bounds)
    try:
        created = _dt.datetime.fromisoformat(tags["created"])
    except (KeyError, ValueError):
        created = _dt.datetime.now(_dt.timezone.utc)
    props = {f"psm:{k}": tags[k] for k in PROVENANCE if k in tags}
    if "zoom_levels" in tags:
        props["psm:zoom_levels"] = [int(z) for z in str(tags["zoom_levels"]).split(",") if z.strip()]
    props["psm:queries"] = sorted({b.query for b in result.bands if b.query is not None}) or tags.get("queries")
    props["psm:bands"] = [b.name for b in result.bands]
    props["psm:tags"] = {k: v for k, v in tags.items() if k not in PROVENANCE}
    name = out.name.rstrip("/")
    item = pystac.Item(id=name, geometry=geometry, bbox=bbox, datetime=created, properties=props)
    item.common_metadata.created = created
    media = pystac.MediaType.COG if fmt == "cog" else "application/vnd+zarr"
    asset = pystac.Asset(href=f"./{name}", media_type=media, roles=["data"],
                         title=f"soundscape map ({fmt})")
    item.add_asset("data", asset)
    if style:
        add_style_asset(item, style)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = crs.to_epsg()
    proj.apply(epsg=epsg, wkt2=None if epsg else crs.to_wkt("WKT2_2019"), shape=list(result.shape),
               transform=list(result.transform)[:6])
    RasterExtension.ext(asset, add_if_missing=True).apply([
        RasterBand.create(nodata="nan", data_type=DataType.FLOAT32, statistics=Statistics.create(**st))
        for st in _stats(arrays)])
    for band, ab in zip(result.bands, asset.extra_fields["raster:bands"]):
        ab["name"], ab["description"] = band.name, band.description
    return item


def add_style_asset(item, name: str, key: str = "style") -> None:
    """List the QGIS style ``name`` (beside the Item) as the asset ``key``."""
    import pystac

    from .qml import QML_MEDIA_TYPE, QML_ROLE

    item.add_asset(key, pystac.Asset(href=f"./{name}", media_type=QML_MEDIA_TYPE, roles=[QML_ROLE],
                                     title="QGIS layer style (QGIS loads it with the map)"))


def item_json(item) -> str:
    d = item.to_dict(include_self_link=False, transform_hrefs=False)
    return json.dumps(d, indent=1, allow_nan=False, default=_finite)


def _finite(v):  # pragma: no cover - numpy scalars that json cannot take
    v = float(v)
    return None if not math.isfinite(v) else v
