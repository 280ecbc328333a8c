"""Retrieval metrics identical to the reference's ``get_retrevial_metrics`` (PSM_SPEC.md s. 8).

Query ``i``'s true match is gallery ``i``. Its rank is pandas ``rank(ascending=False)`` of
``S[i, i]`` in row ``i`` of the similarity matrix ``S``::

    r_i = 1 + #{j: S[i,j] > S[i,i]} + 0.5 * #{j != i: S[i,j] == S[i,i]}

``recall = mean(r < recall_at / 100 * N)`` (strict) and ``median_rank = median(r)``.

How it is computed, without the ``N x N`` float64 matrix and the per-row pandas loop:

* **csd** (``pcmepp``). The reference is float64:
  ``S = -(((2 - 2<mu_a, mu_b>) + vs_a) + vs_b)`` with ``vs = sum(exp(logvar))``. Within a row
  ``vs_a`` is constant, so ``S[i,j] > S[i,i]`` iff ``h_ij > h_ii`` with ``h = <mu_a, mu_b> - vs_b / 2``
  in exact arithmetic. We compute ``h`` once per chunk of rows in float32 (a product and one
  in-place subtraction) and
  decide every pair whose float32 difference exceeds a rigorous bound on the float32 error plus
  the reference's own float64 error (``gamma_K`` bound, valid for any summation order). The few
  remaining near-ties (exact ties included) are recomputed in float64 with the reference's
  expression, in its operation order, and compared exactly.
* **cosine** (``infonce``). The reference is float32 (``mean_a @ mean_b.T``), so its values
  depend on the BLAS's summation order; near-ties within float32 rounding are common at
  N = 20,000, so a float64 "settlement" would *not* reproduce the reference. We use the float32
  product itself, per chunk of rows, all chunks of the same size (the last one overlaps the one
  before) and at least :data:`MIN_COSINE_CHUNK` rows: on CPU (MKL) a row block of >= 12 rows
  gives the full product's bits exactly (verified in tests), a 1-row block (gemv) does not. On
  GPU, cuBLAS may pick another kernel per shape, so pairs within ~1 float32 ulp may order
  differently than a reference run on another device; that is the reference's own
  non-determinism, not ours.

TF32 is switched off for the duration of the call (it would break both arguments).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import InputError
from ..model.heads import ProbEmbedding

#: smallest row block used for cosine, so the float32 product uses the same kernel as N x N
MIN_COSINE_CHUNK = 16
#: bytes of similarity values (plus masks) held per chunk, by device type
_CHUNK_BUDGET = {"cpu": 256 * 2**20, "cuda": 2 * 2**30}
_U32 = 2.0**-24
_U64 = 2.0**-53


@dataclass
class RetrievalMetrics:
    """Result of :func:`retrieval_metrics`; ``recall`` is a fraction in [0, 1]."""

    recall: float
    median_rank: float
    n: int
    recall_at: float
    similarity: str
    query_uncertainty: float = float("nan")
    gallery_uncertainty: float = float("nan")
    #: float64 rank of each query's true match (1-based, ties averaged), or None
    ranks: np.ndarray | None = field(default=None, repr=False)
    #: pairs decided in float64 because float32 could not (diagnostic)
    n_settled: int = 0

    def as_dict(self) -> dict:
        """Plain-JSON dict (without ``ranks``)."""
        d = asdict(self)
        d.pop("ranks")
        return {k: (float(v) if isinstance(v, (np.floating,)) else v) for k, v in d.items()}


@contextmanager
def _highest_fp32_matmul() -> Iterator[None]:
    prev = torch.get_float32_matmul_precision()
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(prev)
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32


def _check(query: ProbEmbedding, gallery: ProbEmbedding, recall_at: float, similarity: str | None) -> str:
    n = len(query)
    if n == 0:
        raise InputError("retrieval_metrics got no queries: pass at least one query/gallery pair")
    if len(gallery) != n:
        raise InputError(
            f"query has {n} items but gallery {len(gallery)}: the true match of query i must be gallery i"
        )
    if query.mean.shape[-1] != gallery.mean.shape[-1]:
        raise InputError(
            f"query dim {query.mean.shape[-1]} != gallery dim {gallery.mean.shape[-1]}: embed both with one model"
        )
    if not 0 < recall_at <= 100:
        raise InputError(f"recall_at={recall_at} is a percentage of N: pass a value in (0, 100]")
    if similarity is None:
        similarity = "csd" if (query.probabilistic and gallery.probabilistic) else "cosine"
    if similarity not in ("csd", "cosine"):
        raise InputError(f"similarity={similarity!r} is unknown: use 'csd' or 'cosine'")
    if similarity == "csd" and not (query.probabilistic and gallery.probabilistic):
        raise InputError("csd needs logvar on both sides: use similarity='cosine' for deterministic embeddings")
    return similarity


def _finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{what} contains NaN or inf: check the model outputs before ranking")


def _chunk_starts(n: int, chunk: int) -> list[int]:
    """Starts of equal-size row blocks covering ``range(n)``; the last block overlaps."""
    starts = list(range(0, n - chunk + 1, chunk))
    if starts[-1] + chunk < n:
        starts.append(n - chunk)
    return starts


def _default_chunk(n: int, device: torch.device) -> int:
    budget = _CHUNK_BUDGET.get(device.type, _CHUNK_BUDGET["cpu"])
    return max(1, min(n, budget // (8 * n)))


def _row_counts(mask: torch.Tensor) -> torch.Tensor:
    """Number of True per row of a ``[c, N]`` bool mask (int64, on the mask's device).

    On CPU numpy's per-row ``count_nonzero`` (a popcount) is >10x faster than torch's
    bool reduction, which widens every element."""
    if mask.device.type != "cpu":
        return mask.sum(1)
    arr = mask.numpy()
    return torch.from_numpy(np.fromiter((np.count_nonzero(r) for r in arr), dtype=np.int64, count=arr.shape[0]))


def _nonzero_in_rows(mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row, col)`` of the True entries of ``mask`` in the given rows (chunk-local)."""
    if mask.device.type != "cpu":
        r_loc, cols = torch.nonzero(mask[rows], as_tuple=True)
        return rows[r_loc], cols
    arr = mask.numpy()
    parts = [np.flatnonzero(arr[r]) for r in rows.tolist()]
    cols = np.concatenate(parts) if parts else np.empty(0, np.int64)
    r_idx = np.repeat(rows.numpy(), [len(p) for p in parts])
    return torch.from_numpy(r_idx.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))


def _ranks_cosine(qm: torch.Tensor, gm: torch.Tensor, chunk: int, progress: bool) -> np.ndarray:
    n = qm.shape[0]
    dev = qm.device
    chunk = min(n, max(chunk, MIN_COSINE_CHUNK))
    ranks = np.empty(n, dtype=np.float64)
    gmt = gm.T
    sim = torch.empty(chunk, n, device=dev)  # buffers reused: no page faults per chunk
    m_gt = torch.empty(chunk, n, dtype=torch.bool, device=dev)
    m_eq = torch.empty_like(m_gt)
    for s in tqdm(_chunk_starts(n, chunk), desc="ranking", disable=not progress, leave=False):
        torch.mm(qm[s : s + chunk], gmt, out=sim)
        diag = sim.diagonal(offset=s)[:, None]
        torch.gt(sim, diag, out=m_gt)
        torch.eq(sim, diag, out=m_eq)
        gt, eq = _row_counts(m_gt), _row_counts(m_eq) - 1
        ranks[s : s + chunk] = (1.0 + gt.double() + 0.5 * eq.double()).cpu().numpy()
    return ranks


def _csd_pairs(qm, gm, vs_q, vs_g, qi, cj) -> torch.Tensor:
    """Float64 csd of the pairs (qi, cj) with the reference's expression and operation order.

    Products of float32 values are exact in float64; only the summation order can differ
    from the reference's BLAS, by far less than ``band64``: pairs that close are redone by
    :func:`_csd_rows_as_reference`."""
    # index_select, not qm[qi]: advanced indexing is ~50x slower on CPU
    dot = (qm.index_select(0, qi).double() * gm.index_select(0, cj).double()).sum(-1)
    return -(((2.0 - 2.0 * dot) + vs_q.index_select(0, qi)) + vs_g.index_select(0, cj))


def _csd_rows_as_reference(qm, gm64, vs_q, vs_g, q_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """(#greater, #equal) for whole rows from a float64 row-block product against the full
    gallery, so that each value has the bits of the reference's N x N product (BLAS results
    depend on the column position and on small-M kernels, even for identical columns)."""
    n = qm.shape[0]
    block = q_rows
    if block.numel() < MIN_COSINE_CHUNK:  # pad to a block size that uses the N x N kernel
        extra = torch.arange(min(n, MIN_COSINE_CHUNK + block.numel()), device=qm.device)
        extra = extra[~torch.isin(extra, q_rows)][: MIN_COSINE_CHUNK - block.numel()]
        block = torch.cat([q_rows, extra])
    dot = qm[block].double() @ gm64.T
    sim = -(((2.0 - 2.0 * dot) + vs_q[block][:, None]) + vs_g[None, :])[: q_rows.numel()]
    own = sim[torch.arange(q_rows.numel(), device=qm.device), q_rows][:, None]
    return (sim > own).sum(1).double(), ((sim == own).sum(1) - 1).double()


def _ranks_csd(
    qm: torch.Tensor,
    gm: torch.Tensor,
    vs_q: torch.Tensor,
    vs_g: torch.Tensor,
    chunk: int,
    progress: bool,
) -> tuple[np.ndarray, int]:
    n, k = qm.shape
    dev = qm.device
    half_vs32 = (vs_g / 2).float()
    # rigorous error bounds in units of h = <mu_q, mu_g> - vs_g / 2 (S = 2h - 2 - vs_q)
    na = qm.double().norm(dim=1)
    nb_max = float(gm.double().norm(dim=1).max())
    vs_g_max = float(vs_g.max())
    gam32 = k * _U32 / (1 - k * _U32)
    gam64 = k * _U64 / (1 - k * _U64)
    dot_max = na * nb_max
    h_max = dot_max + vs_g_max / 2  # bound on |h|
    # |float32 h - exact h|: the dot in any summation order, vs/2 rounded to float32, the subtraction
    e32 = gam32 * dot_max + _U32 * vs_g_max / 2 + _U32 * h_max
    # |reference float64 S - exact S| / 2: the dot, then three roundings of values <= 2 + 2 h_max + vs_q
    e64 = gam64 * dot_max + 1.5 * _U64 * (2 + 2 * h_max + vs_q)
    # two values are compared (x2); + rounding of diag +- tol in float32; + 5% slack
    tol = (1.05 * (2 * (e32 + e64) + 2 * _U32 * h_max)).float()
    # pairs whose float64 difference is below this are ordered by summation order: redo them
    # with the reference's own product (band in S units)
    band64 = (8.0 * e64).double()
    gm64: torch.Tensor | None = None

    ranks = np.empty(n, dtype=np.float64)
    n_settled = 0
    pair_batch = max(1024, _CHUNK_BUDGET["cpu"] // (16 * k))
    gmt = gm.T
    sim = torch.empty(chunk, n, device=dev)  # buffers reused: no page faults per chunk
    m_hi = torch.empty(chunk, n, dtype=torch.bool, device=dev)
    m_near = torch.empty_like(m_hi)
    for s in tqdm(_chunk_starts(n, chunk), desc="ranking", disable=not progress, leave=False):
        e = s + chunk
        # h = <mu_q, mu_g> - vs_g / 2 in float32. Not one addmm: a BLAS may fold its C input
        # into the K-sum, which would make the error bound grow with K * vs
        torch.mm(qm[s:e], gmt, out=sim)
        sim.sub_(half_vs32)
        diag = sim.diagonal(offset=s)  # (r, r + s): the true matches
        hi = (diag + tol[s:e])[:, None]
        lo = (diag - tol[s:e])[:, None]
        torch.gt(sim, hi, out=m_hi)  # surely above the true match
        torch.ge(sim, lo, out=m_near)
        torch.bitwise_xor(m_near, m_hi, out=m_near)  # lo <= g <= hi, the diagonal included
        gt = _row_counts(m_hi).to(dev).double()
        near = _row_counts(m_near).to(dev) - 1
        eq = torch.zeros_like(gt)
        near_rows = torch.nonzero(near > 0).flatten()
        redo: list[torch.Tensor] = []
        if near_rows.numel():
            r_chunk, cols = _nonzero_in_rows(m_near, near_rows)
            keep = cols != r_chunk + s  # not the true match itself
            r_chunk, cols = r_chunk[keep].to(dev), cols[keep].to(dev)
            q_idx = r_chunk + s
            n_settled += int(q_idx.numel())
            s_diag = torch.zeros(chunk, dtype=torch.float64, device=dev)
            s_diag[near_rows] = _csd_pairs(qm, gm, vs_q, vs_g, near_rows + s, near_rows + s)
            for p in range(0, q_idx.numel(), pair_batch):
                qi, cj, rc = q_idx[p : p + pair_batch], cols[p : p + pair_batch], r_chunk[p : p + pair_batch]
                diff = _csd_pairs(qm, gm, vs_q, vs_g, qi, cj) - s_diag.index_select(0, rc)
                gt.index_add_(0, rc, (diff > 0).double())
                redo.append(rc[diff.abs() <= band64.index_select(0, qi)])
        if redo and (redo_rows := torch.unique(torch.cat(redo))).numel():
            if gm64 is None:
                gm64 = gm.double()
            gt[redo_rows], eq[redo_rows] = _csd_rows_as_reference(qm, gm64, vs_q, vs_g, redo_rows + s)
        ranks[s:e] = (1.0 + gt + 0.5 * eq).cpu().numpy()
    return ranks, n_settled


def retrieval_metrics(
    query: ProbEmbedding,
    gallery: ProbEmbedding,
    recall_at: float = 10,
    similarity: str | None = None,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    return_ranks: bool = True,
    progress: bool = False,
) -> RetrievalMetrics:
    """R@``recall_at``% and median rank of ``gallery[i]`` for ``query[i]`` (PSM_SPEC.md s. 8).

    ``similarity``: ``"csd"`` (pcmepp, float64 reference) or ``"cosine"`` (infonce, float32
    reference); ``None`` picks csd when both sides are probabilistic. ``chunk_size``: query rows
    per block (memory ~ 8 * chunk_size * N bytes); ``device``: default CUDA when available.
    """
    similarity = _check(query, gallery, recall_at, similarity)
    n = len(query)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    chunk = int(chunk_size) if chunk_size else _default_chunk(n, dev)
    if chunk < 1:
        raise InputError(f"chunk_size={chunk_size} must be >= 1: pass a positive number of rows")
    chunk = min(chunk, n)

    qm = query.mean.detach().to(dev, torch.float32).contiguous()
    gm = gallery.mean.detach().to(dev, torch.float32).contiguous()
    _finite(qm, "query mean")
    _finite(gm, "gallery mean")
    q_unc = g_unc = float("nan")
    n_settled = 0
    with torch.no_grad(), _highest_fp32_matmul():
        if query.probabilistic:
            q_unc = float(query.detach().to(dev).uncertainty().double().mean())
        if gallery.probabilistic:
            g_unc = float(gallery.detach().to(dev).uncertainty().double().mean())
        if similarity == "csd":
            vs_q = query.detach().to(dev).var_sum()
            vs_g = gallery.detach().to(dev).var_sum()
            _finite(vs_q, "query variance sum")
            _finite(vs_g, "gallery variance sum")
            ranks, n_settled = _ranks_csd(qm, gm, vs_q, vs_g, chunk, progress)
        else:
            ranks = _ranks_cosine(qm, gm, chunk, progress)

    threshold = recall_at / 100 * n  # the reference's R_k expression
    return RetrievalMetrics(
        recall=float(np.mean(ranks < threshold)),
        median_rank=float(np.median(ranks)),
        n=n,
        recall_at=float(recall_at),
        similarity=similarity,
        query_uncertainty=q_unc,
        gallery_uncertainty=g_unc,
        ranks=ranks if return_ranks else None,
        n_settled=n_settled,
    )


__all__ = ["RetrievalMetrics", "retrieval_metrics", "MIN_COSINE_CHUNK"]
