"""Probabilistic heads, the :class:`ProbEmbedding` container and the PCME++ similarity.

PSM_SPEC.md section 4: ``mean = l2norm(mean_head(x))``, ``logvar = std_head(x)``;
``csd(a, b) = -(2 - 2<mu_a, mu_b> + sum(exp(logvar_a)) + sum(exp(logvar_b)))``.
Deterministic (``infonce``) embeddings carry no variance and compare by cosine.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import nn

from ..errors import InputError


class Projector(nn.Module):
    """``linear2(GELU(linear1(x)))`` with the exact (erf) GELU."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(in_dim, out_dim)
        self.linear2 = nn.Linear(out_dim, out_dim)
        self.gelu = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.gelu(self.linear1(x)))


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """``x / ||x||`` along the last dim, no epsilon (as the reference)."""
    return x / x.norm(p=2, dim=-1, keepdim=True)


@dataclass
class ProbEmbedding:
    """A batch of Gaussian embeddings: ``ProbEmbedding(mean, logvar=None, raw_mean=None)``.

    ``mean`` is L2-normalised ``[N, D]``; ``logvar`` ``[N, D]`` or ``None`` for deterministic
    models; ``raw_mean`` the head output before normalisation (needed to combine queries),
    ``mean`` when not given. A field of another shape than ``mean`` is an :class:`InputError`.
    """

    mean: torch.Tensor
    logvar: torch.Tensor | None = None
    raw_mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.mean, torch.Tensor) or self.mean.ndim != 2:
            raise InputError(f"ProbEmbedding mean must be a 2-D tensor [N, D], got "
                             f"{getattr(self.mean, 'shape', type(self.mean).__name__)}: give one row per item")
        if self.raw_mean is None:
            self.raw_mean = self.mean
        for name in ("logvar", "raw_mean"):
            v = getattr(self, name)
            if v is not None and tuple(getattr(v, "shape", ())) != tuple(self.mean.shape):
                raise InputError(f"ProbEmbedding {name} has shape {tuple(getattr(v, 'shape', ()))}, mean "
                                 f"{tuple(self.mean.shape)}: give {name} the shape of mean")

    @classmethod
    def from_heads(cls, raw_mean: torch.Tensor, logvar: torch.Tensor | None) -> "ProbEmbedding":
        return cls(l2norm(raw_mean), logvar=logvar, raw_mean=raw_mean)

    @property
    def probabilistic(self) -> bool:
        return self.logvar is not None

    def __len__(self) -> int:
        return self.mean.shape[0]

    def map(self, fn) -> "ProbEmbedding":
        """``fn`` applied to ``mean``, ``raw_mean`` and ``logvar`` (when there is one)."""
        lv = None if self.logvar is None else fn(self.logvar)
        return ProbEmbedding(fn(self.mean), logvar=lv, raw_mean=fn(self.raw_mean))

    def __getitem__(self, idx) -> "ProbEmbedding":
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        return self.map(lambda t: t[idx])

    def to(self, *args, **kwargs) -> "ProbEmbedding":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "ProbEmbedding":
        return self.map(torch.Tensor.detach)

    def cpu(self) -> "ProbEmbedding":
        return self.to("cpu")

    def var_sum(self) -> torch.Tensor:
        """``sum(exp(logvar))`` per embedding: exp in float32, sum in float64 (the reference)."""
        if self.logvar is None:
            raise ValueError("a deterministic embedding has no variance")
        return torch.exp(self.logvar.float()).double().sum(-1)

    def uncertainty(self) -> torch.Tensor:
        """The reference's "std norm": ``sum(sqrt(exp(logvar)))`` per embedding ``[N]``.

        Deterministic embeddings have none: a tensor of NaN."""
        if self.logvar is None:
            return torch.full((len(self),), float("nan"), device=self.mean.device)
        return torch.exp(0.5 * self.logvar.float()).sum(-1)

    def combine(self, other: "ProbEmbedding") -> "ProbEmbedding":
        """Their ``add_text``: ``l2norm(raw_a + raw_b)``, ``logvar_a + logvar_b``."""
        if len(other) != len(self) and len(other) != 1 and len(self) != 1:
            raise ValueError(f"cannot combine {len(self)} with {len(other)} embeddings")
        raw = self.raw_mean + other.raw_mean
        lv = None
        if self.logvar is not None and other.logvar is not None:
            lv = self.logvar + other.logvar
        return ProbEmbedding.from_heads(raw, lv)

    __add__ = combine

    @staticmethod
    def cat(items: Sequence["ProbEmbedding"]) -> "ProbEmbedding":
        if not items:
            raise ValueError("nothing to concatenate")
        lv = None
        if all(e.logvar is not None for e in items):
            lv = torch.cat([e.logvar for e in items])
        return ProbEmbedding(torch.cat([e.mean for e in items]), logvar=lv,
                             raw_mean=torch.cat([e.raw_mean for e in items]))

    def replace(self, **kw) -> "ProbEmbedding":
        return replace(self, **kw)


def csd(a: ProbEmbedding, b: ProbEmbedding) -> torch.Tensor:
    """Similarity matrix ``[len(a), len(b)]``: negative closed-form sampled distance for
    probabilistic embeddings (float64, as the reference), cosine for deterministic ones."""
    if a.logvar is None or b.logvar is None:
        return cosine(a, b)
    dot = a.mean.double() @ b.mean.double().T
    return csd_from_parts(dot, a.var_sum()[:, None], b.var_sum()[None, :])


def csd_from_parts(dot, var_sum_a, var_sum_b):
    """The closed-form sampled distance's similarity from its parts: ``-(2 - 2 mu_a.mu_b +
    sum(var_a) + sum(var_b))`` (torch or NumPy, broadcasting). The one home of the formula;
    the retrieval metrics keep the reference's order of additions for bit-equal numbers."""
    return -(2.0 - 2.0 * dot + var_sum_a + var_sum_b)


def cosine(a: ProbEmbedding, b: ProbEmbedding) -> torch.Tensor:
    """Dot product of the L2-normalised means (float32, as the reference's infonce)."""
    return a.mean.float() @ b.mean.float().T
