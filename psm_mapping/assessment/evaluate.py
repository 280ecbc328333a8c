"""Per band: the figures of its kind, each with its block bootstrap interval.

* presence-absence: ``auc`` (presences vs absences);
* presence-only: ``auc`` (presences vs background points) and ``boyce`` (background as ``fit``);
* numeric: ``spearman`` and ``pearson``.

A band needs :data:`MIN_SITES` scored sites (and, for an AUC, a presence and an absence among
them); a band short of them is reported with the reason and no figures.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import metrics
from .bootstrap import Blocks, percentile_interval
from .sample import Band

__all__ = ["Figure", "BandResult", "evaluate_band", "MIN_SITES"]

MIN_SITES = 10
NAMES = {"auc": "AUC", "boyce": "Boyce", "spearman": "Spearman rho", "pearson": "Pearson r"}


@dataclass
class Figure:
    """A figure with its percentile block bootstrap interval."""

    value: float
    low: float
    high: float
    level: float = 0.95
    replicates: int = 0
    undefined_replicates: int = 0


@dataclass
class BandResult:
    """The assessment of one band. ``unscored``: reason -> 0-based input rows not scored."""

    band: Band
    kind: str
    n: int
    n_present: int = 0
    n_absent: int = 0
    n_background: int = 0
    figures: dict[str, Figure] = field(default_factory=dict)
    unscored: dict[str, list[int]] = field(default_factory=dict)
    uncertainty: dict = field(default_factory=dict)
    curves: dict = field(default_factory=dict)
    skipped: str | None = None

    def line(self) -> str:
        """``birds chirping, zoom 1: AUC 0.71 [0.64, 0.78], n 312 (88 present)``."""
        if self.skipped:
            return f"{self.band.label}: not assessed ({self.skipped})"
        figs = ", ".join(f"{NAMES[k]} {f.value:.2f} [{f.low:.2f}, {f.high:.2f}]" for k, f in self.figures.items())
        if self.kind == "presence-absence":
            tail = f"n {self.n} ({self.n_present} present)"
        elif self.kind == "presence-only":
            tail = f"n {self.n} presences, {self.n_background} background"
        else:
            tail = f"n {self.n}"
        return f"{self.band.label}: {figs}, {tail}"


def _subset_blocks(blocks: Blocks, sel: np.ndarray) -> Blocks:
    _, ids = np.unique(blocks.ids[sel], return_inverse=True)
    ids = ids.reshape(-1)
    return Blocks(ids, int(ids.max()) + 1 if len(ids) else 0, blocks.block_km)


def _figure(value: float, stat, blocks: Blocks, n_boot: int, seed) -> Figure:
    ci = percentile_interval(stat, blocks, n_boot, seed)
    return Figure(float(value), ci.low, ci.high, ci.level, ci.replicates, ci.undefined)


def _boyce_rows(bg: np.ndarray, pres: np.ndarray):
    nb = len(bg)
    ob, op = np.argsort(bg, kind="stable"), np.argsort(pres, kind="stable")
    sb, sp = bg[ob], pres[op]

    def stat(w):
        return np.array([metrics.boyce(sb, sp, row[:nb][ob], row[nb:][op], presorted=True).index for row in w])

    return stat


def evaluate_band(band: Band, kind: str, values: np.ndarray, reasons: np.ndarray, outcome: np.ndarray,
                  rows: np.ndarray, blocks: Blocks, n_boot: int, seed, background: np.ndarray | None = None,
                  uncertainty: np.ndarray | None = None) -> BandResult:
    """Figures of ``band`` from site ``values`` (NaN: not scored, ``reasons`` say why) against the
    ``outcome``; ``blocks`` span the sites and then the background points (presence-only)."""
    ok = reasons == ""
    unscored = {str(r): rows[reasons == r].tolist() for r in np.unique(reasons[~ok])}
    n = int(ok.sum())
    res = BandResult(band, kind, n, unscored=unscored)
    v, y = values[ok], outcome[ok]
    if n < MIN_SITES:
        res.skipped = f"{n} scored site{'s' if n != 1 else ''}, fewer than {MIN_SITES}"
        return res
    if uncertainty is not None:
        u = uncertainty[ok]
        fin = np.isfinite(u)
        res.uncertainty = {"mean": float(np.mean(u[fin])) if fin.any() else None,
                           "spearman_with_value": metrics.spearman(v[fin], u[fin]) if fin.sum() > 2 else None}
        if kind == "presence-absence" and fin.any():
            res.uncertainty["mean_present"] = float(np.mean(u[fin & (y > 0)])) if (fin & (y > 0)).any() else None
            res.uncertainty["mean_absent"] = float(np.mean(u[fin & (y <= 0)])) if (fin & (y <= 0)).any() else None
    if kind == "presence-absence":
        pos = y > 0
        res.n_present, res.n_absent = int(pos.sum()), int((~pos).sum())
        if res.n_present == 0 or res.n_absent == 0:
            res.skipped = f"no {'presence' if res.n_present == 0 else 'absence'} among the scored sites"
            return res
        b = _subset_blocks(blocks, np.nonzero(ok)[0])
        res.figures["auc"] = _figure(metrics.auc(v, pos), lambda w: metrics.auc_replicates(v, pos, w), b, n_boot,
                                     seed)
        fpr, tpr = metrics.roc_curve(v, pos)
        res.curves = {"roc_fpr": fpr.tolist(), "roc_tpr": tpr.tolist()}
    elif kind == "presence-only":
        bg = np.asarray(background, np.float64)
        res.n_present, res.n_background = n, len(bg)
        allv = np.concatenate([bg, v])
        lab = np.concatenate([np.zeros(len(bg), bool), np.ones(n, bool)])
        nsite = len(values)
        b = _subset_blocks(blocks, np.concatenate([nsite + np.arange(len(bg)), np.nonzero(ok)[0]]))
        res.figures["auc"] = _figure(metrics.auc(allv, lab), lambda w: metrics.auc_replicates(allv, lab, w), b,
                                     n_boot, seed)
        curve = metrics.boyce(bg, v)
        res.figures["boyce"] = _figure(curve.index, _boyce_rows(bg, v), b, n_boot, seed)
        fpr, tpr = metrics.roc_curve(allv, lab)
        res.curves = {"roc_fpr": fpr.tolist(), "roc_tpr": tpr.tolist(), "boyce_suitability": curve.midpoints.tolist(),
                      "boyce_pe": [x if np.isfinite(x) else None for x in curve.ratio.tolist()],
                      "boyce_window_width": curve.window_width}
    else:
        b = _subset_blocks(blocks, np.nonzero(ok)[0])
        for name in ("spearman", "pearson"):
            val = metrics.spearman(v, y) if name == "spearman" else metrics.pearson(v, y)
            res.figures[name] = _figure(val, lambda w, m=name: metrics.correlation_replicates(v, y, w, m), b,
                                        n_boot, seed)
    return res
