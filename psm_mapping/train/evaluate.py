"""Retrieval evaluation on shards, as the authors' ``evaluate.py`` (PSM_SPEC.md section 8).

Defaults: zoom level 1, first mel version, metadata masked (their ``--metadata_type none``:
every metadata token masked in the fuser), no metadata dropout, batch 500, R@10%.
Image-to-sound: query = image (or image + text, ``add_text``), gallery = audio; sound-to-image:
query = audio (or audio + text), gallery = image. ``add_text`` combines the *unnormalised* means
and adds the logvars (:meth:`ProbEmbedding.combine`).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..constants import GSD
from ..errors import InputError, OutputError
from ..model.fusion import metadata_items
from ..model.heads import ProbEmbedding
from .data import Collate, DataConfig, ShardDataset, make_loader, unflatten_meta
from .metrics import RetrievalMetrics, retrieval_metrics


def image_embedding(sat_encoder, sat_type: str, probabilistic: bool, images: torch.Tensor, zoom_levels: torch.Tensor,
                    meta: dict[str, tuple[torch.Tensor, torch.Tensor]] | None) -> ProbEmbedding:
    """The image path with gradients: ViT at ``zoom * gsd`` m per patch step, projector, fusion
    with per-sample validity (``meta``: ``{item: (encoding, valid)}``; None masks all), heads.

    The encoder's own forward, which :meth:`PSM.embed_images` runs too (one image path)."""
    res = zoom_levels.reshape(-1).to(torch.float32) * float(GSD[sat_type])
    return sat_encoder.encoder(images, res.to(images.device), meta)  # SatEncoderCore.forward


def keep_metadata(meta: dict[str, tuple[torch.Tensor, torch.Tensor]], keep: str | None
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Mask every item not named in ``keep`` (the authors' ``eval_meta``; ``"none"`` masks all)."""
    names = set(metadata_items(keep or "none"))
    out = {}
    for k, (x, v) in meta.items():
        if k in names:
            out[k] = (x, v)
        else:
            nv = torch.zeros_like(v)
            out[k] = (x * 0 if x.is_floating_point() else x, nv)
    return out


@dataclass
class Embeddings:
    keys: list[str]
    image: ProbEmbedding
    audio: ProbEmbedding
    text: ProbEmbedding | None = None


@torch.inference_mode()
def embed_shards(model, shards, tokenizer=None, zoom_level: int = 1, mel_version: int = 1,
                 metadata: str = "none", batch_size: int = 500, device: str | torch.device | None = None,
                 default_source: str | None = None, num_workers: int = 0, progress: bool = True,
                 text: bool = True) -> Embeddings:
    """Image, audio (and text) embeddings of every sample of ``shards`` (float32, CPU)."""
    cfg = model.config
    dev = torch.device(device) if device is not None else model.device
    model.to(dev).eval()
    use_text = text and hasattr(model, "text_encoder")
    if use_text and tokenizer is None:
        raise InputError("text evaluation needs a tokenizer: pass --tokenizer DIR, or --no-text")
    dcfg = DataConfig(sat_type=cfg.sat_type, metadata_type=cfg.metadata_type, train=False,
                      eval_zoom_level=zoom_level, eval_mel_version=mel_version, default_source=default_source)
    ds = ShardDataset(shards, dcfg)
    loader = make_loader(ds, batch_size, Collate(cfg.metadata_type, tokenizer if use_text else None), num_workers)
    keys: list[str] = []
    imgs, auds, txts = [], [], []
    for batch in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
        keys += batch["key"]
        meta = keep_metadata({k: (x.to(dev), v.to(dev)) for k, (x, v) in unflatten_meta(batch["meta"]).items()},
                             metadata)
        imgs.append(image_embedding(model.sat_encoder, cfg.sat_type, cfg.probabilistic, batch["image"].to(dev),
                                    batch["zoom_level"].to(dev), meta).cpu())
        auds.append(model.audio_encoder(input_features=batch["input_features"].to(dev),
                                        is_longer=batch["is_longer"].to(dev)).cpu())
        if use_text:
            txts.append(model.text_encoder(input_ids=batch["input_ids"].to(dev),
                                           attention_mask=batch["attention_mask"].to(dev)).cpu())
    if not keys:
        raise InputError("the shards hold no samples: check the --shards pattern")
    f = _float
    return Embeddings(keys, f(ProbEmbedding.cat(imgs)), f(ProbEmbedding.cat(auds)),
                      f(ProbEmbedding.cat(txts)) if txts else None)


def _float(e: ProbEmbedding) -> ProbEmbedding:
    return ProbEmbedding(e.mean.float(), logvar=None if e.logvar is None else e.logvar.float(), raw_mean=e.raw_mean.float())


@dataclass
class EvalRow:
    direction: str  # image_to_sound | sound_to_image
    add_text: bool
    metrics: RetrievalMetrics

    def as_dict(self) -> dict:
        return {"direction": self.direction, "add_text": self.add_text, **self.metrics.as_dict()}


@dataclass
class EvaluationReport:
    n: int
    zoom_level: int
    mel_version: int
    metadata: str
    recall_at: float
    similarity: str
    rows: list[EvalRow] = field(default_factory=list)
    checkpoint: str | None = None
    shards: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "rows"}
        d["results"] = [r.as_dict() for r in self.rows]
        return d

    def table(self) -> str:
        head = (f"{'direction':<16}{'text':<6}{'N':>7}{f'R@{self.recall_at:g}%':>9}{'median rank':>13}"
                f"{'query unc.':>12}{'gallery unc.':>14}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            m = r.metrics
            lines.append(f"{r.direction:<16}{'yes' if r.add_text else 'no':<6}{m.n:>7}{m.recall:>9.4f}"
                         f"{m.median_rank:>13.1f}{m.query_uncertainty:>12.4f}{m.gallery_uncertainty:>14.4f}")
        return "\n".join(lines)

    def write_json(self, path: str | os.PathLike) -> Path:
        p = Path(path)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(self.as_dict(), indent=2, allow_nan=True))
            os.replace(tmp, p)
        except OSError as e:
            raise OutputError(f"cannot write {p}: {e.strerror}; choose a writable --out") from None
        return p


def metrics_from_embeddings(emb: Embeddings, recall_at: float = 10, similarity: str | None = None,
                            add_text: Sequence[bool] = (False, True), progress: bool = False) -> list[EvalRow]:
    """Image-to-sound and sound-to-image, without and (when text is there) with ``add_text``."""
    rows = []
    for with_text in add_text:
        if with_text and emb.text is None:
            continue
        img_q = emb.image.combine(emb.text) if with_text else emb.image
        aud_q = emb.audio.combine(emb.text) if with_text else emb.audio
        rows.append(EvalRow("image_to_sound", with_text,
                            retrieval_metrics(img_q, emb.audio, recall_at, similarity, return_ranks=False,
                                              progress=progress)))
        rows.append(EvalRow("sound_to_image", with_text,
                            retrieval_metrics(aud_q, emb.image, recall_at, similarity, return_ranks=False,
                                              progress=progress)))
    return rows


def evaluate(checkpoint, shards, tokenizer=None, zoom_level: int = 1, mel_version: int = 1, metadata: str = "none",
             recall_at: float = 10, batch_size: int = 500, device: str | torch.device | None = None,
             text: bool = True, clap_config=None, default_source: str | None = None, num_workers: int = 0,
             progress: bool = True) -> EvaluationReport:
    """Evaluate a checkpoint (path or :class:`PSM`) on shards; see the module docstring."""
    from ..model import PSM
    from ..model.clap import load_tokenizer
    from .shards import check_metadata_type, check_shards, expand_shards

    check_metadata_type(metadata)
    if int(batch_size) < 1:
        raise InputError(f"--batch-size {batch_size} must be at least 1: give a positive whole number")
    if not 0 < float(recall_at) <= 100:
        raise InputError(f"--recall-at {recall_at} must be a percent of the gallery in (0, 100], e.g. 10")
    check_shards(expand_shards(shards))
    model = checkpoint if isinstance(checkpoint, PSM) else PSM.from_checkpoint(checkpoint, clap_config=clap_config)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    use_text = text and hasattr(model, "text_encoder")
    tok = None
    if use_text:
        tok = tokenizer if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) \
            else load_tokenizer(tokenizer)
    paths = expand_shards(shards)
    emb = embed_shards(model, paths, tok, zoom_level, mel_version, metadata, batch_size, device,
                       default_source, num_workers, progress, text=use_text)
    sim = "csd" if model.config.probabilistic else "cosine"
    rep = EvaluationReport(n=len(emb.keys), zoom_level=zoom_level, mel_version=mel_version, metadata=metadata,
                           recall_at=float(recall_at), similarity=sim,
                           rows=metrics_from_embeddings(emb, recall_at, sim),
                           checkpoint=None if isinstance(checkpoint, PSM) else str(checkpoint), shards=paths)
    return rep


__all__ = ["image_embedding", "keep_metadata", "embed_shards", "Embeddings", "EvalRow", "EvaluationReport",
           "metrics_from_embeddings", "evaluate"]
