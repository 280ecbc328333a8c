"""Queries (text, audio, both) against an embedding store -> similarity and uncertainty maps.

``csd(pixel, q) = -(2 - 2 <mu_pixel, mu_q> + var_sum_pixel + var_sum_q)``: one matrix product over
the store plus two additions, block by block. A query with its own metadata (month, hour,
sources) re-runs only the fusion and heads from ``z_img``.

A store whose zoom levels live on their own grids (scale-true sampling, :mod:`psm_mapping.zoomgrid`)
is queried on each zoom's grid and the similarity and uncertainty resampled to the output grid
(bilinear, NaN-aware): similarity is linear in the embedding mean and ``var_sum``, so this equals
the similarity of interpolated embeddings. Dense stores take the paths below unchanged.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .errors import InputError, StoreError
from .grid import Block
from .model import PSM, ProbEmbedding
from .model.heads import csd_from_parts
from .region import wrap_lon
from .grid import iter_blocks
from .store import DONE, EmbeddingStore
from .zoomgrid import resample, zoom_transform

log = logging.getLogger(__name__)


@dataclass
class Query:
    """One query: a label for band names and its embedding (a single Gaussian)."""

    label: str
    kind: str  # "text" | "audio" | "text+audio"
    embedding: ProbEmbedding


def build_queries(model: PSM, texts: Sequence[str] = (), audio: Sequence[str | Path] = (),
                  tokenizer=None, combine: bool = False, seed: int = 0, text_cache=None) -> list[Query]:
    """Embed text and audio queries. ``combine``: every text with every audio file as one
    query (PSM_SPEC.md section 4), instead of separate queries. ``text_cache``: a
    :class:`~psm_mapping.textcache.TextCache` (texts found there need no text tower)."""
    texts, audio = list(texts or []), list(audio or [])
    if not texts and not audio:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    out: list[Query] = []
    from .textcache import embed_texts

    t_emb = embed_texts(model, texts, tokenizer, cache=text_cache) if texts else None
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
    """Similarity maps of ``queries`` over every done block of ``store``.

    ``metadata`` (:class:`~psm_mapping.embed.MetadataOptions`): when it differs from what the
    store's ``mean`` was computed with, fusion and heads re-run from ``z_img`` (needs ``model``).
    """
    spec = store.spec
    qm, qvs, rerun = prepare_query(store, queries, metadata, can_rerun=model is not None)
    Z, H, W = len(spec.zoom_levels), spec.height, spec.width
    sims = [np.full((Z, H, W), np.nan, np.float32) for _ in queries]
    unc = np.full((Z, H, W), np.nan, np.float32)
    if not spec.dense:  # each zoom on its own grid: query there, resample to the output grid
        for k in range(Z):
            sim, unc[k] = query_zoom_grid(store, k, qm, qvs, model=model if rerun else None, metadata=metadata)
            for q in range(len(queries)):
                sims[q][k] = sim[q]
        return QueryMaps(tuple(spec.zoom_levels), list(queries), sims, unc)
    status = store.status()
    done = store.done_mask()
    if not rerun and blocks is None:
        _query_slabs(store, qm, qvs, sims, unc, done)
        _mask_not_done(status, sims, unc)
        return QueryMaps(tuple(spec.zoom_levels), list(queries), sims, unc)
    lonlat = _LonLat(store) if rerun else None
    for b in (blocks if blocks is not None else store.iter_blocks()):
        if not done[b.row_off // spec.block_size, b.col_off // spec.block_size]:
            continue
        ys, xs = b.slices
        sim, unc[:, ys, xs] = query_block(store, b, qm, qvs, model=model if rerun else None,
                                          metadata=metadata, lonlat=lonlat)
        for q in range(len(queries)):
            sims[q][:, ys, xs] = sim[q]
    _mask_not_done(status, sims, unc)
    return QueryMaps(tuple(spec.zoom_levels), list(queries), sims, unc)


def query_zoom_grid(store: EmbeddingStore, zoom_index: int, qm: torch.Tensor, qvs: torch.Tensor | None,
                    model: PSM | None = None, metadata=None) -> tuple[np.ndarray, np.ndarray]:
    """Similarity ``[Q, H, W]`` and uncertainty ``[H, W]`` of one zoom on the output grid: computed
    block by block on the zoom's own grid (fusion re-run from ``z_img`` with ``model``), then
    resampled (:func:`~psm_mapping.zoomgrid.resample`; similarity is linear in mean and var_sum,
    so resampling it equals resampling the embeddings). NaN where a contributing cell is not DONE."""
    from dataclasses import replace

    spec = store.spec
    g = store.zoom_group(zoom_index)
    h, w, Q = g.height, g.width, qm.shape[0]
    ok = store.zoom_status(zoom_index) == DONE
    done = store.done_mask(zoom_index)
    sim = np.full((Q, h, w), np.nan, np.float32)
    unc = np.full((h, w), np.nan, np.float32)
    lonlat = _LonLat(store, zoom_index) if model is not None else None
    for b in iter_blocks(h, w, spec.block_size):
        if not done[b.index]:
            continue
        b = replace(b, zooms=(zoom_index, zoom_index + 1))
        ys, xs = b.slices
        s_b, u_b = query_block(store, b, qm, qvs, model=model, metadata=metadata, lonlat=lonlat)
        sim[:, ys, xs], unc[ys, xs] = s_b[:, 0], u_b[0]
    shape = (spec.height, spec.width)
    return resample(sim, ok, g.factor, shape), resample(unc, ok, g.factor, shape)


def _mask_not_done(status: np.ndarray, sims: list[np.ndarray], unc: np.ndarray) -> None:
    """NaN wherever the store's status is not DONE (never computed, or a read fault): a map
    shows exactly what the store says it computed."""
    nd = status != DONE
    if nd.any():
        unc[nd] = np.nan
        for s in sims:
            s[nd] = np.nan


def _slabs(H: int, W: int, bs: int, step: int, done: np.ndarray):
    """``(row, height, col, width)`` of the slabs of an ``H`` x ``W`` grid: one band of blocks
    (``bs`` rows) by ``step`` columns, skipping slabs with no block marked in ``done``."""
    for bi, r in enumerate(range(0, H, bs)):
        h = min(bs, H - r)
        for c in range(0, W, step):
            if done[bi, c // bs:(c + step) // bs + 1].any():
                yield r, h, c, min(step, W - c)


#: float16 bytes of ``mean`` read per slab by the fast path (a band of blocks, capped in width)
SLAB_BYTES = 64 << 20


def _query_slabs(store: EmbeddingStore, qm: torch.Tensor, qvs: torch.Tensor | None,
                 sims: list[np.ndarray], unc: np.ndarray, done: np.ndarray) -> None:
    """The whole store with the stored metadata: ``var_sum`` and ``uncertainty`` in one read each,
    ``mean`` in slabs of whole chunks (one read per band of blocks: the chunks decode
    concurrently, no per-block Python overhead), float16 -> float32 and one matrix product per
    slab. Blocks not marked done stay NaN."""
    spec = store.spec
    Z, H, W, D, bs = len(spec.zoom_levels), spec.height, spec.width, spec.fc_dim, spec.block_size
    vs_all = store.read("var_sum") if qvs is not None else None
    unc[:] = store.read("uncertainty")
    step = max(1, SLAB_BYTES // (Z * bs * bs * D * 2)) * bs  # columns per slab, whole blocks
    qt = qm.T.contiguous().float()
    for r, h, c, w in _slabs(H, W, bs, step, done):
        mean = torch.from_numpy(store.read("mean", slice(r, r + h), slice(c, c + w))).reshape(-1, D)
        dot = _dot_f16(mean, qt).numpy().reshape(Z, h, w, -1)
        for q, s in enumerate(sims):
            if qvs is not None:
                s[:, r:r + h, c:c + w] = 2.0 * dot[..., q] - (2.0 + float(qvs[q])) - vs_all[:, r:r + h, c:c + w]
            else:
                s[:, r:r + h, c:c + w] = dot[..., q]
    if not done.all():
        nd = np.repeat(np.repeat(~done, bs, axis=0), bs, axis=1)[:H, :W]
        unc[:, nd] = np.nan
        for s in sims:
            s[:, nd] = np.nan


#: rows converted float16 -> float32 at a time: the float32 copy stays in cache for the product
_DOT_ROWS = 2048


def _dot_f16(m16: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
    """``m16.float() @ qt`` for float16 rows ``[N, D]``, converted piece by piece in cache."""
    n = m16.shape[0]
    out = torch.empty((n, qt.shape[1]), dtype=torch.float32)
    buf = torch.empty((min(n, _DOT_ROWS), m16.shape[1]), dtype=torch.float32)
    # memory bound: one thread does it at memory speed, and a busy machine cannot stall it in
    # OpenMP barriers (with 2 threads on a loaded 2-core host each piece took 50x longer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(0, n, _DOT_ROWS):
            k = min(_DOT_ROWS, n - i)
            b = buf[:k]
            b.copy_(m16[i:i + k])
            torch.mm(b, qt, out=out[i:i + k])
    finally:
        torch.set_num_threads(threads)
    return out


def query_block(store: EmbeddingStore, b: Block, qm: torch.Tensor, qvs: torch.Tensor | None,
                model: PSM | None = None, metadata=None, lonlat=None) -> tuple[np.ndarray, np.ndarray]:
    """One block's similarity ``[Q, Z, h, w]`` and uncertainty ``[Z, h, w]`` (float32).

    ``qvs``: the queries' var sums (None: cosine similarity); ``model``: re-run fusion and heads
    from ``z_img`` with ``metadata`` (``lonlat``: a :class:`_LonLat` of the store)."""
    Z = len(range(len(store.spec.zoom_levels))[b.zoom_slice])
    if model is not None:
        d = store.read_block(b, ("z_img",))
        mean, vs, u = _fuse_from_z_img(model, d["z_img"], metadata, *(lonlat or _LonLat(store))(b))
    else:
        d = store.read_block(b, ("mean", "var_sum", "uncertainty"))
        mean, vs, u = d["mean"], d["var_sum"], d["uncertainty"]
    m = torch.from_numpy(np.ascontiguousarray(mean)).float().reshape(-1, mean.shape[-1])
    dot = (m @ qm.T).reshape(Z, b.height, b.width, qm.shape[0]).numpy()
    sim = np.empty((qm.shape[0], Z, b.height, b.width), np.float32)
    for q in range(qm.shape[0]):
        sim[q] = csd_from_parts(dot[..., q], vs, float(qvs[q])) if qvs is not None else dot[..., q]
    return sim, np.asarray(u, np.float32)


class _LonLat:
    """lon/lat of a block's pixel centres (``zoom_index``: on that zoom's own grid)."""

    def __init__(self, store: EmbeddingStore, zoom_index: int | None = None):
        from pyproj import CRS, Transformer

        self.t = Transformer.from_crs(CRS.from_wkt(store.spec.crs_wkt), "EPSG:4326", always_xy=True)
        g = store.zoom_group(zoom_index) if zoom_index is not None else None
        if g is None or g.factor == 1:
            self.x = np.asarray(store.group["x"][:])
            self.y = np.asarray(store.group["y"][:])
        else:  # cell centres of the zoom grid
            t = zoom_transform(store.spec.transform, g.factor)
            self.x = t.c + (np.arange(g.width) + 0.5) * t.a
            self.y = t.f + (np.arange(g.height) + 0.5) * t.e

    def __call__(self, b: Block):
        xx, yy = np.meshgrid(self.x[b.col_off:b.col_off + b.width], self.y[b.row_off:b.row_off + b.height])
        lon, lat = self.t.transform(xx, yy)
        return wrap_lon(lon), np.asarray(lat)


def _fuse_from_z_img(model: PSM, z_img: np.ndarray, metadata, lon: np.ndarray, lat: np.ndarray):
    """Fusion + heads from stored ``z_img`` ``[Z, h, w, D]`` with new metadata."""
    Z, h, w, D = z_img.shape
    z = torch.from_numpy(z_img.astype(np.float32)).reshape(-1, D)
    ok = torch.isfinite(z).all(1)
    mean = np.full((Z * h * w, model.config.fc_dim), np.nan, np.float32)
    vs = np.full(Z * h * w, np.nan, np.float32)
    unc = np.full(Z * h * w, np.nan, np.float32)
    if ok.any():
        idx = ok.nonzero().squeeze(1)
        lon_all = np.broadcast_to(lon, (Z, h, w)).reshape(-1)[idx.numpy()]
        lat_all = np.broadcast_to(lat, (Z, h, w)).reshape(-1)[idx.numpy()]
        emb = model.embed_image_features(z[idx], metadata.for_pixels(lon_all, lat_all), fuse=metadata.fuse)
        mean[idx.numpy()] = emb.mean.cpu().numpy()
        if emb.logvar is not None:
            vs[idx.numpy()] = emb.var_sum().cpu().numpy()
            unc[idx.numpy()] = emb.uncertainty().cpu().numpy()
    return mean.reshape(Z, h, w, -1), vs.reshape(Z, h, w), unc.reshape(Z, h, w)


# ---------------------------------------------------------------------------- one zoom level
# (the explorer, ``psm_mapping.serve``: one query's raster per zoom, computed once and cached)
@dataclass
class ZoomArrays:
    """One zoom level of a store in memory, NaN outside done blocks and valid chips: ``mean``
    ``[H, W, D]`` (float16 as stored, float32 when fusion re-ran), ``var_sum`` and
    ``uncertainty`` float32 ``[H, W]``."""

    zoom_index: int
    mean: np.ndarray | None  # None: not held (:func:`zoom_similarity` streams it from the store)
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
    (``progress(done, total)`` after each block)."""
    spec = store.spec
    if store.zoom_group(zoom_index).factor > 1:
        return _load_zoom_grid(store, zoom_index, model, metadata, progress, with_mean)
    H, W, D, bs = spec.height, spec.width, spec.fc_dim, spec.block_size
    nd = store.status()[zoom_index] != DONE  # never computed, or a read fault: NaN
    done = store.done_mask()
    blocks = [b for b in store.iter_blocks() if done[b.row_off // bs, b.col_off // bs]]
    if model is None:
        mean = np.asarray(store.read("mean", zoom_index=zoom_index)) if with_mean else None
        vs = np.asarray(store.read("var_sum", zoom_index=zoom_index), np.float32)
        unc = np.asarray(store.read("uncertainty", zoom_index=zoom_index), np.float32)
    else:
        mean = np.full((H, W, D), np.nan, np.float32)
        vs = np.full((H, W), np.nan, np.float32)
        unc = np.full((H, W), np.nan, np.float32)
        lonlat = _LonLat(store)
        for i, b in enumerate(blocks):
            ys, xs = b.slices
            z = store.read("z_img", ys, xs, slice(zoom_index, zoom_index + 1), where=f"block {b.index}")
            m, v, u = _fuse_from_z_img(model, z, metadata, *lonlat(b))
            mean[ys, xs], vs[ys, xs], unc[ys, xs] = m[0], v[0], u[0]
            if progress is not None:
                progress(i + 1, len(blocks))
    if nd.any():
        vs[nd], unc[nd] = np.nan, np.nan
        if mean is not None:
            mean[nd] = np.nan
    return ZoomArrays(zoom_index, mean, vs, unc)


def _load_zoom_grid(store: EmbeddingStore, zoom_index: int, model, metadata, progress, with_mean) -> ZoomArrays:
    """:func:`load_zoom` of a zoom on its own grid (factor > 1): cells in memory, uncertainty resampled."""
    from dataclasses import replace

    spec = store.spec
    g = store.zoom_group(zoom_index)
    h, w, D = g.height, g.width, spec.fc_dim
    ok = store.zoom_status(zoom_index) == DONE
    rows, cols, zs = slice(0, h), slice(0, w), slice(zoom_index, zoom_index + 1)
    if model is None:
        mean = np.asarray(store.read("mean", rows, cols, zoom_index)) if with_mean else None
        vs = np.asarray(store.read("var_sum", rows, cols, zoom_index), np.float32)
        unc = np.asarray(store.read("uncertainty", rows, cols, zoom_index), np.float32)
    else:
        mean = np.full((h, w, D), np.nan, np.float32)
        vs = np.full((h, w), np.nan, np.float32)
        unc = np.full((h, w), np.nan, np.float32)
        lonlat = _LonLat(store, zoom_index)
        done = store.done_mask(zoom_index)
        blocks = [replace(b, zooms=zs.indices(len(spec.zoom_levels))[:2])
                  for b in iter_blocks(h, w, spec.block_size) if done[b.index]]
        for i, b in enumerate(blocks):
            ys, xs = b.slices
            z = store.read("z_img", ys, xs, zs, where=f"block {b.index} of zoom {spec.zoom_levels[zoom_index]}")
            m, v, u = _fuse_from_z_img(model, z, metadata, *lonlat(b))
            mean[ys, xs], vs[ys, xs], unc[ys, xs] = m[0], v[0], u[0]
            if progress is not None:
                progress(i + 1, len(blocks))
    vs[~ok], unc[~ok] = np.nan, np.nan
    if mean is not None:
        mean[~ok] = np.nan
    shape = (spec.height, spec.width)
    return ZoomArrays(zoom_index, mean, vs, resample(unc, ok, g.factor, shape), factor=g.factor, ok=ok,
                      out_shape=shape)


def zoom_similarity(source: EmbeddingStore | ZoomArrays, qm: torch.Tensor, qvs: torch.Tensor | None,
                    zoom_index: int | None = None) -> np.ndarray:
    """Similarity ``[Q, H, W]`` (float32) of the queries ``(qm, qvs)`` (from :func:`prepare_query`)
    at one zoom: over :class:`ZoomArrays` held in memory, or streamed from the store in slabs
    (``zoom_index`` then says which zoom). The same arithmetic as :func:`query_store`."""
    qt = qm.T.contiguous().float()
    Q = qm.shape[0]

    def sim_of(mean: np.ndarray, vs: np.ndarray) -> np.ndarray:
        h, w, D = mean.shape
        m = torch.from_numpy(np.ascontiguousarray(mean)).reshape(-1, D)
        if m.dtype == torch.float16:  # as _query_slabs
            dot = _dot_f16(m, qt).numpy().reshape(h, w, Q)
            out = [2.0 * dot[..., q] - (2.0 + float(qvs[q])) - vs if qvs is not None else dot[..., q]
                   for q in range(Q)]
        else:  # fusion re-ran (float32 means), as query_block
            dot = (m.float() @ qt).numpy().reshape(h, w, Q)
            out = [csd_from_parts(dot[..., q], vs, float(qvs[q])) if qvs is not None else dot[..., q]
                   for q in range(Q)]
        return np.stack(out).astype(np.float32, copy=False)

    if isinstance(source, ZoomArrays):
        if source.mean is None:
            raise ValueError("these ZoomArrays do not hold the means: pass the store")
        if source.factor > 1:  # on the zoom's own grid: resample (linear in mean and var_sum)
            return resample(sim_of(source.mean, source.var_sum), source.ok, source.factor, source.out_shape)
        return sim_of(source.mean, source.var_sum)
    store, spec = source, source.spec
    g = store.zoom_group(zoom_index)
    if g.factor > 1:
        return query_zoom_grid(store, zoom_index, qm, qvs)[0]
    H, W, D, bs = spec.height, spec.width, spec.fc_dim, spec.block_size
    out = np.full((Q, H, W), np.nan, np.float32)
    done = store.done_mask()
    vs_all = np.asarray(store.read("var_sum", zoom_index=zoom_index), np.float32)
    step = max(1, SLAB_BYTES // (bs * bs * D * 2)) * bs
    for r, h, c, w in _slabs(H, W, bs, step, done):
        mean = store.read("mean", slice(r, r + h), slice(c, c + w), zoom_index)
        out[:, r:r + h, c:c + w] = sim_of(mean, vs_all[r:r + h, c:c + w])
    out[:, store.status()[zoom_index] != DONE] = np.nan
    return out
