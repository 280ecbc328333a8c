"""Metadata fusion transformer (PSM_SPEC.md section 3), key names as the official checkpoints."""
from __future__ import annotations

import torch
from torch import nn

from ..constants import AUDIO_SOURCES, CAPTION_SOURCES, METADATA_ITEMS


def standard_normal(*shape: int) -> torch.Tensor:
    """``torch.randn(*shape)`` (the same draws), except on the meta device, where there is
    nothing to draw: drawing there sets up torch's symbolic machinery, seconds of start-up."""
    w = torch.empty(*shape)
    return w if w.is_meta else w.normal_()


class SourceEncoding(nn.Module):
    def __init__(self, n: int, dim: int):
        super().__init__()
        self.source_embed = nn.Embedding(n, dim, _weight=standard_normal(n, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.source_embed(x)


class MetaNet(nn.Module):
    """``fc2(GELU(fc1(x)))``, ``in -> 64 -> dim``."""

    def __init__(self, in_dim: int, dim: int, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(x)))


def metadata_items(metadata_type: str) -> tuple[str, ...]:
    """The metadata tokens a ``metadata_type`` string names, in token order."""
    if metadata_type in (None, "", "none"):
        return ()
    return tuple(i for i in METADATA_ITEMS if i in metadata_type)


class MetaEmbed(nn.Module):
    _modules_for = {"asource": "audio_source_fc", "tsource": "caption_source_fc",
                    "latlong": "location_fc", "month": "month_fc", "time": "time_fc"}

    def __init__(self, items: tuple[str, ...], dim: int):
        super().__init__()
        self.items = items
        if "asource" in items:
            self.audio_source_fc = SourceEncoding(len(AUDIO_SOURCES), dim)
        if "tsource" in items:
            self.caption_source_fc = SourceEncoding(len(CAPTION_SOURCES), dim)
        if "latlong" in items:
            self.location_fc = MetaNet(4, dim)
        if "month" in items:
            self.month_fc = MetaNet(2, dim)
        if "time" in items:
            self.time_fc = MetaNet(2, dim)

    def forward(self, inputs: dict, batch: int, like: torch.Tensor):
        """Tokens ``[B, M, dim]`` and validity ``[B, M]``; absent items are zero and invalid."""
        tokens, valid = [], []
        for item in self.items:
            module = getattr(self, self._modules_for[item])
            if item in inputs:
                x, v = inputs[item]
                emb = module(x.to(like.device)) * v.to(like.device)[:, None]
                tokens.append(emb.to(like.dtype))
                valid.append(v.to(like.device).bool())
            else:
                tokens.append(like.new_zeros(batch, like.shape[-1]))
                valid.append(torch.zeros(batch, dtype=torch.bool, device=like.device))
        return torch.stack(tokens, 1), torch.stack(valid, 1)


class MetaFuser(nn.Module):
    """``[CLS, z_img, metadata...]`` through 3 post-norm encoder layers; returns the CLS output."""

    def __init__(self, metadata_type: str, dim: int = 512, nhead: int = 8, num_layers: int = 3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model=dim, nhead=nhead, batch_first=True,
                                           activation="gelu")
        self.transformer_encoder = nn.TransformerEncoder(layer, num_layers=num_layers,
                                                         enable_nested_tensor=False)
        self.cls_token = nn.Parameter(standard_normal(1, 1, dim))
        self.meta_embed = MetaEmbed(metadata_items(metadata_type), dim)

    def forward(self, z: torch.Tensor, inputs: dict | None) -> torch.Tensor:
        B = z.shape[0]
        meta, valid = self.meta_embed(inputs or {}, B, z)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(z.dtype), z[:, None], meta], dim=1)
        keep = torch.cat([torch.ones(B, 2, dtype=torch.bool, device=z.device), valid], dim=1)
        if not self.training:
            # tokens masked in every row change no output (their keys are masked, and each
            # token's FFN is its own): leave them out, e.g. 2 of 7 tokens when all metadata are
            # masked (a map query without month/hour). Training keeps them (dropout draws).
            cols = keep.any(0)
            if not bool(cols.all()):
                x, keep = x[:, cols], keep[:, cols]
        return self.transformer_encoder(x, src_key_padding_mask=~keep)[:, 0]
