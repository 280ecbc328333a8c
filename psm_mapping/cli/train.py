"""``psm-map train``, ``psm-map evaluate`` and ``psm-map build-shards`` (thin argument layers)."""
from __future__ import annotations

import argparse
import sys

from .base import ArgumentParser, ints as _ints



def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give train,val,test fractions, e.g. 0.8,0.1,0.1") from None


def _devices(text: str):
    return text if text == "auto" or "," in text else int(text)


def cmd_train(argv: list[str]) -> int:
    from ..train.config import TrainConfig, add_config_arguments

    p = ArgumentParser(prog="psm-map train", description=(
        "Train or fine-tune PSM on webdataset shards (PCME++ or InfoNCE). Keeps the best checkpoint by "
        "validation image-to-sound R@10%% and prints its path; defaults are the authors'."))
    add_config_arguments(p, TrainConfig, types={"ints": _ints, "devices": _devices})
    g = p.add_mutually_exclusive_group()
    g.add_argument("--probabilistic", dest="probabilistic", action="store_true", default=argparse.SUPPRESS,
                   help="PCME++ with Gaussian embeddings (default)")
    g.add_argument("--deterministic", dest="probabilistic", action="store_false", help="InfoNCE baseline")
    p.add_argument("--tiny", action="store_true", help="small ViT (64 wide, depth 1) and a tiny CLAP: tests, demos")
    p.add_argument("--quiet", action="store_true")
    given = vars(p.parse_args(argv))
    tiny, quiet = given.pop("tiny"), given.pop("quiet")
    if "limit_val_batches" in given:
        v = given["limit_val_batches"]
        given["limit_val_batches"] = int(v) if v > 1 else v
    if given.get("clap_config"):
        from ..model.clap import resolve_clap_config

        given["clap_config"] = resolve_clap_config(given["clap_config"]).to_dict()
    from ..train.module import fit

    cfg = TrainConfig(**given, progress=not quiet)
    if tiny:
        cfg.tiny()
    if "embed_dim" in given:  # what the user gave wins over --tiny's sizes
        cfg.embed_dim, cfg.num_heads = given["embed_dim"], max(1, given["embed_dim"] // 64)
    if "depth" in given:
        cfg.depth = given["depth"]
    res = fit(cfg)
    for v in res.val_history:
        print(f"step {v['step']:>7}: I2S R@{cfg.recall_at}% {v['I2S_Recall']:.4f}  median rank "
              f"{v['I2S_Median_Rank']:.1f}  S2I R@{cfg.recall_at}% {v['S2I_Recall']:.4f}  (N={v['n']})")
    if res.train_history:
        print(f"train loss: first {res.train_history[0][1]:.4f}, last {res.train_history[-1][1]:.4f} "
              f"({len(res.train_history)} steps)")
    if res.best_checkpoint:
        score = "unknown" if res.best_score is None else f"{res.best_score:.4f}"
        print(f"best checkpoint (I2S R@{cfg.recall_at}% {score}): {res.best_checkpoint}")
    elif res.last_checkpoint:
        print(f"last checkpoint: {res.last_checkpoint}")
    return 0


def cmd_evaluate(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map evaluate", description=(
        "Retrieval metrics of a checkpoint on test shards, as the paper: image-to-sound and sound-to-image, "
        "with and without text, zoom 1, first mel draw, metadata masked."))
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--shards", required=True, help="test shards: glob, {000..009} range or '::' list")
    p.add_argument("--tokenizer", help="RoBERTa tokenizer folder (default: roberta-base from the HF cache)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--zoom-level", type=int, default=1)
    p.add_argument("--mel-version", type=int, default=1, choices=[1, 2, 3, 4, 5])
    p.add_argument("--metadata", default="none", help="metadata kept unmasked (default none: all masked; metadata tokens, e.g. latlong_month_time_asource_tsource)")
    p.add_argument("--recall-at", type=float, default=10, help="percent of the gallery")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-text", action="store_true", help="skip the add_text rows (no tokenizer needed)")
    p.add_argument("--clap-config", help="CLAP config JSON (default: from the checkpoint or laion/clap-htsat-fused)")
    p.add_argument("--default-source", help="audio source of keys without one (SoundingEarth: aporee)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from ..train.evaluate import evaluate

    device = None if a.device == "auto" else a.device
    rep = evaluate(a.checkpoint, a.shards, tokenizer=a.tokenizer, zoom_level=a.zoom_level, mel_version=a.mel_version,
                   metadata=a.metadata, recall_at=a.recall_at, batch_size=a.batch_size, device=device,
                   text=not a.no_text, clap_config=a.clap_config, default_source=a.default_source,
                   progress=not a.quiet)
    print(f"{rep.n} samples, zoom {rep.zoom_level}, mel {rep.mel_version}, metadata {rep.metadata}, "
          f"similarity {rep.similarity}")
    print(rep.table())
    if a.out:
        path = rep.write_json(a.out)
        print(f"wrote {path}")
    return 0


def cmd_build_shards(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map build-shards", description=(
        "Build train/val/test shards in the official PSM format from a CSV of samples (audio, latitude, "
        "longitude, date, audio_source, caption) and an imagery source. Resumable: rerun to continue."))
    p.add_argument("table", help="CSV file, one row per recording")
    p.add_argument("--imagery", required=True, help="PATH, xyz:URL, stac:URL or a preset")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sat-type", default="sentinel", choices=["sentinel", "bingmap", "googleEarth"])
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), help="train,val,test fractions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument("--image-px", type=int, help="image side in px (default 1280 sentinel, 1500 bingmap; same footprint)")
    p.add_argument("--min-valid", type=float, default=0.9, help="minimum imagery coverage of a window (0..1)")
    p.add_argument("--audio-source", dest="default_source", help="audio source of rows without one")
    p.add_argument("--skip-bad", action="store_true", help="leave out samples whose audio or imagery fails")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from ..train.build import BuildConfig, build_shards

    cfg = BuildConfig(sat_type=a.sat_type, image_px=a.image_px, split=a.split, seed=a.seed, shard_size=a.shard_size,
                      min_valid=a.min_valid, default_source=a.default_source, skip_bad=a.skip_bad,
                      progress=not a.quiet)
    rep = build_shards(a.table, a.imagery, a.out, cfg)
    print("samples: " + ", ".join(f"{k} {v}" for k, v in rep.counts.items()))
    print(f"shards written: {len(rep.written)}, already complete: {len(rep.skipped_shards)}")
    for b in rep.bad_rows:
        print(f"skipped: {b}", file=sys.stderr)
    return 0


__all__ = ["cmd_train", "cmd_evaluate", "cmd_build_shards"]
