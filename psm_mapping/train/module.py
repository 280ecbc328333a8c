"""The Lightning module that trains PSM (PSM_SPEC.md section 9, the authors' ``engine.py``).

Attributes ``sat_encoder``, ``audio_encoder``, ``text_encoder`` (the :class:`PSM` submodules) and
``criterion`` make the checkpoint's ``state_dict`` keys exactly the official ones; the
``hyper_parameters`` carry the official keys (plus ``clap_config``, ``num_heads``,
``sat_input_size`` for non-default sizes), so the ``.ckpt`` that :class:`ModelCheckpoint` writes
loads with :meth:`PSM.from_checkpoint` and runs in ``psm-map``.

Importing this module imports Lightning: the rest of the package does not.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch

from ..constants import FULL_METADATA
from ..errors import CheckpointError, InputError
from ..model.heads import ProbEmbedding
from .config import TrainConfig
from .data import apply_metadata_dropout, unflatten_meta
from .evaluate import image_embedding
from .loss import build_criterion, total_loss
from .metrics import retrieval_metrics

log = logging.getLogger(__name__)


class PSMLightning(pl.LightningModule):
    """Trains a PSM. Build with keyword hyper-parameters (the authors' names)."""

    def __init__(self, sat_type: str = "sentinel", metadata_type: str = FULL_METADATA, probabilistic: bool = True,
                 modality_type: str = "sat_audio_text", fc_dim: int = 512, embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, sat_input_size: int = 224, clap_config: dict | None = None,
                 learning_rate: float = 5e-5, weight_decay: float = 0.2, warm_up_iterations: int = 5000,
                 meta_droprate: float = 0.5, pseudo_match_alpha: float = 0.1, vib_beta: float = 1e-4,
                 loss_text_weight: float = 0.5, recall_at: int = 10, label_smoothing: float = 1e-4,
                 dataset_type: str | None = None, freeze: bool = False, pretrained_model_path: str = "none",
                 gather_distributed: bool = True, seed: int = 56, **extra: Any):
        super().__init__()
        from ..model.factory import hyper_parameters
        from ..model.psm import PSM, PSMConfig

        if modality_type not in ("sat_audio", "sat_audio_text"):
            raise InputError(f"modality_type {modality_type!r}: use sat_audio or sat_audio_text")
        text = "text" in modality_type
        hp = hyper_parameters(sat_type, metadata_type, probabilistic, text)
        hp.update(mode="train", fc_dim=fc_dim, meta_droprate=meta_droprate, pseudo_match_alpha=pseudo_match_alpha,
                  vib_beta=vib_beta, learning_rate=learning_rate, weight_decay=weight_decay,
                  warm_up_iterations=warm_up_iterations, loss_text_weight=loss_text_weight, recall_at=recall_at,
                  label_smoothing=label_smoothing, freeze=freeze, pretrained_model_path=pretrained_model_path,
                  sat_input_size=sat_input_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                  gather_distributed=gather_distributed, seed=seed)
        if dataset_type:
            hp["dataset_type"] = dataset_type
        if clap_config is not None:
            hp["clap_config"] = dict(clap_config)
        hp.update(extra)
        self.save_hyperparameters(hp)

        cfg = PSMConfig(sat_type=sat_type, metadata_type=metadata_type, probabilistic=probabilistic, fc_dim=fc_dim,
                        embed_dim=embed_dim, depth=depth, num_heads=num_heads, img_size=sat_input_size, text=text)
        psm = PSM(cfg, clap_config)
        self.psm_config = cfg
        self.clap_config = psm.clap_config
        self.sat_encoder = psm.sat_encoder
        self.audio_encoder = psm.audio_encoder
        if text:
            self.text_encoder = psm.text_encoder
        self.criterion = build_criterion(hp["loss_type"], pseudo_match_alpha, vib_beta)
        if freeze:  # the authors' --freeze: CLAP towers fixed
            for branch in (self.audio_encoder, getattr(self, "text_encoder", None)):
                if branch is not None:
                    for p in branch.model.parameters():
                        p.requires_grad_(False)
        self._val: list[tuple[ProbEmbedding, ProbEmbedding]] = []
        self._dropout_gen = torch.Generator().manual_seed(seed)
        self.train()  # PSM builds in eval mode; Lightning keeps the modes it finds
        #: (global_step, loss) of every training step; validation metrics per run
        self.train_history: list[tuple[int, float]] = []
        self.val_history: list[dict[str, float]] = []

    # ------------------------------------------------------------------ initialisation
    def load_satmae(self, path: str | os.PathLike) -> tuple[list[str], list[str]]:
        """Initialise the ViT from a SatMAE (MAE-style) pretrain checkpoint; returns (missing, unexpected)."""
        return load_satmae(self.sat_encoder.encoder.backbone, path)

    def load_clap(self, folder: str | os.PathLike) -> None:
        """Copy the audio and text towers of a Hugging Face CLAP folder into the model."""
        load_clap_towers(folder, self.audio_encoder, getattr(self, "text_encoder", None))

    # ------------------------------------------------------------------ forward
    def embed(self, batch: dict, train: bool) -> tuple[ProbEmbedding, ProbEmbedding, ProbEmbedding | None]:
        hp = self.hparams
        meta = unflatten_meta(batch["meta"])
        if train and hp.meta_droprate > 0:
            meta = apply_metadata_dropout(meta, hp.meta_droprate, self._dropout_gen)
        img = image_embedding(self.sat_encoder, hp.sat_type, hp.probabilistic, batch["image"], batch["zoom_level"], meta)
        aud = self.audio_encoder(input_features=batch["input_features"], is_longer=batch["is_longer"])
        txt = None
        if hasattr(self, "text_encoder") and "input_ids" in batch:
            txt = self.text_encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return img, aud, txt

    def _pair_loss(self, a: ProbEmbedding, b: ProbEmbedding):
        """The criterion on the local batch, or (DDP) on the whole global batch: every rank gathers
        both sides from every rank (in rank order, its own rows kept as computed so gradients flow
        to them) and computes the loss of all ``world x B`` pairs, so each rank's loss *is* the
        single-process loss of that global batch, pseudo-positives over the whole matrix included.
        Gradients: the gather's backward sums what every rank sends to a rank's rows (``world``
        times the same values) and DDP averages over ranks, which gives exactly the single-process
        gradient (``tests/test_ddp.py``: 2 processes x B equal one process x 2B within 1e-5)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        if world <= 1 or not self.hparams.gather_distributed:
            return self.criterion(a, b)
        rank = self.global_rank

        def gather(t: torch.Tensor) -> torch.Tensor:
            g = self.all_gather(t, sync_grads=True)  # [world, B, D]
            return torch.cat([t if i == rank else g[i] for i in range(world)])

        def all_of(e: ProbEmbedding) -> ProbEmbedding:
            return ProbEmbedding(gather(e.mean), logvar=None if e.logvar is None else gather(e.logvar),
                                 raw_mean=gather(e.raw_mean))

        return self.criterion(all_of(a), all_of(b))

    def on_train_start(self) -> None:
        # metadata dropout: every rank draws its own items (the same seed on every rank would drop
        # the same positions of each local batch); rank 0 keeps the single-process draws
        if self.global_rank:
            self._dropout_gen.manual_seed(int(self.hparams.seed) + 1000 * int(self.global_rank))

    def training_step(self, batch: dict, batch_idx: int):
        img, aud, txt = self.embed(batch, train=True)
        loss, parts = total_loss(self.criterion, img, aud, txt, self.hparams.loss_text_weight, self._pair_loss)
        bs = batch["image"].shape[0]
        self.log("train_loss", loss.detach(), prog_bar=True, batch_size=bs, sync_dist=True)
        for k, v in parts.items():
            if k != "loss":
                self.log(f"train_{k}", v, batch_size=bs, sync_dist=True)
        self.train_history.append((int(self.global_step), float(loss.detach())))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val = []

    def validation_step(self, batch: dict, batch_idx: int):
        # no metadata dropout here (the reference dropped at validation too; that was a bug)
        img, aud, txt = self.embed(batch, train=False)
        loss, _ = total_loss(self.criterion, img, aud, txt, self.hparams.loss_text_weight)
        self.log("val_loss", loss.detach(), prog_bar=True, batch_size=batch["image"].shape[0])
        self._val.append((img.detach().to(torch.float32), aud.detach().to(torch.float32)))

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        img = ProbEmbedding.cat([v[0] for v in self._val])
        aud = ProbEmbedding.cat([v[1] for v in self._val])
        self._val = []
        sim = "csd" if self.hparams.probabilistic else "cosine"
        i2s = retrieval_metrics(img, aud, self.hparams.recall_at, sim, return_ranks=False)
        s2i = retrieval_metrics(aud, img, self.hparams.recall_at, sim, return_ranks=False)
        vals = {"I2S_Recall": i2s.recall, "I2S_Median_Rank": i2s.median_rank,
                "S2I_Recall": s2i.recall, "S2I_Median_Rank": s2i.median_rank}
        for k, v in vals.items():
            self.log(k, float(v), prog_bar=k == "I2S_Recall")
        if not self.trainer.sanity_checking:
            self.val_history.append({"step": int(self.global_step), "n": i2s.n, **vals})

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay, betas=(0.9, 0.98), eps=1e-6)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=int(hp.warm_up_iterations))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1,
                                                   "name": "train/lr"}}

    # ------------------------------------------------------------------ export
    def to_psm(self):
        """A :class:`PSM` (eval mode, float32) with this module's current weights."""
        from ..model.psm import PSM

        psm = PSM(self.psm_config, self.clap_config)
        sd = {k: v for k, v in self.state_dict().items() if not k.startswith("criterion.")}
        missing, unexpected = psm.load_state_dict(sd, strict=False)
        bad = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))] + list(unexpected)
        if bad:
            raise CheckpointError(f"module and PSM disagree on {bad[:4]}: this is a bug, please report it")
        return psm.float().eval()


# ---------------------------------------------------------------------- initialisation
def _sync_batchnorm(cfg) -> bool:
    """DDP on several GPUs: the CLAP audio BatchNorm normalises over the global batch (SyncBatchNorm,
    GPU only), as one process with the whole batch does."""
    import torch

    gpu = str(cfg.accelerator) in ("gpu", "cuda") or (str(cfg.accelerator) == "auto" and torch.cuda.is_available())
    many = cfg.devices not in (1, "1", [0], None) and not (isinstance(cfg.devices, int) and cfg.devices < 2)
    return bool(gpu and many)


def load_satmae(backbone: torch.nn.Module, path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """Load a SatMAE / MAE pretrain checkpoint (``{'model': timm ViT weights, ...}`` or a bare
    state_dict) into ``backbone`` non-strictly: returns ``(missing, unexpected)`` key lists.

    Read with ``weights_only=True``; ``argparse.Namespace`` (MAE checkpoints store their ``args``)
    is allowed: it only holds attributes. A shape mismatch is an error that names the key."""
    import argparse
    import pickle
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"SatMAE checkpoint {p} not found: pass --satmae PATH to the pretrain .pth")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"{p.name} holds objects other than weights ({str(exc).splitlines()[0][:160]}): "
                              "re-save its 'model' state_dict with torch.save") from None
    except Exception as exc:  # noqa: BLE001 - the weights-only unpickler runs no code
        raise CheckpointError(f"{p.name} is not a readable PyTorch file ({type(exc).__name__}): check the path") from None
    sd = obj.get("model", obj.get("state_dict", obj)) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{p.name} has no 'model' state_dict of tensors: give a SatMAE/MAE pretrain checkpoint")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = backbone.state_dict()
    mis = [f"{k} {list(v.shape)} vs model {list(own[k].shape)}" for k, v in sd.items()
           if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mis:
        raise CheckpointError(f"{p.name} does not fit the image encoder ({'; '.join(mis[:3])}): use a ViT of the "
                              "same size (ViT-B/16 for SatMAE) or drop --satmae")
    result = backbone.load_state_dict(sd, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    loaded = len(own) - len(missing)
    log.warning("SatMAE init from %s: %d tensors loaded; missing %d (%s); unexpected %d (%s)", p.name, loaded,
                len(missing), ", ".join(missing[:6]), len(unexpected), ", ".join(unexpected[:6]))
    if loaded == 0:
        raise CheckpointError(f"no tensor of {p.name} matches the image encoder: it is not a SatMAE ViT checkpoint")
    return missing, unexpected


def load_clap_towers(folder: str | os.PathLike, audio_branch, text_branch=None) -> None:
    """Copy ``audio_model``/``audio_projection`` (and the text ones) of a local Hugging Face
    ``ClapModel`` folder into PSM's CLAP branches, strictly."""
    from pathlib import Path

    from transformers import ClapModel

    d = Path(folder)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"CLAP folder {d} has no config.json: pass --clap-weights DIR holding a saved "
                              "ClapModel (e.g. `hf download laion/clap-htsat-fused --local-dir DIR`)")
    try:
        clap = ClapModel.from_pretrained(str(d), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise CheckpointError(f"cannot load a ClapModel from {d} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:160] if str(exc) else ''}): check the folder") from None
    pairs = [(audio_branch.model.model.audio_model, clap.audio_model),
             (audio_branch.model.model.audio_projection, clap.audio_projection)]
    if text_branch is not None:
        pairs += [(text_branch.model.model.text_model, clap.text_model),
                  (text_branch.model.model.text_projection, clap.text_projection)]
    for dst, src in pairs:
        try:
            dst.load_state_dict(src.state_dict(), strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"the CLAP weights in {d} do not fit the model ({str(exc).splitlines()[0][:200]}): "
                                  "build the model with that folder's config") from None


def clap_config_of(folder: str | os.PathLike):
    """The ``ClapConfig`` saved in a Hugging Face CLAP folder."""
    from pathlib import Path

    from transformers import ClapConfig

    d = Path(folder)
    if not (d / "config.json").is_file():
        raise CheckpointError(f"CLAP folder {d} has no config.json: pass --clap-weights DIR holding a saved ClapModel")
    return ClapConfig.from_pretrained(str(d), local_files_only=True)


@dataclass
class TrainResult:
    best_checkpoint: str | None
    last_checkpoint: str | None
    best_score: float | None
    train_history: list[tuple[int, float]]
    val_history: list[dict[str, float]]
    out_dir: str





# ---------------------------------------------------------------------- driver
def _precision(p: str) -> str:
    if p == "auto":
        return "16-mixed" if torch.cuda.is_available() else "32-true"
    table = {"fp16": "16-mixed", "16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "fp32": "32-true"}
    return table.get(p, p)


def check_train_config(cfg: TrainConfig) -> None:
    """Cheap checks before any model is built or any folder written."""
    import math
    from pathlib import Path

    from .shards import check_metadata_type, check_shards, expand_shards

    check_metadata_type(cfg.metadata_type)
    for name, v in (("--batch-size", cfg.batch_size), ("--val-batch-size", cfg.val_batch_size),
                    ("--max-steps", cfg.max_steps), ("--val-every", cfg.val_check_interval)):
        if int(v) < 1:
            raise InputError(f"{name} {v} must be at least 1: give a positive whole number")
    if not (math.isfinite(float(cfg.learning_rate)) and float(cfg.learning_rate) > 0):
        raise InputError(f"--lr {cfg.learning_rate} is not positive: give a learning rate such as 5e-5")
    if not (math.isfinite(float(cfg.weight_decay)) and float(cfg.weight_decay) >= 0):
        raise InputError(f"--weight-decay {cfg.weight_decay} is negative: give 0 or more, e.g. 0.2")
    if not 0.0 <= float(cfg.meta_droprate) <= 1.0:
        raise InputError(f"--meta-droprate {cfg.meta_droprate} is not a probability: give a value in [0, 1], e.g. 0.5")
    if int(cfg.num_workers) < 0:
        raise InputError(f"--workers {cfg.num_workers} is negative: give 0 or more (0: load in this process)")
    if cfg.resume and "://" not in str(cfg.resume) and not Path(cfg.resume).is_file():
        raise CheckpointError(f"--resume {cfg.resume} not found: pass a Lightning checkpoint "
                              "(psm-train/checkpoints/last.ckpt) or drop --resume")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file: pass a folder for checkpoints and logs")
    for shards in (cfg.shards, cfg.val_shards):
        if shards and not isinstance(shards, torch.utils.data.Dataset):
            check_shards(expand_shards(shards))


def fit(cfg: TrainConfig) -> TrainResult:
    """Train (or fine-tune) PSM on shards; keeps the best checkpoint by validation I2S R@``recall_at``%."""
    from pathlib import Path

    check_train_config(cfg)

    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from ..model.clap import load_tokenizer, resolve_clap_config
    from .data import Collate, DataConfig, ShardDataset, make_loader

    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    clap = clap_config_of(cfg.clap_weights) if cfg.clap_weights else resolve_clap_config(cfg.clap_config)
    clap_dict = None
    if cfg.clap_weights or cfg.clap_config is not None:
        clap_dict = clap.to_dict()
    module = PSMLightning(
        sat_type=cfg.sat_type, metadata_type=cfg.metadata_type, probabilistic=cfg.probabilistic,
        modality_type=cfg.modality_type, fc_dim=cfg.fc_dim, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, clap_config=clap_dict, learning_rate=cfg.learning_rate,
        weight_decay=cfg.weight_decay, warm_up_iterations=cfg.warm_up_iterations, meta_droprate=cfg.meta_droprate,
        pseudo_match_alpha=cfg.pseudo_match_alpha, vib_beta=cfg.vib_beta, loss_text_weight=cfg.loss_text_weight,
        recall_at=cfg.recall_at, dataset_type=cfg.dataset_type, freeze=cfg.freeze,
        pretrained_model_path=str(cfg.satmae) if cfg.satmae else "none", seed=cfg.seed,
        train_batch_size=cfg.batch_size, val_batch_size=cfg.val_batch_size)
    if cfg.satmae:
        module.load_satmae(cfg.satmae)
    if cfg.clap_weights:
        module.load_clap(cfg.clap_weights)
    text = "text" in cfg.modality_type
    tok = None
    if text:
        tok = cfg.tokenizer if cfg.tokenizer is not None and not isinstance(cfg.tokenizer, (str, os.PathLike)) \
            else load_tokenizer(cfg.tokenizer)
    collate = Collate(cfg.metadata_type, tok)
    common = dict(sat_type=cfg.sat_type, metadata_type=cfg.metadata_type, mel_versions=tuple(cfg.mel_versions),
                  default_source=cfg.default_source, text=text)
    train_ds = ShardDataset(cfg.shards, DataConfig(train=True, zoom_levels=cfg.zoom_levels, **common),
                            seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
    train_loader = make_loader(train_ds, cfg.batch_size, collate, cfg.num_workers)
    val_loader = None
    if cfg.val_shards:
        val_ds = ShardDataset(cfg.val_shards, DataConfig(train=False, **common))
        val_loader = make_loader(val_ds, cfg.val_batch_size, collate, min(cfg.num_workers, 1))

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    callbacks = []
    ckpt_cb = None
    if val_loader is not None:
        ckpt_cb = ModelCheckpoint(dirpath=out / "checkpoints", monitor="I2S_Recall", mode="max", save_top_k=1,
                                  save_last=True, filename="epoch={epoch}-step={step}-I2S_Recall={I2S_Recall:.3f}",
                                  auto_insert_metric_name=False, save_on_train_epoch_end=False)
    else:
        ckpt_cb = ModelCheckpoint(dirpath=out / "checkpoints", save_top_k=0, save_last=True)
    callbacks.append(ckpt_cb)
    interval = max(1, min(int(cfg.val_check_interval), int(cfg.max_steps)))
    trainer = pl.Trainer(
        max_steps=int(cfg.max_steps), max_epochs=-1, accelerator=cfg.accelerator, devices=cfg.devices,
        strategy=cfg.strategy, precision=_precision(cfg.precision), callbacks=callbacks,
        logger=CSVLogger(str(out), name="logs"), val_check_interval=interval if val_loader is not None else None,
        check_val_every_n_epoch=None, limit_val_batches=cfg.limit_val_batches if val_loader is not None else 0,
        num_sanity_val_steps=0, enable_progress_bar=cfg.progress, enable_model_summary=cfg.progress,
        log_every_n_steps=max(1, min(cfg.log_every_n_steps, interval)), default_root_dir=str(out),
        use_distributed_sampler=False, sync_batchnorm=_sync_batchnorm(cfg))
    if cfg.validate_first and val_loader is not None:
        trainer.validate(module, dataloaders=val_loader, verbose=False)
        module.val_history[-1]["step"] = 0
    # resuming reads the full training state: weights-only, with the same small allowlist as
    # PSM.from_checkpoint, never an arbitrary pickle
    from ..model.checkpoint import _safe_globals

    with torch.serialization.safe_globals(_safe_globals()):
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=cfg.resume,
                    weights_only=True if cfg.resume else None)
    best = ckpt_cb.best_model_path or None
    score = ckpt_cb.best_model_score
    return TrainResult(best_checkpoint=best, last_checkpoint=ckpt_cb.last_model_path or None,
                       best_score=None if score is None else float(score),
                       train_history=list(module.train_history), val_history=list(module.val_history),
                       out_dir=str(out))
__all__ = ["PSMLightning", "TrainConfig", "TrainResult", "fit", "check_train_config", "load_satmae", "load_clap_towers", "clap_config_of"]
