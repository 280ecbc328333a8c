"""The CLAP text tower (RoBERTa encoder + pooler + projection) in plain torch.

The same computation and state-dict keys as ``transformers.ClapTextModelWithProjection``
(``text_model.embeddings.*``, ``text_model.encoder.layer.N.*``, ``text_model.pooler.dense``,
``text_projection.linear{1,2}``), so official PSM checkpoints load into it strictly, without
importing ``transformers``. Built from the CLAP config as a plain dict (:func:`text_config`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from .fusion import standard_normal


@dataclass(frozen=True)
class TextConfig:
    """``ClapTextConfig`` fields the tower uses, with its defaults (laion/clap-htsat-fused)."""

    vocab_size: int = 50265
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 1
    projection_dim: int = 512
    projection_hidden_act: str = "relu"


def read_clap_dict(clap_config: Any) -> dict | None:
    """A CLAP config as a plain dict: ``None`` (the default architecture), a dict, a JSON file,
    or an object with ``to_dict()`` (``transformers.ClapConfig``). Never imports transformers."""
    if clap_config is None or isinstance(clap_config, dict):
        return clap_config
    if isinstance(clap_config, (str, os.PathLike)):
        path = Path(clap_config)
        if not path.is_file():
            raise InputError(f"CLAP config {path} not found: pass the JSON file written with the "
                             "checkpoint (ClapConfig.to_json_file) or omit it for laion/clap-htsat-fused")
        try:
            d = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"CLAP config {path} is not valid JSON ({exc}): fix or regenerate it") from None
        if not isinstance(d, dict):
            raise InputError(f"CLAP config {path} holds no JSON object: fix or regenerate it")
        return d
    if callable(getattr(clap_config, "to_dict", None)):
        return clap_config.to_dict()
    raise InputError(f"clap_config of type {type(clap_config).__name__} is not supported: pass "
                     "None, a transformers.ClapConfig, a dict or a JSON path")


def text_config(clap_config: Any = None) -> TextConfig:
    """The text tower's config from a CLAP config (as ``ClapConfig`` resolves it: the top-level
    ``projection_dim`` and ``projection_hidden_act`` override the text config's)."""
    d = read_clap_dict(clap_config) or {}
    names = {f.name for f in fields(TextConfig)}
    tc = {k: v for k, v in (d.get("text_config") or {}).items() if k in names}
    tc["projection_dim"] = d.get("projection_dim", TextConfig.projection_dim)
    tc["projection_hidden_act"] = d.get("projection_hidden_act", TextConfig.projection_hidden_act)
    if tc.get("pad_token_id") is None:
        tc.pop("pad_token_id", None)
    cfg = TextConfig(**tc)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise InputError(f"CLAP text config: hidden_size {cfg.hidden_size} is not a multiple of "
                         f"num_attention_heads {cfg.num_attention_heads}: fix the CLAP config")
    activation(cfg.hidden_act), activation(cfg.projection_hidden_act)  # known names, said at once
    return cfg


_ACTIVATIONS = {
    "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in _ACTIVATIONS:
        raise InputError(f"CLAP config names the activation {name!r}, which the text tower does not "
                         f"implement: use one of {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


class Table(nn.Module):
    """An embedding table (``weight`` ``[n, dim]``), N(0, 1) initialised as ``nn.Embedding``,
    except on the meta device, where there are no values to draw (and drawing costs seconds)."""

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(standard_normal(n, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Embeddings(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.padding_idx = c.pad_token_id
        self.word_embeddings = Table(c.vocab_size, c.hidden_size)
        self.token_type_embeddings = Table(c.type_vocab_size, c.hidden_size)
        self.position_embeddings = Table(c.max_position_embeddings, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)
        # persistent, as the checkpoints carry them (absent ones are rebuilt by PSM.from_checkpoint)
        # (values filled off the meta device only: index ops there set up torch's symbolic machinery)
        pos = torch.empty((1, c.max_position_embeddings), dtype=torch.long)
        types = torch.empty((1, c.max_position_embeddings), dtype=torch.long)
        if not pos.is_meta:
            pos.copy_(torch.arange(c.max_position_embeddings)[None])
            types.zero_()
        self.register_buffer("position_ids", pos)
        self.register_buffer("token_type_ids", types)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # RoBERTa: positions count non-padding tokens from padding_idx + 1; padding keeps padding_idx
        mask = input_ids.ne(self.padding_idx).int()
        pos = (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + self.padding_idx
        types = torch.gather(self.token_type_ids.expand(pos.shape[0], -1), 1, pos)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(types) + self.position_embeddings(pos)
        return self.dropout(self.LayerNorm(x))


class SelfAttention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.p = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (lin(x).view(B, N, self.heads, D // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        return out.transpose(1, 2).reshape(B, N, D)


class AddNorm(nn.Module):
    """``LayerNorm(dropout(dense(x)) + residual)`` (post-LN), keys ``dense`` and ``LayerNorm``."""

    def __init__(self, d_in: int, c: TextConfig):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = AddNorm(c.hidden_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.output(self.self(x, mask), x)


class Intermediate(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)
        self.act = activation(c.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = AddNorm(c.intermediate_size, c)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        a = self.attention(x, mask)
        return self.output(self.intermediate(a), a)


class Encoder(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, mask)
        return x


class Pooler(nn.Module):
    """``tanh(dense(hidden[:, 0]))``: the first token (``<s>``)."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class TextModel(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.embeddings = Embeddings(c)
        self.encoder = Encoder(c)
        self.pooler = Pooler(c)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None
        if attention_mask is not None:
            keep = attention_mask.bool()
            # trailing columns padded in every row change nothing (masked keys weigh exactly 0,
            # and only the first token is pooled): drop them, a 128-token batch of short texts
            # costs what its longest text costs. Not in training: dropout's random draws follow
            # the tensor shapes, and a batch split over DDP ranks must draw as the whole batch does
            cols = keep.any(0).nonzero()
            n = int(cols.max()) + 1 if cols.numel() and not self.training else keep.shape[1]
            input_ids, keep = input_ids[:, :n], keep[:, :n]
            mask = None if bool(keep.all()) else keep[:, None, None, :]
        return self.pooler(self.encoder(self.embeddings(input_ids), mask))


class Projection(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.linear1 = nn.Linear(c.hidden_size, c.projection_dim)
        self.linear2 = nn.Linear(c.projection_dim, c.projection_dim)
        self.act = activation(c.projection_hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.act(self.linear1(x)))


class ClapTextTower(nn.Module):
    """``ClapTextModelWithProjection`` in plain torch: ``forward(input_ids, attention_mask)`` ->
    ``text_embeds`` ``[B, projection_dim]`` (the projection of the pooled first token)."""

    def __init__(self, config: TextConfig):
        super().__init__()
        self.config = config
        self.text_model = TextModel(config)
        self.text_projection = Projection(config)

    @property
    def out_dim(self) -> int:
        return self.config.projection_dim

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids, attention_mask))


__all__ = ["ClapTextTower", "TextConfig", "text_config", "read_clap_dict"]
