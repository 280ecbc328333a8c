"""Agreement figures of a map with observations, in NumPy (no SciPy), weighted so that a block
bootstrap replicate (a count per site) costs one pass over pre-sorted values.

* :func:`auc`       ROC AUC = the Mann-Whitney statistic: P(score of a presence > score of an
  absence) + half the ties (as scikit-learn's ``roc_auc_score`` and the pROC/ENMeval AUC);
* :func:`roc_curve` the ROC points (FPR, TPR) at every distinct threshold;
* :func:`pearson`, :func:`spearman`  r and rho (rho: Pearson of mid-ranks, ties averaged, as
  R's ``cor(method="spearman")`` and SciPy's ``spearmanr``);
* :func:`boyce`     the continuous Boyce index (Hirzel et al. 2006, Ecol. Model. 199:142-152) with
  the moving window of ecospat's ``ecospat.boyce`` defaults (:class:`BoyceCurve` documents it).

Every function takes optional non-negative ``weights`` (a site's multiplicity): a weighted figure
equals the figure of the data with each site repeated ``weight`` times.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["auc", "auc_replicates", "roc_curve", "pearson", "spearman", "weighted_ranks", "boyce",
           "BoyceCurve", "BOYCE_WINDOWS"]


def _w(n: int, weights) -> np.ndarray:
    return np.ones(n) if weights is None else np.asarray(weights, np.float64)


def _groups(sorted_values: np.ndarray) -> np.ndarray:
    """Start index of each run of equal values in a sorted array."""
    if len(sorted_values) == 0:
        return np.zeros(0, np.int64)
    return np.concatenate([[0], np.nonzero(sorted_values[1:] != sorted_values[:-1])[0] + 1])


# --------------------------------------------------------------------------- AUC
def auc_replicates(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUC for each row of ``weights`` ``[B, n]`` (NaN where a row has no positive or no
    negative weight): one sort, then per tie group the weighted pair counts."""
    s = np.asarray(scores, np.float64)
    pos = np.asarray(positive, bool)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(s, kind="stable")
    starts = _groups(s[order])
    wp = np.add.reduceat(w[:, order] * pos[order], starts, axis=1) if len(s) else np.zeros((len(w), 0))
    wn = np.add.reduceat(w[:, order] * ~pos[order], starts, axis=1) if len(s) else np.zeros((len(w), 0))
    below = np.cumsum(wn, axis=1) - wn  # negative weight strictly below each group
    P, N = wp.sum(1), wn.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (wp * (below + 0.5 * wn)).sum(1) / (P * N)
    out[(P <= 0) | (N <= 0)] = np.nan
    return out


def auc(scores, positive, weights=None) -> float:
    """ROC AUC of ``scores`` for the classes ``positive`` (bool), ties counted half."""
    s = np.asarray(scores, np.float64)
    return float(auc_replicates(s, positive, _w(len(s), weights)[None])[0])


def roc_curve(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` from (0, 0) to (1, 1), one point per distinct threshold (highest first)."""
    s = np.asarray(scores, np.float64)
    pos = np.asarray(positive, bool)
    order = np.argsort(-s, kind="stable")
    starts = _groups(-s[order])
    tp = np.add.reduceat(pos[order].astype(float), starts) if len(s) else np.zeros(0)
    fp = np.add.reduceat((~pos[order]).astype(float), starts) if len(s) else np.zeros(0)
    tpr = np.concatenate([[0], np.cumsum(tp)]) / max(1, pos.sum())
    fpr = np.concatenate([[0], np.cumsum(fp)]) / max(1, (~pos).sum())
    return fpr, tpr


# --------------------------------------------------------------------------- correlation
def weighted_ranks(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mid-ranks of ``x`` for each row of ``weights`` ``[B, n]``: a value's rank among the data
    with each site repeated ``weight`` times (ties: the average rank). Returns ``[B, n]``."""
    x = np.asarray(x, np.float64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    order = np.argsort(x, kind="stable")
    starts = _groups(x[order])
    gw = np.add.reduceat(w[:, order], starts, axis=1)
    below = np.cumsum(gw, axis=1) - gw
    grank = below + (gw + 1) / 2  # ranks below + 1 .. below + count: their mean
    group_of = np.empty(len(x), np.int64)
    group_of[order] = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, len(x))))
    return grank[:, group_of]


def _pearson_rows(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Pearson r per row; ``x``, ``y`` ``[n]`` or ``[B, n]``, ``w`` ``[B, n]``."""
    W = w.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = (w * x).sum(1, keepdims=True) / W
        my = (w * y).sum(1, keepdims=True) / W
        dx, dy = x - mx, y - my
        sxy = (w * dx * dy).sum(1)
        sxx, syy = (w * dx * dx).sum(1), (w * dy * dy).sum(1)
        r = sxy / np.sqrt(sxx * syy)
    return np.clip(r, -1.0, 1.0)


def pearson(x, y, weights=None) -> float:
    """Pearson's r (NaN for a constant variable)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(_pearson_rows(x, y, _w(len(x), weights)[None])[0])


def spearman(x, y, weights=None) -> float:
    """Spearman's rho: Pearson's r of the mid-ranks."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = _w(len(x), weights)[None]
    return float(_pearson_rows(weighted_ranks(x, w), weighted_ranks(y, w), w)[0])


def correlation_replicates(x, y, weights: np.ndarray, method: str) -> np.ndarray:
    """Pearson or Spearman per row of ``weights`` ``[B, n]``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    w = np.atleast_2d(np.asarray(weights, np.float64))
    if method == "spearman":
        return _pearson_rows(weighted_ranks(x, w), weighted_ranks(y, w), w)
    return _pearson_rows(x, y, w)


# --------------------------------------------------------------------------- Boyce
#: ecospat.boyce's ``res``: the moving window takes ``BOYCE_WINDOWS + 1`` positions
BOYCE_WINDOWS = 100


@dataclass
class BoyceCurve:
    """The continuous Boyce index and its predicted/expected curve.

    Settings (ecospat ``ecospat.boyce(fit, obs, nclass = 0, window.w = "default", res = 100,
    rm.duplicate = TRUE, method = "spearman")``, ecospat >= 3.2):

    * ``fit``: the suitability of the background (here: the map at the background points), ``obs``:
      at the presences; the range [mini, maxi] spans both;
    * window width ``w`` = (max(fit) - min(fit)) / 10; lower edges ``seq(mini, maxi - w, by =
      (maxi - mini - w) / 100)``: 101 windows, closed ``[lo, lo + w]``; ecospat shifts the last
      window's lower edge up by 1 (its "closed interval trick"), kept here to match its numbers;
    * per window P/E = (share of presences in it) / (share of background in it), rounded to 10
      digits; windows with 0/0 are dropped; runs of equal successive P/E are thinned to their last
      element (``rm.duplicate``; the last element is dropped if it equals 1, as ecospat does);
    * the index is Spearman's rho of P/E against the window's lower edge (the ranks of the window
      midpoints are the same). ecospat prints it rounded to 3 decimals; ``index`` is unrounded.
    """

    index: float
    midpoints: np.ndarray  # suitability at the kept windows' centres
    ratio: np.ndarray  # P/E of the kept windows
    window_width: float


def _boyce_windows(fit_min, fit_max, mini, maxi, res: int):
    ww = (fit_max - fit_min) / 10.0
    step = (maxi - mini - ww) / res
    lo = mini + step * np.arange(res + 1)  # R's seq(from, to, by): from + (0..n) * by
    lo[res] += 1.0
    return lo, lo + ww, ww


def boyce(fit, obs, fit_weights=None, obs_weights=None, res: int = BOYCE_WINDOWS,
          presorted: bool = False) -> BoyceCurve:
    """The continuous Boyce index of presences ``obs`` against background ``fit`` (``presorted``:
    both are sorted ascending, weights in the same order: a bootstrap sorts once)."""
    fit, obs = np.asarray(fit, np.float64), np.asarray(obs, np.float64)
    fw, ow = _w(len(fit), fit_weights), _w(len(obs), obs_weights)
    if not presorted:
        of, oo = np.argsort(fit, kind="stable"), np.argsort(obs, kind="stable")
        fit, fw, obs, ow = fit[of], fw[of], obs[oo], ow[oo]
    fk, ok = fw > 0, ow > 0
    if not fk.any() or not ok.any():
        return BoyceCurve(float("nan"), np.zeros(0), np.zeros(0), float("nan"))
    fmin, fmax = fit[fk].min(), fit[fk].max()
    mini, maxi = min(fmin, obs[ok].min()), max(fmax, obs[ok].max())
    lo, hi, ww = _boyce_windows(fmin, fmax, mini, maxi, res)
    share_o = _window_share(obs, ow, lo, hi)
    share_f = _window_share(fit, fw, lo, hi)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = np.round(share_o / share_f, 10)
    keep = ~np.isnan(f)
    f, lo_k, mid = f[keep], lo[keep], ((lo + hi) / 2)[keep]
    if len(mid) and keep[-1]:
        mid[-1] -= 1.0  # ecospat's HS correction of the shifted last window
    if len(f) < 2:
        return BoyceCurve(float("nan"), mid, f, ww)
    nxt = np.append(f[1:], 1.0)  # R: f != c(f[-1], TRUE)
    r = f != nxt
    if r.sum() < 2:
        return BoyceCurve(float("nan"), mid, f, ww)
    w1 = np.ones((1, int(r.sum())))
    rho = _pearson_rows(weighted_ranks(f[r], w1), weighted_ranks(lo_k[r], w1), w1)[0]
    return BoyceCurve(float(rho), mid, f, ww)


def _window_share(sv: np.ndarray, w: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Weighted share of sorted ``sv`` in each closed window ``[lo, hi]``."""
    cw = np.concatenate([[0.0], np.cumsum(w)])
    inside = cw[np.searchsorted(sv, hi, "right")] - cw[np.searchsorted(sv, lo, "left")]
    return inside / cw[-1]
