"""``psm-map train``, ``psm-map evaluate`` and ``psm-map build-shards`` (thin argument layers)."""
from __future__ import annotations

import argparse
import sys

from .base import ArgumentParser, ints as _ints

_META_HELP = "metadata tokens, e.g. latlong_month_time_asource_tsource, or none"


def _fractions(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give train,val,test fractions, e.g. 0.8,0.1,0.1") from None


def _devices(text: str):
    return text if text == "auto" or "," in text else int(text)


def cmd_train(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map train", description=(
        "Train or fine-tune PSM on webdataset shards (PCME++ or InfoNCE). Keeps the best checkpoint by "
        "validation image-to-sound R@10%% and prints its path; defaults are the authors'."))
    p.add_argument("--shards", required=True, help="training shards: glob, {000..009} range or '::' list")
    p.add_argument("--val-shards", help="validation shards (without them no best checkpoint is chosen)")
    p.add_argument("--sat-type", default="sentinel", choices=["sentinel", "bingmap", "googleEarth"])
    p.add_argument("--metadata", default="latlong_month_time_asource_tsource", help=_META_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--probabilistic", dest="probabilistic", action="store_true", default=True,
                   help="PCME++ with Gaussian embeddings (default)")
    g.add_argument("--deterministic", dest="probabilistic", action="store_false", help="InfoNCE baseline")
    p.add_argument("--modality", default="sat_audio_text", choices=["sat_audio_text", "sat_audio"])
    p.add_argument("--out", default="psm-train", help="output folder (checkpoints/, logs/)")
    p.add_argument("--max-steps", type=int, default=300_000)
    p.add_argument("--batch-size", type=int, default=128, help="per device")
    p.add_argument("--val-batch-size", type=int, default=128)
    p.add_argument("--val-every", type=int, default=500, help="validate every N steps")
    p.add_argument("--limit-val-batches", type=float, default=30, help="validation batches (<=1.0: fraction)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--weight-decay", type=float, default=0.2)
    p.add_argument("--restart-steps", type=int, default=5000, help="cosine warm-restart period T_0 (steps)")
    p.add_argument("--meta-droprate", type=float, default=0.5)
    p.add_argument("--precision", default="auto", help="auto (16-mixed on GPU, 32 on CPU), 16-mixed, bf16-mixed, 32-true")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--devices", type=_devices, default=1, help="devices per node (int, 'auto' or a list '0,1')")
    p.add_argument("--strategy", default="auto", help="Lightning strategy, e.g. ddp, ddp_find_unused_parameters_true")
    p.add_argument("--workers", type=int, default=2, help="data loader workers")
    p.add_argument("--satmae", help="SatMAE pretrain checkpoint (.pth with a 'model' dict) to initialise the ViT")
    p.add_argument("--clap-weights", help="folder of a saved Hugging Face ClapModel to initialise audio/text towers")
    p.add_argument("--clap-config", help="CLAP config JSON (default: laion/clap-htsat-fused, or --tiny's)")
    p.add_argument("--tokenizer", help="RoBERTa tokenizer folder (default: roberta-base from the HF cache)")
    p.add_argument("--tiny", action="store_true", help="small ViT (64 wide, depth 1) and a tiny CLAP: tests, demos")
    p.add_argument("--embed-dim", type=int, help="ViT width (default 768; --tiny 64)")
    p.add_argument("--depth", type=int, help="ViT depth (default 12; --tiny 1)")
    p.add_argument("--fc-dim", type=int, default=512, help="embedding size")
    p.add_argument("--mel-versions", type=_ints, default=(1, 2, 3, 4, 5), help="mel draws to sample from")
    p.add_argument("--zoom-levels", type=_ints, help="zoom levels to sample from (default 1,3,5; googleEarth 1)")
    p.add_argument("--default-source", help="audio source of keys without one (SoundingEarth: aporee)")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--seed", type=int, default=56)
    p.add_argument("--resume", help="Lightning checkpoint to resume training from")
    p.add_argument("--freeze-clap", action="store_true", help="keep the CLAP towers fixed")
    p.add_argument("--validate-first", action="store_true", help="also validate before the first step")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from ..model.clap import resolve_clap_config
    from ..train.module import TrainConfig, fit

    cfg = TrainConfig(
        shards=a.shards, val_shards=a.val_shards, sat_type=a.sat_type, metadata_type=a.metadata,
        probabilistic=a.probabilistic, modality_type=a.modality, out_dir=a.out, max_steps=a.max_steps,
        batch_size=a.batch_size, val_batch_size=a.val_batch_size,
        limit_val_batches=int(a.limit_val_batches) if a.limit_val_batches > 1 else a.limit_val_batches,
        val_check_interval=a.val_every, precision=a.precision, accelerator=a.accelerator, devices=a.devices,
        strategy=a.strategy, num_workers=a.workers, learning_rate=a.lr, weight_decay=a.weight_decay,
        warm_up_iterations=a.restart_steps, meta_droprate=a.meta_droprate, fc_dim=a.fc_dim,
        clap_config=resolve_clap_config(a.clap_config).to_dict() if a.clap_config else None,
        satmae=a.satmae, clap_weights=a.clap_weights, tokenizer=a.tokenizer, mel_versions=a.mel_versions,
        zoom_levels=a.zoom_levels, default_source=a.default_source, freeze=a.freeze_clap, seed=a.seed,
        shuffle_buffer=a.shuffle_buffer, validate_first=a.validate_first, resume=a.resume, progress=not a.quiet)
    if a.tiny:
        cfg.tiny()
    if a.embed_dim:
        cfg.embed_dim, cfg.num_heads = a.embed_dim, max(1, a.embed_dim // 64)
    if a.depth:
        cfg.depth = a.depth
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
    p.add_argument("--metadata", default="none", help="metadata kept unmasked (default none: all masked; " + _META_HELP + ")")
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
