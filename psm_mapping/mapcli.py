"""Argument parsing for ``psm-map REGION --query ...``, ``psm-map query``, ``info`` and ``weights``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import ArgumentParser, command
from .errors import InputError


def _zooms(text: str) -> tuple[int, ...]:
    try:
        z = tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad zoom levels {text!r}: give integers like 1,3,5") from None
    if not z or any(v < 1 for v in z):
        raise argparse.ArgumentTypeError(f"bad zoom levels {text!r}: give positive integers like 1,3,5")
    return z


def _whole(name: str, lo: int, hi: int):
    """An argparse type: a whole number (range checks stay with the library)."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a whole number: give one of {lo}..{hi}") from None

    parse.__name__ = name
    return parse


def _add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="text query (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio query (repeatable)")
    p.add_argument("--combine", action="store_true", help="combine each text with each audio as one query")
    p.add_argument("--month", type=_whole("month", 1, 12), help="month 1..12 (default: masked)")
    p.add_argument("--hour", type=_whole("hour", 0, 23), help="hour 0..23 (default: masked)")
    p.add_argument("--audio-source", help="yfcc, iNat, aporee or freesound (default: masked)")
    p.add_argument("--caption-source", help="meta, qwen or pengi (default: masked)")
    p.add_argument("--no-fusion", action="store_true", help="skip metadata fusion (the authors' maps)")
    p.add_argument("--tokenizer", help="folder with a RoBERTa tokenizer (default: roberta-base from the HF cache)")
    p.add_argument("--out", help="output file (.tif) or folder (.zarr)")
    p.add_argument("--format", choices=["cog", "zarr"], help="output format (default from --out)")
    p.add_argument("--score", action="store_true", help="also write 0-1 scores")
    p.add_argument("--no-previews", action="store_true", help="skip PNG previews and the HTML page")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--checkpoint", help="PSM checkpoint (.ckpt or .safetensors); default $PSM_CHECKPOINT")
    p.add_argument("--clap-config", help="CLAP config JSON (default: laion/clap-htsat-fused)")


def map_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="psm-map",
        description="Soundscape maps from satellite imagery with PSM. Subcommands: query, info, "
                    "weights, convert, evaluate, build-shards, train (psm-map SUBCOMMAND -h).")
    p.add_argument("region", nargs="?", help="region file (GeoJSON, GPKG, Shapefile, ...)")
    p.add_argument("--bbox", help="W,S,E,N in degrees instead of a region file")
    p.add_argument("--feature", help="one feature of the region file, by name or index")
    p.add_argument("--imagery", nargs="?", const="", help="PATH, xyz:URL, stac:URL or a preset (no value: list presets)")
    p.add_argument("--zoom-level", type=_zooms, help="zoom levels, e.g. 1,3,5")
    p.add_argument("--stride", type=float, help="output pixel size in metres")
    p.add_argument("--crs", help="output CRS (default: UTM zone of the region)")
    p.add_argument("--max-pixels", type=int, help="refuse grids with more region pixels than this")
    p.add_argument("--store", help="embedding store folder or fsspec URL (default: psm-store next to --out)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--block-size", type=int)
    p.add_argument("--min-valid", type=float, help="minimum valid imagery fraction of a chip (0..1)")
    p.add_argument("--workers", type=int, help="run on a local dask cluster of N worker processes")
    p.add_argument("--scheduler", help="address of an existing dask scheduler")
    p.add_argument("--config", help="pipeline preset YAML (see pipelines/)")
    p.add_argument("--demo", action="store_true", help="run the built-in offline demo")
    _add_query_args(p)
    return p


def _format_for(out: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "zarr" if str(out).rstrip("/").endswith(".zarr") else "cog"


def load_preset(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        here = Path(__file__).resolve().parents[1] / "pipelines" / f"{path}.yaml"
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


def run_map_cli(argv: list[str]) -> int:
    from .constants import DEFAULT_ZOOM_LEVELS
    from .grid import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PIXELS
    from .run import MapConfig, map_region

    p = map_parser()
    a = p.parse_args(argv)
    if a.imagery == "":
        from .imagery.presets import list_presets

        for row in list_presets():
            print(row)
        return 0
    preset = load_preset(a.config) if a.config else {}
    if a.region is None and a.bbox is None and "region" not in preset and "bbox" not in preset:
        p.print_usage(sys.stderr)
        raise InputError("no region given: pass a region file or --bbox W,S,E,N (or --demo)")

    def pick(name, default=None, value=None):
        v = value if value is not None else getattr(a, name, None)
        if v is None or v == [] or v is False:
            v = preset.get(name, default)
        return v

    out = pick("out", "psm-map.tif")
    zl = pick("zoom_level", None, a.zoom_level) or preset.get("zoom_levels") or DEFAULT_ZOOM_LEVELS
    if isinstance(zl, str):
        zl = _zooms(zl)
    cfg = MapConfig(
        region=pick("region"), imagery=pick("imagery"), queries=pick("query", []),
        audio=pick("audio", []), combine=bool(pick("combine", False)), bbox=pick("bbox"),
        feature=pick("feature"), checkpoint=pick("checkpoint"), clap_config=pick("clap_config"),
        tokenizer=pick("tokenizer"), zoom_levels=tuple(zl), stride=pick("stride"), crs=pick("crs"),
        max_pixels=pick("max_pixels", DEFAULT_MAX_PIXELS), month=pick("month"), hour=pick("hour"),
        audio_source=pick("audio_source"), caption_source=pick("caption_source"),
        fuse=not (a.no_fusion or preset.get("no_fusion", False)), out=out,
        format=_format_for(out, pick("format")), previews=not (a.no_previews or preset.get("no_previews", False)),
        score=bool(pick("score", False)), store=pick("store"), overwrite=a.overwrite,
        device=pick("device", "auto"), dtype=pick("dtype", "auto"), batch_size=pick("batch_size", 64),
        block_size=pick("block_size", DEFAULT_BLOCK_SIZE), min_valid=pick("min_valid", 0.5), progress=not a.quiet,
    )
    say = (lambda *x: None) if a.quiet else (lambda msg: print(msg, file=sys.stderr))
    if a.workers is not None and a.workers < 1:
        raise InputError(f"--workers {a.workers} must be at least 1: give a number of worker processes, "
                         "or drop it to run in this process")
    if a.workers or a.scheduler:
        from .distributed import map_region_distributed

        run = map_region_distributed(cfg, workers=a.workers, scheduler=a.scheduler, log_fn=say)
    else:
        run = map_region(cfg, log_fn=say)
    say(run.summary())
    return 0


@command("query")
def cmd_query(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map query", description="Maps from an existing embedding store.")
    p.add_argument("store", help="the .zarr store a previous run wrote")
    _add_query_args(p)
    a = p.parse_args(argv)
    from .run import MapConfig, map_from_store

    out = a.out or "psm-query.tif"
    cfg = MapConfig(queries=a.query, audio=a.audio, combine=a.combine, checkpoint=a.checkpoint,
                    clap_config=a.clap_config, tokenizer=a.tokenizer, month=a.month, hour=a.hour,
                    audio_source=a.audio_source, caption_source=a.caption_source, fuse=not a.no_fusion,
                    out=out, format=_format_for(out, a.format), previews=not a.no_previews,
                    score=a.score, overwrite=a.overwrite, device=a.device, dtype=a.dtype)
    run = map_from_store(a.store, cfg)
    if not a.quiet:
        print(run.summary(), file=sys.stderr)
    return 0


@command("info")
def cmd_info(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map info", description="What a map, store or checkpoint holds.")
    p.add_argument("path")
    a = p.parse_args(argv)
    path = a.path
    if str(path).endswith((".ckpt", ".safetensors")):
        from .weights import verify

        for k, v in verify(path).items():
            print(f"{k}: {v}")
        return 0
    from .store import STORE_FORMAT

    if Path(path).is_dir() and (Path(path) / "zarr.json").is_file():
        import zarr

        g = zarr.open_group(path, mode="r")
        if g.attrs.get("format") == STORE_FORMAT:
            from .store import EmbeddingStore

            st = EmbeddingStore.open(path)
            print(repr(st))
            for k, v in st.attrs.get("provenance", {}).items():
                print(f"  {k}: {v}")
            return 0
    from .outputs import read_info

    print(read_info(path).summary())
    return 0


@command("weights")
def cmd_weights(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map weights", description="The 12 official PSM checkpoints.")
    sub = p.add_subparsers(dest="action")
    d = sub.add_parser("download", help="fetch one checkpoint into the cache (needs a network)")
    d.add_argument("name")
    v = sub.add_parser("verify", help="check a file against the key contract; record its sha256")
    v.add_argument("file")
    v.add_argument("--clap-config")
    a = p.parse_args(argv)
    from . import weights

    if a.action == "download":
        print(weights.download(a.name))
    elif a.action == "verify":
        for k, val in weights.verify(a.file, clap_config=a.clap_config).items():
            print(f"{k}: {val}")
    else:
        print("\n".join(weights.list_rows()))
        print(f"cache: {weights.cache_dir()}")
    return 0
