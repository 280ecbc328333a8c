"""``psm-map points SITES --query ...``, ``psm-map zonal MAP ZONES --out ...`` and
``psm-map query POINT_STORE --query ...``: thin over :mod:`psm_mapping.places`."""
from __future__ import annotations

import argparse
import sys

from ..constants import HOUR_RANGE, MONTH_RANGE
from .base import ArgumentParser, add_query_terms, imagery_options, whole, zooms as _zooms


def _model_args(p: argparse.ArgumentParser) -> None:
    add_query_terms(p)
    p.add_argument("--month", type=whole("month", *MONTH_RANGE),
                   help="month 1..12 for sites without a month column value")
    p.add_argument("--hour", type=whole("hour", *HOUR_RANGE), help="hour 0..23 for sites without an hour column value")
    p.add_argument("--audio-source", help="yfcc, iNat, aporee or freesound (default: the column, else masked)")
    p.add_argument("--caption-source", help="meta, qwen or pengi (default: the column, else masked)")
    p.add_argument("--no-fusion", action="store_true", help="skip metadata fusion (the authors' maps)")
    p.add_argument("--checkpoint", help="PSM checkpoint (.ckpt or .safetensors) or official name")
    p.add_argument("--clap-config", help="CLAP config JSON")
    p.add_argument("--tokenizer", help="folder with a RoBERTa tokenizer (default: roberta-base)")
    p.add_argument("--lon-col", help="longitude column (default: lon/lng/long/longitude)")
    p.add_argument("--lat-col", help="latitude column (default: lat/latitude)")
    p.add_argument("--out", help="table: .csv, .parquet (GeoParquet), .geojson or .gpkg")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--offline", action="store_true", help="download nothing (checkpoint, tokenizer)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def _config(a: argparse.Namespace, **extra):
    from ..places import PointsConfig

    fields = set(PointsConfig.__dataclass_fields__)
    kw = {("queries" if k == "query" else k): v for k, v in vars(a).items()}
    kw = {k: v for k, v in kw.items() if k in fields and v is not None and v != [] and v is not False}
    if a.no_fusion:
        kw["fuse"] = False
    if a.quiet:
        kw["progress"] = False
    kw.update(extra)
    return PointsConfig(**kw)


def _say(a):
    return (lambda *x: None) if a.quiet else (lambda msg: print(msg, file=sys.stderr))


def _report(run, a) -> None:
    from ..places.points import invalid_message

    if not a.quiet:
        print(run.summary(), file=sys.stderr)
    elif run.invalid_sites:  # a table with empty rows says so, quiet or not
        print(invalid_message(run.invalid_sites, run.sites), file=sys.stderr)


def cmd_points(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map points", description="Soundscape scores at sites: a table with the input's "
                       "columns plus similarity, 0-1 score and uncertainty per query and zoom level.")
    p.add_argument("sites", help="CSV with lon/lat columns, or a point vector file (GeoJSON, GPKG, Shapefile, "
                                 "GeoParquet), any CRS")
    p.add_argument("--imagery", help="PATH, xyz:URL, stac:URL or a preset (default: the newest s2cloudless)")
    p.add_argument("--imagery-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--zoom-level", type=_zooms, help="zoom levels, e.g. 1,3,5")
    p.add_argument("--crs", help="chip CRS for all sites (default: each site's UTM zone, as a map over it)")
    p.add_argument("--store", help="folder of point stores (default: psm-store next to --out)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--min-valid", type=float, help="minimum valid imagery fraction of a chip (0..1)")
    _model_args(p)
    a = p.parse_args(argv)
    extra = {"imagery_options": imagery_options(a.imagery_option)} if a.imagery_option else {}
    if a.zoom_level:
        extra["zoom_levels"] = a.zoom_level
    cfg = _config(a, **extra)
    if cfg.out is None:
        cfg.out = "psm-points.csv"
    if a.offline:
        from ..offline import set_offline

        set_offline()
    from ..places import score_points

    _report(score_points(cfg, log_fn=_say(a)), a)
    return 0


def cmd_query_points(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map query", description="A table from an existing point store: no imagery, no "
                       "image inference.")
    p.add_argument("store", help="the points-*.zarr store psm-map points wrote")
    p.add_argument("--sites", help="the sites file the store was built from (keeps its columns and metadata)")
    _model_args(p)
    a = p.parse_args(argv)
    store = a.store
    a.store = None  # the store to read, not a folder of stores
    cfg = _config(a)
    if cfg.out is None:
        cfg.out = "psm-query.csv"
    from ..places import score_point_store

    _report(score_point_store(store, cfg, log_fn=_say(a)), a)
    return 0


def cmd_zonal(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map zonal", description="Per-polygon statistics of a psm-map map (COG or Zarr), "
                       "pixel coverage weighted exactly (exactextract).")
    p.add_argument("map", help="a map written by psm-map (.tif or .zarr)")
    p.add_argument("zones", help="polygon vector file (GeoJSON, GPKG, Shapefile, GeoParquet), any CRS")
    p.add_argument("--out", default="psm-zonal.csv", help="table: .csv, .parquet, .geojson or .gpkg")
    p.add_argument("--threshold", type=float, default=0.5, help="0-1 score threshold of frac_above (default 0.5)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from ..places import write_zonal

    out = write_zonal(a.map, a.zones, a.out, a.threshold, a.overwrite)
    if not a.quiet:
        for k, v in out.items():
            print(f"{k}: {v}", file=sys.stderr)
    return 0
