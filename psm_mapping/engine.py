"""The query engine: every answer is "a window of a zoom at a level" of the store.

Three parts, used by every view (maps, cubes, sites, profiles, the explorer):

- :func:`read_plane` ``(store, zoom_index, window, level) -> Plane``: the one reader. It hides
  dense vs scale-true stores (each zoom on its own grid, :mod:`psm_mapping.zoomgrid`) and levels
  (overviews of embeddings, :mod:`psm_mapping.levels`): a :class:`Plane` holds the cells of the
  zoom's level-``level`` grid that cover the window, their averaged ``mean``/``var_sum``, counts
  and georeferencing. With a :class:`Refusion` it re-runs fusion and heads from ``z_img``.
- :func:`similarity` ``(mean, var_sum, queries) -> [Q, ...]``: the one kernel (csd for
  probabilistic stores via :func:`psm_mapping.model.heads.csd_from_parts`, cosine otherwise).
- :func:`window_similarity`: both, on the output grid (scale-true zooms resampled bilinearly).

Nothing here touches process-wide state (thread counts, patched functions): it is called from
the explorer's threads and from dask workers.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from . import levels as L
from .store import DONE, EmbeddingStore

__all__ = ["Window", "Plane", "QueryMatrix", "Refusion", "WindowResult", "read_plane", "similarity",
           "query_matrix", "window_similarity", "window_plane", "plane_similarity", "level_for_pixel_size", "max_level", "resample_window"]


@dataclass(frozen=True)
class Window:
    """Output-grid pixels ``row_off .. row_off + height`` x ``col_off .. col_off + width``."""

    row_off: int
    col_off: int
    height: int
    width: int

    @classmethod
    def of_block(cls, block) -> "Window":
        return cls(block.row_off, block.col_off, block.height, block.width)

    @classmethod
    def whole(cls, store: EmbeddingStore) -> "Window":
        return cls(0, 0, store.spec.height, store.spec.width)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.row_off, self.row_off + self.height), slice(self.col_off, self.col_off + self.width))


@dataclass
class Plane:
    """Cells ``row_off .. row_off + h`` x ``col_off .. col_off + w`` of zoom ``zoom_index``'s grid
    at ``level`` (each cell ``cell`` x ``cell`` output pixels: the zoom grid's factor times
    ``2**level``).

    ``mean`` ``[h, w, D]``: level 0 the stored float16 means (float32 when fusion re-ran), levels
    the float32 averages over the cell's DONE pixels; ``var_sum``, ``uncertainty`` float32
    ``[h, w]``; NaN where nothing was computed. ``count`` int ``[h, w]``: DONE pixels with an
    embedding under the cell (level 0: 0/1). ``ok`` bool: the cell is DONE (level 0: status
    DONE, even with too little imagery for an embedding; levels: count > 0). ``approximate``: a
    re-fused level (fusion of the level's averaged ``z_img``, not the average of fused pixels).
    """

    zoom_index: int
    level: int
    cell: int
    row_off: int
    col_off: int
    mean: np.ndarray
    var_sum: np.ndarray
    uncertainty: np.ndarray
    count: np.ndarray
    ok: np.ndarray
    transform: object  # affine.Affine of the cells in the store's CRS
    approximate: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.ok.shape


@dataclass
class QueryMatrix:
    """Queries for the kernel: ``mean`` ``[Q, D]`` float32 tensor, ``var_sum`` ``[Q]`` float64
    tensor or None (cosine: a deterministic checkpoint or store)."""

    mean: torch.Tensor
    var_sum: torch.Tensor | None = None
    labels: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.mean.shape[0])


def query_matrix(queries, probabilistic: bool = True) -> QueryMatrix:
    """:class:`QueryMatrix` of a list of :class:`~psm_mapping.query.Query` (or a
    :class:`~psm_mapping.model.ProbEmbedding`); ``probabilistic``: the store's (False: cosine)."""
    from .model import ProbEmbedding

    if isinstance(queries, ProbEmbedding):
        emb, labels = queries, ()
    else:
        emb, labels = ProbEmbedding.cat([q.embedding for q in queries]), tuple(q.label for q in queries)
    vs = emb.var_sum() if (emb.logvar is not None and probabilistic) else None
    return QueryMatrix(emb.mean.detach().float().cpu(), None if vs is None else vs.detach().cpu(), labels)


# ------------------------------------------------------------------------------- the kernel
#: rows converted float16 -> float32 per matrix product: the float32 copy stays in cache
_DOT_ROWS = 4096
#: elements per conversion step: below torch's parallel grain (32768) each copy runs on the calling
#: thread, so a loaded machine cannot stall it in OpenMP barriers, and no thread count is changed
_COPY_ELEMS = 32767


def dot(mean: np.ndarray, qt: torch.Tensor) -> np.ndarray:
    """``mean @ qt`` for ``mean`` ``[N, D]`` (float16 converted to float32 piece by piece in
    cache; float64 stays float64) -> ``[N, Q]`` numpy."""
    m = torch.from_numpy(np.ascontiguousarray(mean))
    if m.dtype == torch.float64:
        return (m @ qt.double()).numpy()
    q = qt.float()
    if m.dtype == torch.float32:
        return (m @ q).numpy()
    n = m.shape[0]
    out = torch.empty((n, q.shape[1]), dtype=torch.float32)
    buf = torch.empty((min(n, _DOT_ROWS), m.shape[1]), dtype=torch.float32)
    step = max(1, _COPY_ELEMS // max(1, m.shape[1]))
    for i in range(0, n, _DOT_ROWS):
        k = min(_DOT_ROWS, n - i)
        b = buf[:k]
        for j in range(0, k, step):
            e = min(k, j + step)
            b[j:e].copy_(m[i + j:i + e])
        torch.mm(b, q, out=out[i:i + k])
    return out.numpy()


def similarity(mean: np.ndarray, var_sum: np.ndarray | None, queries: QueryMatrix) -> np.ndarray:
    """The one similarity kernel: ``[Q, *shape]`` for embeddings ``mean`` ``[*shape, D]`` (float16,
    float32 or float64) and ``var_sum`` ``[*shape]``: ``csd = -(2 - 2 <mu, q> + var_sum +
    var_sum_q)`` (:func:`~psm_mapping.model.heads.csd_from_parts`) when ``queries.var_sum`` is
    given, else the cosine ``<mu, q>``. float32 out (float64 for float64 means). NaN means stay NaN."""
    from .model.heads import csd_from_parts

    shape, D = mean.shape[:-1], mean.shape[-1]
    d = dot(mean.reshape(-1, D), queries.mean.T.contiguous())  # [N, Q]
    if queries.var_sum is not None:
        vs = np.asarray(var_sum).reshape(-1, 1).astype(d.dtype, copy=False)
        d = csd_from_parts(d, vs, queries.var_sum.numpy().astype(d.dtype)[None, :])
    return np.ascontiguousarray(d.T).reshape((len(queries),) + tuple(shape))


# ------------------------------------------------------------------------------- fusion re-run
class Refusion:
    """Fusion and heads re-run from ``z_img`` with other metadata (month, hour, sources).

    Exact at level 0 (each pixel fused as the map run would); at a level > 0 the cell's averaged
    ``z_img`` is fused at the cell centre (an approximation of the average of the fused pixels:
    fusion is not linear), so those planes say ``approximate=True``."""

    def __init__(self, model, metadata, store: EmbeddingStore):
        from pyproj import CRS, Transformer

        self.model, self.metadata = model, metadata
        self.to_lonlat = Transformer.from_crs(CRS.from_wkt(store.spec.crs_wkt), "EPSG:4326", always_xy=True)
        self._lock = threading.Lock()

    def lonlat(self, transform, rows: int, cols: int):
        from .region import wrap_lon

        c = np.arange(cols) + 0.5
        r = np.arange(rows) + 0.5
        xx = transform.c + c[None, :] * transform.a + r[:, None] * transform.b
        yy = transform.f + c[None, :] * transform.d + r[:, None] * transform.e
        lon, lat = self.to_lonlat.transform(xx, yy)
        return wrap_lon(np.asarray(lon)), np.asarray(lat)

    def fuse(self, z_img: np.ndarray, transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``z_img`` ``[h, w, D]`` (NaN rows: nothing) -> ``mean`` float32 ``[h, w, D]``, ``var_sum``,
        ``uncertainty`` ``[h, w]``, fused at the cells' centres of ``transform``."""
        h, w, D = z_img.shape
        z = torch.from_numpy(np.asarray(z_img, np.float32)).reshape(-1, D)
        ok = torch.isfinite(z).all(1)
        mean = np.full((h * w, self.model.config.fc_dim), np.nan, np.float32)
        vs = np.full(h * w, np.nan, np.float32)
        unc = np.full(h * w, np.nan, np.float32)
        if ok.any():
            idx = ok.nonzero().squeeze(1).numpy()
            lon, lat = self.lonlat(transform, h, w)
            md = self.metadata.for_pixels(lon.reshape(-1)[idx], lat.reshape(-1)[idx])
            with self._lock, torch.inference_mode():  # one model, many threads
                emb = self.model.embed_image_features(z[idx], md, fuse=self.metadata.fuse)
            mean[idx] = emb.mean.float().cpu().numpy()
            if emb.logvar is not None:
                vs[idx] = emb.var_sum().cpu().numpy()
                unc[idx] = emb.uncertainty().cpu().numpy()
        return mean.reshape(h, w, -1), vs.reshape(h, w), unc.reshape(h, w)


# ------------------------------------------------------------------------------- the reader
def max_level(store: EmbeddingStore, zoom_index: int) -> int:
    """The coarsest level of a zoom: one cell covers its grid."""
    g = store.zoom_group(zoom_index)
    return L.max_level(g.height, g.width)


def level_for_pixel_size(store: EmbeddingStore, zoom_index: int, metres_per_pixel: float) -> int:
    """The level whose cell is the largest not coarser than ``metres_per_pixel`` (rio-tiler's
    overview choice): 0 when a zoom-grid pixel is already coarser, at most :func:`max_level`."""
    g = store.zoom_group(zoom_index)
    px = float(store.spec.stride) * g.factor
    if not metres_per_pixel > px:
        return 0
    k = int(math.floor(math.log2(float(metres_per_pixel) / px) + 1e-9))
    return max(0, min(k, max_level(store, zoom_index)))


def _cell_transform(store: EmbeddingStore, cell: int, row_off: int, col_off: int):
    from affine import Affine

    t = Affine(*store.spec.transform[:6])
    return Affine(t.a * cell, t.b, t.c + col_off * cell * t.a, t.d, t.e * cell, t.f + row_off * cell * t.e)


def cells_of(store: EmbeddingStore, zoom_index: int, window: Window | None, level: int,
             halo: int = 0) -> tuple[slice, slice]:
    """The cells of the zoom's level grid that cover ``window`` (plus ``halo`` cells each side)."""
    g = store.zoom_group(zoom_index)
    cell = g.factor << level
    hk, wk = L.zoom_level_shape(store, zoom_index, level)
    w = window or Window.whole(store)
    r0 = max(0, w.row_off // cell - halo)
    r1 = min(hk, -(-(w.row_off + w.height) // cell) + halo)
    c0 = max(0, w.col_off // cell - halo)
    c1 = min(wk, -(-(w.col_off + w.width) // cell) + halo)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def read_plane(store: EmbeddingStore, zoom_index: int, window: Window | None = None, level: int = 0, *,
               refusion: Refusion | None = None, halo: int = 0, with_mean: bool = True) -> Plane:
    """The cells of zoom ``zoom_index`` at ``level`` covering ``window`` (output-grid pixels;
    None: the whole store), ``halo`` cells more each side (for bilinear resampling).

    Level 0 reads the stored arrays (float16 ``mean`` as stored); a level > 0 the store's levels
    (:mod:`psm_mapping.levels`: averages over the cell's DONE pixels). ``refusion``: re-run fusion
    and heads from ``z_img`` (exact at level 0, approximate above). ``with_mean=False``: skip the
    means (``mean`` is then None)."""
    g = store.zoom_group(zoom_index)
    cell = g.factor << level
    rows, cols = cells_of(store, zoom_index, window, level, halo)
    transform = _cell_transform(store, cell, rows.start, cols.start)
    zs = slice(zoom_index, zoom_index + 1)
    if level == 0:
        if refusion is not None:
            names = ("status", "z_img")
        else:
            names = ("status", "mean", "var_sum", "uncertainty") if with_mean else ("status", "var_sum", "uncertainty")
        d = store.read_arrays(names, rows, cols, zs)  # status first: DONE pixels' data were written before it
        ok = np.asarray(d["status"])[0] == DONE
        if refusion is not None:
            z = np.where(ok[..., None], np.asarray(d["z_img"])[0], np.float16(np.nan))
            mean, vs, unc = refusion.fuse(z, transform)
        else:
            mean = np.asarray(d["mean"])[0] if with_mean else None
            vs = np.asarray(d["var_sum"], np.float32)[0]
            unc = np.asarray(d["uncertainty"], np.float32)[0]
        vs, unc = np.where(ok, vs, np.float32(np.nan)), np.where(ok, unc, np.float32(np.nan))
        if mean is not None:
            bad = ~ok
            if bad.any():
                mean = mean.copy()
                mean[bad] = np.nan
            count = (ok & np.isfinite(mean[..., 0])).astype(np.int64)
        else:
            count = (ok & np.isfinite(vs)).astype(np.int64) if store.spec.probabilistic else ok.astype(np.int64)
        return Plane(zoom_index, 0, cell, rows.start, cols.start, mean, vs, unc, count, ok, transform)
    a = L.averages(L.read_sums(store, zoom_index, level, rows, cols, with_z=refusion is not None))
    mean, vs, unc = a["mean"], a["var_sum"], a["uncertainty"]
    if refusion is not None:
        mean, vs, unc = refusion.fuse(a["z_img"], transform)
    return Plane(zoom_index, level, cell, rows.start, cols.start, mean if with_mean else None, vs, unc,
                 a["count"], a["count"] > 0, transform, approximate=refusion is not None)


# ------------------------------------------------------------------------------- on the output grid
def resample_window(values: np.ndarray, ok: np.ndarray, factor: int, cells: tuple[int, int],
                    grid_cells: tuple[int, int], window: Window) -> np.ndarray:
    """:func:`psm_mapping.zoomgrid.resample` for one window: cell values ``[..., h, w]`` whose
    first cell is ``cells = (row, col)`` of a zoom grid of ``grid_cells`` cells -> the window's
    output pixels ``[..., height, width]`` (bilinear, NaN-aware, the same arithmetic per pixel).
    The cells must cover the window plus one cell of halo (:func:`read_plane` ``halo=1``)."""
    from .zoomgrid import axis_weights, blend

    v = np.asarray(values, np.float32)
    f = int(factor)
    H = window.row_off + window.height
    W = window.col_off + window.width
    i0, i1, wy = (a[window.row_off:] for a in axis_weights(H, grid_cells[0], f))
    j0, j1, wx = (a[window.col_off:] for a in axis_weights(W, grid_cells[1], f))
    return blend(v, ok, (i0 - cells[0], i1 - cells[0], wy), (j0 - cells[1], j1 - cells[1], wx))


@dataclass
class WindowResult:
    """Similarity ``[Q, h, w]`` and uncertainty ``[h, w]`` (float32) of one zoom over a window:
    on the output grid's pixels (``level`` 0 with ``on_output``), else on the plane's cells
    (``plane`` says where)."""

    similarity: np.ndarray
    uncertainty: np.ndarray
    plane: Plane
    approximate: bool = False


def window_plane(store: EmbeddingStore, zoom_index: int, window: Window | None, level: int = 0,
                 refusion: Refusion | None = None, on_output: bool = True) -> Plane:
    """The read half of :func:`window_similarity` (one cell of halo for a scale-true zoom resampled
    to the output grid): a caller may read the next window while computing this one."""
    resample = on_output and level == 0 and store.zoom_group(zoom_index).factor > 1
    return read_plane(store, zoom_index, window or Window.whole(store), level, refusion=refusion,
                      halo=1 if resample else 0)


def plane_similarity(store: EmbeddingStore, plane: Plane, window: Window | None, queries: QueryMatrix,
                     on_output: bool = True) -> WindowResult:
    """The compute half of :func:`window_similarity` for a plane from :func:`window_plane`."""
    window = window or Window.whole(store)
    g = store.zoom_group(plane.zoom_index)
    sim = similarity(plane.mean, plane.var_sum, queries)
    unc = plane.uncertainty
    if on_output and plane.level == 0 and g.factor > 1:
        cells, grid_cells = (plane.row_off, plane.col_off), (g.height, g.width)
        sim = resample_window(sim, plane.ok, g.factor, cells, grid_cells, window)
        unc = resample_window(unc, plane.ok, g.factor, cells, grid_cells, window)
    elif not plane.ok.all():
        sim[:, ~plane.ok] = np.nan
    return WindowResult(sim.astype(np.float32, copy=False), unc, plane, plane.approximate)


def window_similarity(store: EmbeddingStore, zoom_index: int, window: Window | None, queries: QueryMatrix,
                      level: int = 0, refusion: Refusion | None = None, on_output: bool = True) -> WindowResult:
    """Similarity of ``queries`` over one zoom's ``window``: :func:`read_plane` + :func:`similarity`.

    Level 0 and ``on_output``: values on the window's output pixels (a scale-true zoom's cells
    resampled bilinearly, NaN-aware, as :func:`psm_mapping.zoomgrid.resample`; similarity is linear
    in mean and var_sum, so this equals the similarity of the resampled embeddings). Otherwise the
    plane's cells. NaN where the store computed nothing (not DONE) or has no embedding."""
    plane = window_plane(store, zoom_index, window, level, refusion, on_output)
    return plane_similarity(store, plane, window, queries, on_output)


def zoom_indices(store: EmbeddingStore) -> Sequence[int]:
    return range(len(store.spec.zoom_levels))
