"""What a PSM model looks like (:class:`PSMConfig`), read from a checkpoint's weights and
hyper_parameters."""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from ..constants import SAT_TYPES
from ..errors import CheckpointError
from .fusion import metadata_items

log = logging.getLogger(__name__)


@dataclass
class PSMConfig:
    """What the model looks like; read from a checkpoint's hyper_parameters and weights."""

    sat_type: str = "sentinel"
    metadata_type: str = "none"
    probabilistic: bool = True
    fc_dim: int = 512
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    img_size: int = 224
    fuser_layers: int = 3
    fuser_heads: int = 8
    text: bool = True
    audio: bool = True

    def __post_init__(self):
        if self.sat_type not in SAT_TYPES:
            raise CheckpointError(f"unknown sat_type {self.sat_type!r}: expected one of {', '.join(SAT_TYPES)}")

    @property
    def loss_type(self) -> str:
        return "pcmepp" if self.probabilistic else "infonce"

    @property
    def uses_metadata(self) -> bool:
        return bool(metadata_items(self.metadata_type))

    @classmethod
    def from_dict(cls, d: dict) -> "PSMConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def infer(cls, state_dict: dict[str, torch.Tensor], hp: dict[str, Any]) -> "PSMConfig":
        """From weights (depth, widths, heads present) and hyper_parameters (sat/metadata type)."""
        pre = "sat_encoder.encoder."
        try:
            pw = state_dict[pre + "backbone.patch_embed.proj.weight"]
            fc1 = state_dict[pre + "backbone.blocks.0.mlp.fc1.weight"]
            proj = state_dict[pre + "projector.linear2.weight"]
        except KeyError as exc:
            raise CheckpointError(f"checkpoint lacks {exc.args[0]}: it is not a PSM SatMAE checkpoint; "
                                  "use one of the official experiments (`psm-map weights`)") from None
        depth = _count_indexed(state_dict, pre + "backbone.blocks.")
        prob_keys = pre + "mean_head.linear1.weight" in state_dict
        probabilistic = bool(hp["probabilistic"]) if "probabilistic" in hp else prob_keys
        if hp.get("loss_type") in ("pcmepp", "infonce"):
            probabilistic = hp["loss_type"] == "pcmepp"
        if probabilistic != prob_keys:
            raise CheckpointError("checkpoint hyper_parameters and weights disagree on the loss type "
                                  f"(loss_type={hp.get('loss_type')!r}, mean_head present: {prob_keys}): "
                                  "the file is inconsistent; re-export it")
        has_fuser = any(k.startswith(pre + "meta_fuser.") for k in state_dict)
        mt = hp.get("metadata_type")
        if mt is None:
            items = [i for i, m in (("latlong", "location_fc"), ("month", "month_fc"), ("time", "time_fc"),
                                    ("asource", "audio_source_fc"), ("tsource", "caption_source_fc"))
                     if any(f"meta_embed.{m}." in k for k in state_dict)]
            mt = "_".join(items) if items else "none"
        if bool(metadata_items(mt)) != has_fuser:
            raise CheckpointError(f"metadata_type {mt!r} does not match the weights (fusion weights "
                                  f"present: {has_fuser}): the file is inconsistent; re-export it")
        fuser_layers = 3
        if has_fuser:
            fuser_layers = _count_indexed(state_dict, pre + "meta_fuser.transformer_encoder.layers.")
        embed_dim = pw.shape[0]
        modality = str(hp.get("modality_type", ""))
        text = any(k.startswith("text_encoder.") for k in state_dict)
        if modality and ("text" in modality) != text:
            log.warning("modality_type %r and weights disagree on the text encoder", modality)
        sat_type = hp.get("sat_type", "sentinel")
        return cls(
            sat_type=sat_type, metadata_type=mt, probabilistic=probabilistic,
            fc_dim=proj.shape[0], embed_dim=embed_dim, depth=depth,
            num_heads=int(hp.get("num_heads", max(1, embed_dim // 64))),
            mlp_ratio=fc1.shape[0] / embed_dim, patch_size=pw.shape[-1],
            img_size=int(hp.get("sat_input_size", 224)), fuser_layers=fuser_layers,
            text=text, audio=any(k.startswith("audio_encoder.") for k in state_dict),
        )


def _count_indexed(state_dict: dict, prefix: str) -> int:
    """Number of ``prefix.N.*`` submodules (e.g. transformer blocks)."""
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict if k.startswith(prefix)}
    return max(idx) + 1 if idx else 0
