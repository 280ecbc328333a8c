"""``psm-map REGION --query ...`` (maps, and the demo) and ``psm-map query STORE --query ...``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..constants import HOUR_RANGE, MONTH_RANGE
from ..errors import InputError
from .base import ArgumentParser, add_query_terms, parser, whole
from .base import imagery_options as _imagery_options, zooms as _zooms


def add_query_args(p: argparse.ArgumentParser) -> None:
    add_query_terms(p)
    p.add_argument("--month", type=whole("month", *MONTH_RANGE), help="month 1..12 (default: masked)")
    p.add_argument("--hour", type=whole("hour", *HOUR_RANGE), help="hour 0..23 (default: masked)")
    p.add_argument("--months", metavar="LIST", help="a month x hour cube over these months: 3,6,9 or 1-12 or "
                                                    "1-12/3 (Zarr, COG or a COG folder; --month: one map)")
    p.add_argument("--hours", metavar="LIST", help="a cube over these hours: 6,12,18 or 0-23 or 0-23/3")
    p.add_argument("--cube-layout", choices=["auto", "bands", "folder"],
                   help="a cube as COG: one multi-band file (auto/bands, up to 200 bands) or a folder of one "
                        "COG per month/hour (folder: --out cube.tif writes cube/)")
    p.add_argument("--audio-source", help="yfcc, iNat, aporee or freesound (default: masked)")
    p.add_argument("--caption-source", help="meta, qwen or pengi (default: masked)")
    p.add_argument("--no-fusion", action="store_true", help="skip metadata fusion (the authors' maps)")
    p.add_argument("--tokenizer", help="folder with a RoBERTa tokenizer (default: the store's, else roberta-base "
                                       "from the HF cache or hub)")
    p.add_argument("--out", help="output file (.tif) or folder (.zarr); a STAC item <out>.stac.json and the "
                                 "previews <out>.preview/ go beside it")
    p.add_argument("--format", choices=["cog", "zarr"], help="output format (default from --out)")
    p.add_argument("--score", action="store_true", help="also write 0-1 scores")
    p.add_argument("--no-previews", action="store_true", help="skip PNG previews and the HTML page")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--offline", action="store_true",
                   help="download nothing (checkpoint, tokenizer); also HF_HUB_OFFLINE=1 or PSM_OFFLINE=1")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--checkpoint", help="PSM checkpoint (.ckpt or .safetensors) or official name; default "
                                        "$PSM_CHECKPOINT, the cache, or the official one for the imagery "
                                        "(downloaded on first use)")
    p.add_argument("--clap-config", help="CLAP config JSON (default: the store's or the checkpoint's, else "
                                         "laion/clap-htsat-fused)")


def map_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="psm-map",
        description="Soundscape maps from satellite imagery with PSM. Subcommands: query, points, zonal, assess, serve, "
                    "info, levels, weights, convert, evaluate, build-shards, train, qgis (psm-map SUBCOMMAND -h).")
    p.add_argument("region", nargs="?", help="region file (GeoJSON, GPKG, Shapefile, ...)")
    p.add_argument("--bbox", help="W,S,E,N in degrees instead of a region file")
    p.add_argument("--feature", help="one feature of the region file, by name or index")
    p.add_argument("--imagery", nargs="?", const="", help="PATH, xyz:URL, stac:URL or a preset (no value: list "
                                                          "presets; not given: the newest s2cloudless)")
    p.add_argument("--imagery-option", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of the imagery reader, e.g. retries=2, timeout=10, max_zoom=16, "
                        "cache_dir=tiles (repeatable)")
    p.add_argument("--zoom-level", type=_zooms, help="zoom levels, e.g. 1,3,5")
    p.add_argument("--zoom-sampling", choices=["scale", "dense"],
                   help="scale: each zoom level embedded on its own grid (cells of about a quarter chip) and "
                        "resampled to the output grid; dense: every zoom at every output pixel (default: scale-true maps "
                        "agree with dense ones to r 0.05-0.95 with random weights, below the 0.99 bar)")
    p.add_argument("--stride", type=float, help="output pixel size in metres")
    p.add_argument("--crs", help="output CRS (default: UTM zone of the region)")
    p.add_argument("--max-pixels", type=int, help="refuse grids with more region pixels than this")
    p.add_argument("--store", help="embedding store folder or fsspec URL (default: psm-store next to --out)")
    p.add_argument("--batch-size", help="chips per model call, or auto (from the GPU's free memory)")
    p.add_argument("--compile", action="store_true", help="torch.compile the image encoder (first batches slower)")
    p.add_argument("--block-size", type=int)
    p.add_argument("--readers", type=int, help="reader threads in front of the model (read, decode, warp, cut; "
                                             "default: the cores, at least 2; 0: one prefetch thread)")
    p.add_argument("--min-valid", type=float, help="minimum valid imagery fraction of a chip (0..1)")
    p.add_argument("--workers", type=int, help="run on a local dask cluster of N worker processes")
    p.add_argument("--scheduler", help="address of an existing dask scheduler")
    p.add_argument("--config", help="pipeline preset YAML (see pipelines/)")
    p.add_argument("--demo", action="store_true", help="run the built-in offline demo")
    p.add_argument("--zones", help="polygon file: also write per-zone statistics beside the map "
                                   "(<out>.zonal.csv, as psm-map zonal)")
    add_query_args(p)
    return p


def load_preset(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        here = Path(__file__).resolve().parents[2] / "pipelines" / f"{path}.yaml"
        if here.is_file():
            p = here
        else:
            raise InputError(f"pipeline preset {path} not found: give a YAML file (see pipelines/)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"preset {p} is not valid YAML ({exc}): fix it") from None
    if not isinstance(data, dict):
        raise InputError(f"preset {p} must be a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in data.items()}


#: map options whose command-line name differs from the MapConfig field
_FIELD = {"query": "queries", "zoom_level": "zoom_levels"}


def _given(a: argparse.Namespace, preset: dict) -> dict:
    """The MapConfig fields the user gave (command line over preset); the rest keep the
    dataclass defaults, which live in :class:`~psm_mapping.config.MapConfig` only."""
    from ..config import MapConfig

    fields = set(MapConfig.__dataclass_fields__)
    kw = {_FIELD.get(k, k): v for k, v in preset.items() if _FIELD.get(k, k) in fields}
    for k, v in vars(a).items():
        f = _FIELD.get(k, k)
        if f in fields and v is not None and v != [] and v is not False:
            kw[f] = v
    if a.no_fusion or preset.get("no_fusion"):
        kw["fuse"] = False
    if a.no_previews or preset.get("no_previews"):
        kw["previews"] = False
    if a.quiet:
        kw["progress"] = False
    if getattr(a, "imagery_option", None):
        kw["imagery_options"] = {**(preset.get("imagery_options") or {}), **_imagery_options(a.imagery_option)}
    if isinstance(kw.get("zoom_levels"), str):
        kw["zoom_levels"] = _zooms(kw["zoom_levels"])
    kw.pop("format", None)
    return kw


def _demo(argv: list[str]) -> int:
    p = parser("--demo", "Run the built-in offline demo.")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--out", default="psm-demo-output")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from ..demo import run_demo

    run_demo(a.out, overwrite=a.overwrite, quiet=a.quiet)
    return 0


def cmd_map(argv: list[str]) -> int:
    if "--demo" in argv:
        return _demo(argv)
    p = map_parser()
    a = p.parse_args(argv)
    if a.imagery == "":
        from ..imagery.presets import list_presets

        for row in list_presets():
            print(row)
        return 0
    preset = load_preset(a.config) if a.config else {}
    if a.region is None and a.bbox is None and "region" not in preset and "bbox" not in preset:
        p.print_usage(sys.stderr)
        raise InputError("no region given: pass a region file or --bbox W,S,E,N (or --demo)")
    from ..config import MapConfig, check_count
    from ..outputs.results import format_for

    kw = _given(a, preset)
    kw.setdefault("out", "psm-map.tif")
    cfg = MapConfig(**kw, format=format_for(kw["out"], a.format or preset.get("format")))
    say = (lambda *x: None) if a.quiet else (lambda msg: print(msg, file=sys.stderr))
    if a.workers is not None:
        check_count("workers", a.workers)
    if a.offline:
        from ..offline import set_offline

        set_offline()
    if a.zones:  # a bad zones file is refused before any work
        from ..places.zonal import check_zones_out
        from ..region import load_region

        zones_out = check_zones_out(a.zones, cfg.out, cfg.overwrite,
                                    region=load_region(cfg.region, bbox=cfg.bbox, feature=cfg.feature))
    _find_checkpoint_first(cfg)
    if a.workers or a.scheduler:
        from ..distributed import map_region_distributed

        run = map_region_distributed(cfg, workers=a.workers, scheduler=a.scheduler, log_fn=say)
    else:
        from ..run import map_region

        run = map_region(cfg, log_fn=say)
    say(run.summary())
    if a.zones:
        from ..places import write_zonal

        say(f"zonal: {write_zonal(cfg.out, a.zones, zones_out, overwrite=cfg.overwrite)['table']}")
    if a.quiet and run.fault_pixels:  # a map with holes says so, quiet or not
        from ..run import fault_message

        print(fault_message(run.fault_pixels), file=sys.stderr)
    return 0


def _find_checkpoint_first(cfg) -> None:
    """With no checkpoint named, find (or download) the official one before the model stack is
    imported, so that offline or without a network the one-line answer comes at once."""
    import os

    if cfg.checkpoint or os.environ.get("PSM_CHECKPOINT"):
        return
    from ..config import imagery_sat_type
    from ..region import load_region
    from ..weights import resolve_checkpoint

    cfg.validate()
    load_region(cfg.region, bbox=cfg.bbox, feature=cfg.feature)  # a bad region says so first
    cfg.checkpoint = str(resolve_checkpoint(None, sat_type=imagery_sat_type(cfg.imagery), quiet=not cfg.progress))


def cmd_query(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map query", description="Maps from an existing embedding store.")
    p.add_argument("store", help="the .zarr store a previous run wrote")
    p.add_argument("--point", metavar="LON,LAT", help="the month x hour profile of one place: --out *.csv and "
                                                      "a heatmap <out>.heatmap.png (every month and hour unless "
                                                      "--months/--hours say)")
    add_query_args(p)
    from ..storeformat import is_point_store

    if any(is_point_store(x) for x in argv if not x.startswith("-")):  # a table by --out suffix
        from .places import cmd_query_points

        return cmd_query_points(argv)
    a = p.parse_args(argv)
    from ..config import MapConfig
    from ..outputs.results import format_for

    kw = _given(a, {})
    kw.pop("store", None)  # the store to read, not a store root
    if a.point is not None:
        return _profile(a, kw)
    kw.setdefault("out", "psm-query.tif")
    cfg = MapConfig(**kw, format=format_for(kw["out"], a.format))
    if a.offline:
        from ..offline import set_offline

        set_offline()
    from ..answer import map_from_store

    run = map_from_store(a.store, cfg)
    if not a.quiet:
        print(run.summary(), file=sys.stderr)
    return 0


def _profile(a: argparse.Namespace, kw: dict) -> int:
    """``psm-map query STORE --point LON,LAT``: one place's month x hour profile (CSV + heatmap)."""
    from ..config import MapConfig
    from ..place_profile import profile_from_store

    kw.setdefault("out", "psm-profile.csv")
    cfg = MapConfig(**kw, format="cog")
    if a.offline:
        from ..offline import set_offline

        set_offline()
    prof, files = profile_from_store(a.store, cfg, a.point)
    if not a.quiet:
        print(f"profile at {prof.lon:g},{prof.lat:g} (store pixel row {prof.row}, column {prof.col}): "
              f"{len(prof.axes)} settings x {len(prof.zoom_levels)} zooms x {len(prof.queries)} queries",
              file=sys.stderr)
        for k, v in files.items():
            print(f"{k}: {v}", file=sys.stderr)
    return 0
