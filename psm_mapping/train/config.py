"""``TrainConfig``: every setting of ``psm-map train``, written once.

Each field's metadata holds its command-line help (and flag, where the flag's name is not the
field's), so that the ``train`` parser is built from this class (:func:`add_config_arguments`) and
the defaults live here only. Importing this module imports neither torch nor Lightning.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ..constants import FULL_METADATA


def setting(default, help: str, flag: str | None = None, **argparse_kw):
    """A config field with its command-line help; ``flag`` when it differs from ``--field-name``;
    ``cli=False`` in ``argparse_kw`` keeps it off the command line."""
    meta = {"help": help, "flag": flag, **argparse_kw}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """Everything ``psm-map train`` sets; defaults are the authors'."""

    shards: Any = setting(None, "training shards: glob, {000..009} range or '::' list", required=True)
    val_shards: Any = setting(None, "validation shards (without them no best checkpoint is chosen)")
    sat_type: str = setting("sentinel", "imagery kind", choices=["sentinel", "bingmap", "googleEarth"])
    metadata_type: str = setting(FULL_METADATA, "metadata tokens, e.g. latlong_month_time_asource_tsource, "
                                 "or none", flag="--metadata")
    probabilistic: bool = setting(True, "PCME++ with Gaussian embeddings (default); --deterministic: "
                                  "the InfoNCE baseline", cli=False)
    modality_type: str = setting("sat_audio_text", "modalities", flag="--modality",
                                 choices=["sat_audio_text", "sat_audio"])
    out_dir: str = setting("psm-train", "output folder (checkpoints/, logs/)", flag="--out")
    max_steps: int = setting(300_000, "training steps")
    batch_size: int = setting(128, "per device")
    val_batch_size: int = setting(128, "validation batch size")
    limit_val_batches: int | float = setting(30, "validation batches (<=1.0: fraction)", type=float)
    val_check_interval: int = setting(500, "validate every N steps", flag="--val-every")
    precision: str = setting("auto", "auto (16-mixed on GPU, 32 on CPU), 16-mixed, bf16-mixed, 32-true")
    accelerator: str = setting("auto", "Lightning accelerator (auto, cpu, gpu)")
    devices: Any = setting(1, "devices per node (int, 'auto' or a list '0,1')", type="devices")
    strategy: str = setting("auto", "Lightning strategy, e.g. ddp, ddp_find_unused_parameters_true")
    num_workers: int = setting(2, "data loader workers", flag="--workers")
    learning_rate: float = setting(5e-5, "AdamW learning rate", flag="--lr")
    weight_decay: float = setting(0.2, "AdamW weight decay")
    warm_up_iterations: int = setting(5000, "cosine warm-restart period T_0 (steps)", flag="--restart-steps")
    meta_droprate: float = setting(0.5, "fraction of each batch whose metadata are dropped")
    pseudo_match_alpha: float = setting(0.1, "PCME++ pseudo-positive weight", cli=False)
    vib_beta: float = setting(1e-4, "PCME++ VIB weight", cli=False)
    loss_text_weight: float = setting(0.5, "weight of the image-text loss", cli=False)
    recall_at: int = setting(10, "R@k%% of the validation metric", cli=False)
    fc_dim: int = setting(512, "embedding size")
    embed_dim: int = setting(768, "ViT width (--tiny: 64)")
    depth: int = setting(12, "ViT depth (--tiny: 1)")
    num_heads: int = setting(12, "ViT heads (default: width / 64)", cli=False)
    clap_config: Any = setting(None, "CLAP config JSON (default: laion/clap-htsat-fused, or --tiny's)")
    satmae: str | None = setting(None, "SatMAE pretrain checkpoint (.pth with a 'model' dict) to initialise the ViT")
    clap_weights: str | None = setting(None, "folder of a saved Hugging Face ClapModel to initialise audio/text towers")
    tokenizer: Any = setting(None, "RoBERTa tokenizer folder (default: roberta-base from the HF cache)")
    mel_versions: tuple[int, ...] = setting((1, 2, 3, 4, 5), "mel draws to sample from", type="ints")
    zoom_levels: tuple[int, ...] | None = setting(None, "zoom levels to sample from (default 1,3,5; googleEarth 1)",
                                                  type="ints")
    default_source: str | None = setting(None, "audio source of keys without one (SoundingEarth: aporee)")
    dataset_type: str | None = setting(None, "dataset kind of the shards", cli=False)
    freeze: bool = setting(False, "keep the CLAP towers fixed", flag="--freeze-clap")
    seed: int = setting(56, "random seed")
    shuffle_buffer: int = setting(1000, "samples in the shuffle buffer")
    validate_first: bool = setting(False, "also validate before the first step")
    resume: str | None = setting(None, "Lightning checkpoint to resume training from")
    progress: bool = setting(True, "progress bars and logs (--quiet: off)", cli=False)
    log_every_n_steps: int = setting(15, "log the loss every N steps", cli=False)

    def tiny(self) -> "TrainConfig":
        """Small ViT (64 wide, depth 1) and the tiny test CLAP, unless set otherwise."""
        from ..model.factory import TINY_CLAP

        self.embed_dim, self.depth, self.num_heads = 64, 1, 1
        if self.clap_config is None and self.clap_weights is None:
            self.clap_config = TINY_CLAP
        return self


def add_config_arguments(parser, cls=TrainConfig, types: dict | None = None) -> None:
    """One argument per field of ``cls`` with help metadata (``cli=False`` ones left out), each
    defaulting to "not given" so that the dataclass keeps the defaults. ``types`` maps the
    metadata's named types (e.g. ``"ints"``) to argparse type functions."""
    import argparse

    types = dict(types or {})
    for f in fields(cls):
        meta = dict(f.metadata)
        if not meta or not meta.pop("cli", True):
            continue
        flag = meta.pop("flag", None) or "--" + f.name.replace("_", "-")
        help_ = meta.pop("help")
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        if isinstance(f.default, bool):
            kw["action"] = "store_true"
        else:
            t = meta.pop("type", None)
            kw["type"] = types.get(t, t) if isinstance(t, str) else (t or _type_of(f.default))
            kw.update(meta)
            if "choices" not in kw:
                kw["metavar"] = flag[2:].upper().replace("-", "_")
            if f.default is not None and not isinstance(f.default, tuple):
                help_ += f" (default {f.default})"
        parser.add_argument(flag, help=help_, **kw)


def _type_of(default):
    return type(default) if isinstance(default, (int, float)) and not isinstance(default, bool) else str


__all__ = ["TrainConfig", "add_config_arguments", "setting"]
