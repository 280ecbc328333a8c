"""Queries (text, audio, both): embedding them (:func:`build_queries`) and the whole-store maps
(:func:`query_store`), thin over the engine (:mod:`psm_mapping.engine`: one reader, one kernel,
one fusion re-run).

``csd(pixel, q) = -(2 - 2 <mu_pixel, mu_q> + var_sum_pixel + var_sum_q)``: one matrix product over
the store plus two additions, window by window (:func:`psm_mapping.maps.map_windows` streams
them; :func:`query_store` gathers them into arrays). A query with its own metadata (month, hour,
sources) re-runs only the fusion and heads from ``z_img``. Scale-true stores (each zoom on its
own grid) are answered on each zoom's grid and resampled to the output grid per window.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError, StoreError
from .model import PSM, ProbEmbedding
from .engine import QueryMatrix, Refusion, Window, read_plane, similarity, window_similarity
from .grid import Block
from .store import DONE, EmbeddingStore
from .zoomgrid import resample

log = logging.getLogger(__name__)


@dataclass
class Query:
    """One query: a label for band names and its embedding (a single Gaussian)."""

    label: str
    kind: str  # "text" | "audio" | "text+audio"
    embedding: ProbEmbedding


def build_queries(model: PSM, texts: Sequence[str] = (), audio: Sequence[str | Path] = (),
                  tokenizer=None, combine: bool = False, seed: int = 0) -> list[Query]:
    """Embed text and audio queries. ``combine``: every text with every audio file as one
    query (PSM_SPEC.md section 4), instead of separate queries."""
    texts, audio = list(texts or []), list(audio or [])
    if not texts and not audio:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    out: list[Query] = []
    t_emb = model.embed_text_queries(texts, tokenizer=tokenizer) if texts else None
    a_emb = model.embed_audio_files(audio, seed=seed) if audio else None
    if combine and texts and audio:
        for i, t in enumerate(texts):
            for j, a in enumerate(audio):
                out.append(Query(f"{t} + {Path(a).name}", "text+audio", t_emb[i].combine(a_emb[j])))
        return out
    out += [Query(t, "text", t_emb[i]) for i, t in enumerate(texts)]
    out += [Query(Path(a).name, "audio", a_emb[j]) for j, a in enumerate(audio)]
    return out


@dataclass
class QueryMaps:
    """``similarity[q]`` float32 ``[Z, H, W]`` per query; ``uncertainty`` ``[Z, H, W]``."""

    zoom_levels: tuple[int, ...]
    queries: list[Query]
    similarity: list[np.ndarray]
    uncertainty: np.ndarray

    def score(self, q: int) -> np.ndarray:
        """Similarity rescaled to 0..1 per zoom over the map (NaN kept)."""
        s = self.similarity[q]
        lo = np.nanmin(s, axis=(1, 2), keepdims=True)
        hi = np.nanmax(s, axis=(1, 2), keepdims=True)
        return ((s - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)


def _query_matrix(queries: Sequence[Query]) -> tuple[torch.Tensor, torch.Tensor | None]:
    emb = ProbEmbedding.cat([q.embedding for q in queries])
    vs = emb.var_sum().float() if emb.logvar is not None else None
    return emb.mean.float(), vs


def prepare_query(store: EmbeddingStore, queries: Sequence[Query], metadata=None,
                  can_rerun: bool = True) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """What every query driver needs first: ``(qm, qvs, rerun)``.

    ``qm`` ``[Q, D]`` float32 query means; ``qvs`` ``[Q]`` their var sums, or None when the
    similarity is cosine (deterministic queries or store); ``rerun``: ``metadata`` differ from
    the store's, so fusion and heads must re-run from ``z_img`` (``can_rerun``: a model is at hand).
    """
    if not queries:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    stored_md = store.attrs.get("metadata_options")
    rerun = metadata is not None and stored_md is not None and metadata.as_dict() != stored_md
    if rerun and not can_rerun:
        raise StoreError("these metadata differ from the store's: pass --checkpoint so fusion can re-run")
    qm, qvs = _query_matrix(queries)
    return qm, (qvs if qvs is not None and store.spec.probabilistic else None), rerun


def query_store(store: EmbeddingStore, queries: Sequence[Query], model: PSM | None = None,
                metadata=None, blocks: Sequence[Block] | None = None) -> QueryMaps:
    """Similarity maps of ``queries`` over the whole store, held in memory (``[Z, H, W]`` per
    query; the writers stream instead: :func:`psm_mapping.maps.map_windows`).

    ``metadata`` (:class:`~psm_mapping.embed.MetadataOptions`): when it differs from what the
    store's ``mean`` was computed with, fusion and heads re-run from ``z_img`` (needs ``model``).
    ``blocks``: only these output blocks (the rest NaN)."""
    from .maps import map_windows

    spec = store.spec
    qm, qvs, rerun = prepare_query(store, queries, metadata, can_rerun=model is not None)
    Z, H, W = len(spec.zoom_levels), spec.height, spec.width
    sims = [np.full((Z, H, W), np.nan, np.float32) for _ in queries]
    unc = np.full((Z, H, W), np.nan, np.float32)
    refusion = Refusion(model, metadata, store) if rerun else None
    windows = None if blocks is None else [Window.of_block(b) for b in blocks]
    for w, sim, u in map_windows(store, QueryMatrix(qm, qvs), refusion, windows=windows):
        ys, xs = w.slices
        unc[:, ys, xs] = u
        for q in range(len(queries)):
            sims[q][:, ys, xs] = sim[q]
    return QueryMaps(tuple(spec.zoom_levels), list(queries), sims, unc)


def lazy_query_maps(store: EmbeddingStore, queries, model=None, metadata=None, mask: np.ndarray | None = None):
    """:func:`psm_mapping.query.query_store` as a lazy :class:`~psm_mapping.query.QueryMaps`
    (bands are dask arrays over :func:`lazy_maps`; fusion re-runs with ``model`` when ``metadata``
    differ from the store's): the writers stream it, one window per task."""
    from .maps import lazy_maps

    qm, qvs, rerun = prepare_query(store, queries, metadata, can_rerun=model is not None)
    arr = lazy_maps(store, QueryMatrix(qm, qvs), Refusion(model, metadata, store) if rerun else None, mask=mask)
    Q = len(queries)
    return QueryMaps(tuple(store.spec.zoom_levels), list(queries), [arr[q] for q in range(Q)], arr[Q])


#: a map whose arrays (similarity per query and zoom, uncertainty per zoom, float32) fit in this
#: many bytes is computed in memory (fastest: one pass, the eager COG writer); a larger one is
#: streamed window by window into the dask writers, so peak memory stays bounded at any size
EAGER_MAX_BYTES = 512 << 20


def answer_maps(store: EmbeddingStore, queries, model=None, metadata=None):
    """The maps of ``queries`` over the whole store: in memory up to :data:`EAGER_MAX_BYTES`,
    else lazy (:func:`lazy_query_maps`)."""
    s = store.spec
    nbytes = (len(queries) + 1) * len(s.zoom_levels) * s.height * s.width * 4
    if nbytes <= EAGER_MAX_BYTES:
        return query_store(store, queries, model=model, metadata=metadata)
    return lazy_query_maps(store, queries, model=model, metadata=metadata)


def query_zoom_grid(store: EmbeddingStore, zoom_index: int, qm: torch.Tensor, qvs: torch.Tensor | None,
                    model: PSM | None = None, metadata=None) -> tuple[np.ndarray, np.ndarray]:
    """Similarity ``[Q, H, W]`` and uncertainty ``[H, W]`` of one zoom on the output grid (a
    scale-true zoom's grid resampled; fusion re-run from ``z_img`` with ``model``)."""
    r = window_similarity(store, zoom_index, None, QueryMatrix(qm, qvs),
                          refusion=Refusion(model, metadata, store) if model is not None else None)
    return r.similarity, r.uncertainty


def query_block(store: EmbeddingStore, b: Block, qm: torch.Tensor, qvs: torch.Tensor | None,
                model: PSM | None = None, metadata=None, lonlat=None) -> tuple[np.ndarray, np.ndarray]:
    """One block's similarity ``[Q, Z, h, w]`` and uncertainty ``[Z, h, w]`` (float32), on the
    grid the block lies on (its zoom grid for a block with ``zooms``), NaN where not DONE.

    ``qvs``: the queries' var sums (None: cosine similarity); ``model``: re-run fusion and heads
    from ``z_img`` with ``metadata`` (``lonlat`` is ignored: kept for callers)."""
    qmat = QueryMatrix(qm, qvs)
    refusion = Refusion(model, metadata, store) if model is not None else None
    zs = range(len(store.spec.zoom_levels))[b.zoom_slice]
    sims, uncs = [], []
    for k in zs:
        g = store.zoom_group(k)
        # a block of a zoom grid: its cells are that grid's pixels (factor f output pixels each)
        w = Window(b.row_off * g.factor, b.col_off * g.factor, b.height * g.factor, b.width * g.factor)
        p = read_plane(store, k, w, 0, refusion=refusion)
        s = similarity(p.mean, p.var_sum, qmat)
        s[:, ~p.ok] = np.nan
        sims.append(s)
        uncs.append(p.uncertainty)
    return np.stack(sims, 1).astype(np.float32, copy=False), np.stack(uncs).astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- one zoom level
# (the explorer, ``psm_mapping.serve``: one query's raster per zoom, computed once and cached)
@dataclass
class ZoomArrays:
    """One zoom level of a store in memory, NaN outside done blocks and valid chips: ``mean``
    ``[H, W, D]`` (float16 as stored, float32 when fusion re-ran), ``var_sum`` and
    ``uncertainty`` float32 ``[H, W]``."""

    zoom_index: int
    mean: np.ndarray | None  # None: not held (:func:`zoom_similarity` reads it from the store)
    var_sum: np.ndarray
    uncertainty: np.ndarray
    #: scale-true stores (:mod:`psm_mapping.zoomgrid`): ``mean`` and ``var_sum`` are on the zoom's own
    #: grid of cells of ``factor`` output pixels (``ok``: its DONE cells), ``uncertainty`` is already
    #: resampled to the output grid ``out_shape``; :func:`zoom_similarity` resamples what it computes
    factor: int = 1
    ok: np.ndarray | None = None
    out_shape: tuple[int, int] | None = None

    @property
    def nbytes(self) -> int:
        return int((0 if self.mean is None else self.mean.nbytes) + self.var_sum.nbytes + self.uncertainty.nbytes)


def zoom_nbytes(store: EmbeddingStore) -> int:
    """Bytes of one zoom level's :class:`ZoomArrays` as stored (float16 means)."""
    s = store.spec
    if not s.dense:  # the mean over zoom levels of their own grids
        cells = [store.zoom_group(k).height * store.zoom_group(k).width for k in range(len(s.zoom_levels))]
        return int(sum(cells) / len(cells) * (2 * s.fc_dim + 8)) + s.height * s.width * 4
    return s.height * s.width * (2 * s.fc_dim + 8)


def load_zoom(store: EmbeddingStore, zoom_index: int, model: PSM | None = None, metadata=None,
              progress=None, with_mean: bool = True) -> ZoomArrays:
    """Read zoom ``zoom_index`` of ``store`` into memory (``with_mean=False``: all but ``mean``);
    with ``model`` and ``metadata`` re-run fusion and heads from ``z_img`` block by block
    (``progress(done, total)`` after each block). Through :func:`psm_mapping.engine.read_plane`."""
    from .grid import iter_blocks

    spec = store.spec
    g = store.zoom_group(zoom_index)
    if model is None:
        p = read_plane(store, zoom_index, None, 0, with_mean=with_mean)
        mean, vs, unc, ok = p.mean, p.var_sum, p.uncertainty, p.ok
    else:
        refusion = Refusion(model, metadata, store)
        mean = np.full((g.height, g.width, spec.fc_dim), np.nan, np.float32)
        vs = np.full((g.height, g.width), np.nan, np.float32)
        unc, ok = vs.copy(), np.zeros((g.height, g.width), bool)
        blocks = list(iter_blocks(g.height, g.width, spec.block_size))
        f = g.factor
        for i, b in enumerate(blocks):
            p = read_plane(store, zoom_index, Window(b.row_off * f, b.col_off * f, b.height * f, b.width * f), 0,
                           refusion=refusion)
            ys, xs = b.slices
            mean[ys, xs], vs[ys, xs], unc[ys, xs], ok[ys, xs] = p.mean, p.var_sum, p.uncertainty, p.ok
            if progress is not None:
                progress(i + 1, len(blocks))
    if g.factor == 1:
        return ZoomArrays(zoom_index, mean, vs, unc)
    shape = (spec.height, spec.width)
    return ZoomArrays(zoom_index, mean, vs, resample(unc, ok, g.factor, shape), factor=g.factor, ok=ok,
                      out_shape=shape)


def zoom_similarity(source: EmbeddingStore | ZoomArrays, qm: torch.Tensor, qvs: torch.Tensor | None,
                    zoom_index: int | None = None) -> np.ndarray:
    """Similarity ``[Q, H, W]`` (float32) of the queries ``(qm, qvs)`` (from :func:`prepare_query`)
    at one zoom: over :class:`ZoomArrays` held in memory, or read from the store one band of
    blocks at a time (``zoom_index`` then says which zoom). The engine's kernel."""
    qmat = QueryMatrix(qm, qvs)
    if isinstance(source, ZoomArrays):
        if source.mean is None:
            raise ValueError("these ZoomArrays do not hold the means: pass the store")
        sim = similarity(source.mean, source.var_sum, qmat)
        if source.factor > 1:  # on the zoom's own grid: resample (linear in mean and var_sum)
            return resample(sim, source.ok, source.factor, source.out_shape)
        return sim
    store, spec = source, source.spec
    if store.zoom_group(zoom_index).factor > 1:
        return window_similarity(store, zoom_index, None, qmat).similarity
    out = np.full((len(qmat), spec.height, spec.width), np.nan, np.float32)
    for r in range(0, spec.height, spec.block_size):
        w = Window(r, 0, min(spec.block_size, spec.height - r), spec.width)
        out[:, w.row_off:w.row_off + w.height] = window_similarity(store, zoom_index, w, qmat).similarity
    return out


class _LonLat:
    """lon/lat of a block's pixel centres (``zoom_index``: on that zoom's own grid)."""

    def __init__(self, store: EmbeddingStore, zoom_index: int | None = None):
        from pyproj import CRS, Transformer

        from .zoomgrid import zoom_transform

        self.t = Transformer.from_crs(CRS.from_wkt(store.spec.crs_wkt), "EPSG:4326", always_xy=True)
        f = store.zoom_group(zoom_index).factor if zoom_index is not None else 1
        t = zoom_transform(store.spec.transform, f)
        g = store.zoom_group(zoom_index) if zoom_index is not None else None
        h, w = (g.height, g.width) if g is not None else (store.spec.height, store.spec.width)
        self.x = t.c + (np.arange(w) + 0.5) * t.a
        self.y = t.f + (np.arange(h) + 0.5) * t.e

    def __call__(self, b: Block):
        from .region import wrap_lon

        xx, yy = np.meshgrid(self.x[b.col_off:b.col_off + b.width], self.y[b.row_off:b.row_off + b.height])
        lon, lat = self.t.transform(xx, yy)
        return wrap_lon(lon), np.asarray(lat)
