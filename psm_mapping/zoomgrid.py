"""Scale-true zoom sampling: each zoom level embedded on its own grid, aligned with the output grid.

A zoom-z chip covers ``footprint_m(sat, z)`` metres; from one output pixel to the next it moves by
``stride / footprint`` of its width (5 % for a 12.8 km zoom-5 chip at 640 m pixels), so embedding it
at every output pixel mostly repeats work. With ``zoom_sampling="scale"`` zoom z is embedded on a
coarser grid whose pixels are ``f_z`` x ``f_z`` output pixels (``f_z`` a whole number: the multiple of
the output stride nearest to a quarter of the zoom's chip footprint; zoom 1 always stays at the
output stride). That zoom grid shares the output grid's origin: its cell ``(I, J)`` covers output
pixels ``I*f .. I*f+f-1`` x ``J*f .. J*f+f-1`` and its chip is centred on the cell centre (for odd
``f`` exactly the centre of output pixel ``(I*f + (f-1)/2, J*f + (f-1)/2)``, so that pixel gets the
very chip the dense grid gives it).

Queries compute similarity and uncertainty on each zoom's grid and resample them to the output
grid bilinearly (:func:`resample`). Similarity is linear in the pixel's embedding mean and
``var_sum`` (``csd = 2 <mu, q> - 2 - var_sum - var_sum_q``; cosine is ``<mu, q>``), so bilinear
interpolation of the similarity equals the similarity of the bilinearly interpolated embeddings
(mean and var_sum): nothing is lost by resampling after the dot product.

``zoom_sampling="dense"`` (every factor 1) is the earlier behaviour bit for bit: one group of all
zooms on the output grid, no resampling.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from affine import Affine

from . import constants
from .config import DEFAULT_ZOOM_SAMPLING, ZOOM_SAMPLINGS, check_zoom_sampling  # noqa: F401 (public here)
from .errors import InputError

__all__ = ["ZOOM_SAMPLINGS", "DEFAULT_ZOOM_SAMPLING", "ZoomGroup", "check_zoom_sampling", "zoom_factors",
           "zoom_groups", "zoom_grid", "cell_need", "resample", "axis_weights", "chips_needed"]

def zoom_factors(sat_type: str, stride: float, zoom_levels: Sequence[int], sampling: str = "scale") -> tuple[int, ...]:
    """Per zoom level the zoom grid's pixel size in output pixels: 1 for ``dense`` and for zoom 1;
    else the whole multiple of ``stride`` nearest to a quarter of the zoom's chip footprint."""
    if check_zoom_sampling(sampling) == "dense":
        return tuple(1 for _ in zoom_levels)
    out = []
    for z in zoom_levels:
        f = 1 if int(z) == 1 else max(1, int(math.floor(constants.footprint_m(sat_type, int(z)) / 4.0 / stride + 0.5)))
        out.append(f)
    return tuple(out)


@dataclass(frozen=True)
class ZoomGroup:
    """Consecutive zoom indices ``zooms = (first, stop)`` sharing one zoom grid of ``factor`` output
    pixels per cell, ``height`` x ``width`` cells."""

    zooms: tuple[int, int]
    factor: int
    height: int
    width: int

    @property
    def indices(self) -> range:
        return range(*self.zooms)


def zoom_groups(height: int, width: int, factors: Sequence[int]) -> list[ZoomGroup]:
    """The zoom grids of an output grid ``height`` x ``width``: maximal runs of zoom indices with
    equal factors (dense: one group of every zoom, the output grid itself)."""
    groups, k = [], 0
    factors = [int(f) for f in factors]
    while k < len(factors):
        e = k
        while e < len(factors) and factors[e] == factors[k]:
            e += 1
        f = factors[k]
        groups.append(ZoomGroup((k, e), f, -(-height // f), -(-width // f)))
        k = e
    return groups


def group_of(groups: Sequence[ZoomGroup], zoom_index: int) -> ZoomGroup:
    for g in groups:
        if g.zooms[0] <= zoom_index < g.zooms[1]:
            return g
    raise IndexError(zoom_index)


def zoom_transform(transform, factor: int) -> Affine:
    """The zoom grid's transform: the output grid's origin, ``factor`` times its pixel size."""
    t = Affine(*tuple(transform)[:6])
    return Affine(t.a * factor, t.b, t.c, t.d, t.e * factor, t.f)


def axis_weights(n_out: int, n_cells: int, f: int):
    """Bilinear weights along one axis: output index ``r`` takes ``(1 - w) * cell[i0] + w * cell[i1]``;
    cell centres sit at output coordinate ``I*f + (f-1)/2``; beyond the outer centres the outer cell
    is used alone. Returns ``(i0, i1, w)`` (int, int, float64 arrays of length ``n_out``)."""
    u = (np.arange(n_out, dtype=np.float64) - (f - 1) / 2.0) / f
    i0 = np.floor(u).astype(np.int64)
    w = u - i0
    lo, hi = i0 < 0, i0 >= n_cells - 1
    i0 = np.clip(i0, 0, n_cells - 1)
    w[lo | hi] = 0.0
    i1 = np.minimum(i0 + 1, n_cells - 1)
    return i0, i1, w


def cell_need(mask: np.ndarray, group: ZoomGroup) -> np.ndarray:
    """bool ``[group.height, group.width]``: the cells whose chips the output pixels of ``mask``
    (bool ``[H, W]``) are interpolated from (every cell with a positive weight)."""
    if group.factor == 1:
        return np.asarray(mask, bool)
    H, W = mask.shape
    f = group.factor
    i0, i1, wy = axis_weights(H, group.height, f)
    j0, j1, wx = axis_weights(W, group.width, f)
    m = np.asarray(mask, bool)
    rows = np.zeros((group.height, W), bool)
    np.logical_or.at(rows, i0, m)
    np.logical_or.at(rows, i1[wy > 0], m[wy > 0])
    out = np.zeros((group.height, group.width), bool)
    np.logical_or.at(out.T, j0, rows.T)
    np.logical_or.at(out.T, j1[wx > 0], rows.T[wx > 0])
    return out


def resample(values: np.ndarray, ok: np.ndarray, factor: int, out_shape: tuple[int, int]) -> np.ndarray:
    """Cell values ``[..., h, w]`` -> output pixels ``[..., H, W]`` (float32), bilinear and NaN-aware.

    ``ok`` bool ``[h, w]``: the cells the store computed (DONE). An output pixel with a positive
    weight on a cell that is not ``ok`` is NaN (not computed, or a read fault: as the dense map);
    NaN values of computed cells (too little valid imagery) drop out and the other weights are
    renormalised. ``factor == 1``: the values themselves, NaN where not ``ok``."""
    v = np.asarray(values, np.float32)
    H, W = out_shape
    if factor == 1:
        out = v[..., :H, :W].copy()
        out[..., ~np.asarray(ok, bool)[:H, :W]] = np.nan
        return out
    h, w = v.shape[-2:]
    return blend(v, ok, axis_weights(H, h, factor), axis_weights(W, w, factor))


def blend(v: np.ndarray, ok: np.ndarray, rows: tuple, cols: tuple) -> np.ndarray:
    """The NaN-aware bilinear blend of cell values ``v [..., h, w]`` with the per-axis weights
    ``rows = (i0, i1, wy)`` and ``cols = (j0, j1, wx)`` (:func:`axis_weights`, indices into ``v``):
    one arithmetic for whole maps (:func:`resample`) and windows (``engine.resample_window``)."""
    (i0, i1, wy), (j0, j1, wx) = rows, cols
    okf = np.asarray(ok, bool)
    num = np.zeros(v.shape[:-2] + (len(i0), len(j0)), np.float32)
    den = np.zeros_like(num)
    bad = np.zeros((len(i0), len(j0)), bool)
    for ii, wyy in ((i0, 1.0 - wy), (i1, wy)):
        for jj, wxx in ((j0, 1.0 - wx), (j1, wx)):
            wt = (wyy[:, None] * wxx[None, :]).astype(np.float32)
            pos = wt > 0
            bad |= pos & ~okf[ii][:, jj]
            vv = v[..., ii, :][..., jj]
            fin = np.isfinite(vv)
            num += np.where(fin, vv, 0.0) * wt
            den += fin * wt
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / den
    out[den <= 0] = np.nan
    out[..., bad] = np.nan
    return out.astype(np.float32, copy=False)


def zoom_grid(grid, group: ZoomGroup, mask: np.ndarray | None = None):
    """The zoom grid of ``group`` over the output grid ``grid`` as an
    :class:`~psm_mapping.grid.OutputGrid` (``mask``: the cells to compute, default those the
    region's pixels need). Factor 1: ``grid`` itself."""
    from dataclasses import replace

    if group.factor == 1 and mask is None:
        return grid
    need = cell_need(grid.mask, group) if mask is None else mask
    zl = tuple(grid.zoom_levels)[group.zooms[0]:group.zooms[1]] if len(grid.zoom_levels) >= group.zooms[1] \
        else tuple(grid.zoom_levels)
    # the grid's own class (an OutputGrid) with the zoom grid's size: no import of grid.py (which imports this)
    return replace(grid, stride=grid.stride * group.factor, transform=zoom_transform(grid.transform, group.factor),
                   width=group.width, height=group.height, mask=need, zoom_levels=zl)


def chips_needed(mask: np.ndarray, factors: Sequence[int]) -> list[int]:
    """Chips per zoom level the output pixels of ``mask`` need (their cells on each zoom grid)."""
    H, W = mask.shape
    out = []
    for g in zoom_groups(H, W, factors):
        n = int(cell_need(mask, g).sum())
        out += [n] * (g.zooms[1] - g.zooms[0])
    return out
