"""``psm-map assess MAP_OR_STORE OBSERVATIONS``: thin over :func:`psm_mapping.assessment.assess`."""
from __future__ import annotations

import sys

from .base import ArgumentParser, add_query_terms


def cmd_assess(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map assess", description="How good is this map here? Scores a psm-map map (or "
                       "a store, scoring the sites as psm-map points) against field observations: AUC for "
                       "presence/absence, AUC against background and the Boyce index for presence-only, Spearman "
                       "and Pearson for numbers; 95%% intervals from a spatial block bootstrap.")
    p.add_argument("source", metavar="MAP_OR_STORE", help="a map written by psm-map (.tif COG or .zarr), a map's "
                   "embedding store or a point store")
    p.add_argument("observations", help="CSV (lon/lat, decimalLongitude/decimalLatitude or x/y columns), GeoJSON, "
                   "GPKG or GeoParquet points in any CRS")
    add_query_terms(p)
    p.add_argument("--column", help="the outcome column (default: occurrenceStatus, else individualCount, else "
                   "every row is a presence)")
    p.add_argument("--kind", default="auto", choices=["auto", "presence-absence", "presence-only", "numeric"])
    p.add_argument("--background", type=int, default=10_000, help="background points for presence-only "
                   "(default 10000)")
    p.add_argument("--block-km", type=float, help="bootstrap block size, km (default: a tenth of the sites' extent)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates (default 1000; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", action="append", default=[], help="report.json, report.html and/or a per-site table "
                   "(.csv, .parquet, .gpkg, .geojson); repeatable")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--crs", help="CRS of a CSV's x/y columns (default: degrees)")
    p.add_argument("--no-event-time", action="store_true", help="ignore eventDate (store scoring: month and hour)")
    p.add_argument("--imagery", help="the store's imagery (scoring sites from a store)")
    p.add_argument("--checkpoint", help="checkpoint (default: the store's)")
    p.add_argument("--clap-config")
    p.add_argument("--tokenizer")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--offline", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from ..assessment import AssessConfig, assess

    cfg = AssessConfig(source=a.source, observations=a.observations, queries=a.query, audio=a.audio, combine=a.combine,
                       column=a.column, kind=a.kind, background=a.background, block_km=a.block_km,
                       bootstrap=a.bootstrap, seed=a.seed, out=a.out, overwrite=a.overwrite, crs=a.crs,
                       event_time=not a.no_event_time, imagery=a.imagery, checkpoint=a.checkpoint,
                       clap_config=a.clap_config, tokenizer=a.tokenizer, device=a.device, offline=a.offline,
                       progress=not a.quiet)
    res = assess(cfg, log_fn=None if a.quiet else (lambda msg: print(msg, file=sys.stderr)))
    for line in res.lines():
        print(line)
    if not a.quiet:
        for path in res.outputs:
            print(f"wrote {path}", file=sys.stderr)
    return 0
