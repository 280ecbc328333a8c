"""PCME++ closed-form sampled distance loss and the InfoNCE baseline (PSM_SPEC.md section 9).

Both take :class:`~psm_mapping.model.heads.ProbEmbedding` pairs (``mean`` L2-normalised,
``logvar`` raw) and return ``(loss, stats)``. Parameter names give the official checkpoint keys
when the module is an attribute ``criterion``: ``criterion.shift``, ``criterion.negative_scale``
(PCME++) and ``criterion.tau`` (InfoNCE).

PCME++ (as the authors' ``ClosedFormSampledDistanceLoss`` with ``prob_distance='csd'``)::

    logits_ij = -a * (||mu_i - mu_j||^2 + sum(exp(v_i) + exp(v_j))) + b
    loss = 2 * BCE(logits, M) + vib_beta * (KL_1 + KL_2)
           + alpha * (BCE(logits, P) + BCE(logits^T, P'))

``M`` the match matrix (identity), ``P`` / ``P'`` the match matrix with pseudo-positives (pairs
whose logit is >= the true pair's, row-wise in each direction), BCE averaged over all entries,
``KL = -0.5 * mean(1 + v - mu^2 - exp(v))`` (ignored above 10,000, as the reference).
Computed in float32 whatever the autocast dtype.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..model.heads import ProbEmbedding

LOSS_TYPES = ("pcmepp", "infonce")


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The VIB term of PCME++: ``-0.5 * mean(1 + logvar - mu^2 - exp(logvar))``."""
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).mean()
    if kl.item() > 10000:
        warnings.warn(f"VIB loss explosion ({kl.item():.4g} > 10000): ignored for this batch", stacklevel=2)
        return kl.new_zeros(())
    return kl


def pseudo_matched(logits: torch.Tensor, matched: torch.Tensor) -> torch.Tensor:
    """``matched`` with every pair whose logit is >= its row's true-pair logit set to the true label."""
    gt_labels, gt_idx = matched.max(dim=1)
    gt_vals = logits.gather(1, gt_idx[:, None])
    pseudo = logits >= gt_vals
    out = matched.clone()
    out[pseudo] = (gt_labels[:, None] * pseudo)[pseudo]
    return out


class PCMEppLoss(nn.Module):
    """Closed-form sampled distance loss with learnable ``shift`` (b) and ``negative_scale`` (a)."""

    def __init__(self, init_shift: float = 5.0, init_negative_scale: float = 5.0, vib_beta: float = 1e-4,
                 pseudo_match_alpha: float = 0.1):
        super().__init__()
        self.shift = nn.Parameter(torch.full((1,), float(init_shift)))
        self.negative_scale = nn.Parameter(torch.full((1,), float(init_negative_scale)))
        self.vib_beta = float(vib_beta)
        self.pseudo_match_alpha = float(pseudo_match_alpha)

    def logits(self, a: ProbEmbedding, b: ProbEmbedding) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, mu_pdist, sigma_pdist)``, each ``[len(a), len(b)]``."""
        mu_a, mu_b = a.mean.float(), b.mean.float()
        va, vb = a.logvar.float().exp(), b.logvar.float().exp()
        mu_pdist = ((mu_a[:, None] - mu_b[None]) ** 2).sum(-1)
        sigma_pdist = (va[:, None] + vb[None]).sum(-1)
        logits = -self.negative_scale.float() * (mu_pdist + sigma_pdist) + self.shift.float()
        return logits, mu_pdist, sigma_pdist

    def forward(self, a: ProbEmbedding, b: ProbEmbedding, matched: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if a.logvar is None or b.logvar is None:
            raise InputError("the PCME++ loss needs probabilistic embeddings: use --deterministic (InfoNCE)")
        if matched is None:
            matched = torch.eye(len(a), len(b), device=a.mean.device)
        matched = matched.float()
        logits, mu_pdist, sigma_pdist = self.logits(a, b)
        bce = F.binary_cross_entropy_with_logits(logits, matched)
        loss = 2 * bce
        stats: dict[str, torch.Tensor] = {"mu_pdist": mu_pdist.mean().detach(),
                                          "sigma_pdist": sigma_pdist.mean().detach(), "bce": bce.detach()}
        if self.vib_beta:
            vib = (kl_to_standard_normal(a.mean.float(), a.logvar.float())
                   + kl_to_standard_normal(b.mean.float(), b.logvar.float()))
            loss = loss + self.vib_beta * vib
            stats["vib"] = vib.detach()
        if self.pseudo_match_alpha:
            m1 = pseudo_matched(logits, matched)
            # the b->a direction: the same logits transposed (the distances are symmetric)
            m2 = pseudo_matched(logits.T, matched.T)
            smooth = (F.binary_cross_entropy_with_logits(logits, m1)
                      + F.binary_cross_entropy_with_logits(logits.T, m2))
            loss = loss + self.pseudo_match_alpha * smooth
            stats["n_pseudo"] = ((m1 > 0).sum() + (m2 > 0).sum() - 2 * (matched > 0).sum()).detach()
        stats["loss"] = loss.detach()
        return loss, stats


class InfoNCELoss(nn.Module):
    """Symmetric cross-entropy of ``tau * cos`` (the reference multiplies by ``tau``, init 1)."""

    def __init__(self, init_tau: float = 1.0):
        super().__init__()
        self.tau = nn.Parameter(torch.full((1,), float(init_tau)))

    def forward(self, a: ProbEmbedding, b: ProbEmbedding, matched: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = (a.mean.float() @ b.mean.float().T) * self.tau.float()
        gts = torch.arange(len(a), device=logits.device)
        if logits.shape[0] == logits.shape[1]:
            loss = (F.cross_entropy(logits, gts) + F.cross_entropy(logits.T, gts)) / 2
        else:  # a against a gathered gallery (distributed): one direction, local rows first
            loss = F.cross_entropy(logits, gts)
        return loss, {"loss": loss.detach()}


def build_criterion(loss_type: str = "pcmepp", pseudo_match_alpha: float = 0.1, vib_beta: float = 1e-4) -> nn.Module:
    """The authors' loss configs: PCME++ shift/scale 5, InfoNCE tau 1."""
    if loss_type == "pcmepp":
        return PCMEppLoss(5.0, 5.0, vib_beta=vib_beta, pseudo_match_alpha=pseudo_match_alpha)
    if loss_type == "infonce":
        return InfoNCELoss(1.0)
    raise InputError(f"unknown loss_type {loss_type!r}: use pcmepp or infonce")


def total_loss(criterion: nn.Module, image: ProbEmbedding, audio: ProbEmbedding, text: ProbEmbedding | None = None,
               text_weight: float = 0.5, pair_loss=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(1 - w) * L(image, audio) + w * (L(image, text) + L(audio, text))`` (``w`` = 0.5), or
    ``L(image, audio)`` without text. ``pair_loss(a, b)`` overrides ``criterion(a, b)`` (DDP)."""
    fn = pair_loss or (lambda a, b: criterion(a, b))
    loss_ia, st = fn(image, audio)
    parts = {"loss_ia": loss_ia.detach()}
    parts.update({f"ia_{k}": v for k, v in st.items() if k in ("mu_pdist", "sigma_pdist")})
    if text is None:
        parts["loss"] = loss_ia.detach()
        return loss_ia, parts
    loss_it, st_it = fn(image, text)
    loss_at, st_at = fn(audio, text)
    loss = (1 - text_weight) * loss_ia + text_weight * (loss_it + loss_at)
    parts.update({"loss_it": loss_it.detach(), "loss_at": loss_at.detach(), "loss": loss.detach()})
    return loss, parts


__all__ = ["PCMEppLoss", "InfoNCELoss", "build_criterion", "total_loss", "kl_to_standard_normal",
           "pseudo_matched", "LOSS_TYPES"]
