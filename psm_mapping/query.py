"""Queries (text, audio, both) against an embedding store -> similarity and uncertainty maps.

``csd(pixel, q) = -(2 - 2 <mu_pixel, mu_q> + var_sum_pixel + var_sum_q)``: one matrix product over
the store plus two additions, block by block. A query with its own metadata (month, hour,
sources) re-runs only the fusion and heads from ``z_img``.
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
from .store import EmbeddingStore

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


def query_store(store: EmbeddingStore, queries: Sequence[Query], model: PSM | None = None,
                metadata=None, blocks: Sequence[Block] | None = None) -> QueryMaps:
    """Similarity maps of ``queries`` over every done block of ``store``.

    ``metadata`` (:class:`~psm_mapping.embed.MetadataOptions`): when it differs from what the
    store's ``mean`` was computed with, fusion and heads re-run from ``z_img`` (needs ``model``).
    """
    spec = store.spec
    if not queries:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    stored_md = store.attrs.get("metadata_options")
    rerun = metadata is not None and stored_md is not None and metadata.as_dict() != stored_md
    if rerun and model is None:
        raise StoreError("these metadata differ from the store's: pass --checkpoint so fusion can re-run")
    qm, qvs = _query_matrix(queries)
    probabilistic = qvs is not None and spec.probabilistic
    Z, H, W = len(spec.zoom_levels), spec.height, spec.width
    sims = [np.full((Z, H, W), np.nan, np.float32) for _ in queries]
    unc = np.full((Z, H, W), np.nan, np.float32)
    done = store.done_mask()
    lonlat = _LonLat(store) if rerun else None
    for b in (blocks if blocks is not None else store.iter_blocks()):
        if not done[b.row_off // spec.block_size, b.col_off // spec.block_size]:
            continue
        ys, xs = b.slices
        if rerun:
            d = store.read_block(b, ("z_img", "valid"))
            mean, vs, u = _refuse(model, d["z_img"], metadata, *lonlat(b))
            unc[:, ys, xs] = u
        else:
            d = store.read_block(b, ("mean", "var_sum", "uncertainty"))
            mean, vs = d["mean"], d["var_sum"]
            unc[:, ys, xs] = d["uncertainty"]
        m = torch.from_numpy(np.ascontiguousarray(mean)).float().reshape(-1, mean.shape[-1])
        dot = (m @ qm.T).reshape(Z, b.height, b.width, len(queries)).numpy()
        for q in range(len(queries)):
            if probabilistic:
                s = -(2.0 - 2.0 * dot[..., q] + vs + float(qvs[q]))
            else:
                s = dot[..., q]
            sims[q][:, ys, xs] = s
    return QueryMaps(tuple(spec.zoom_levels), list(queries), sims, unc)


class _LonLat:
    def __init__(self, store: EmbeddingStore):
        from pyproj import CRS, Transformer

        self.t = Transformer.from_crs(CRS.from_wkt(store.spec.crs_wkt), "EPSG:4326", always_xy=True)
        self.x = np.asarray(store.group["x"][:])
        self.y = np.asarray(store.group["y"][:])

    def __call__(self, b: Block):
        xx, yy = np.meshgrid(self.x[b.col_off:b.col_off + b.width], self.y[b.row_off:b.row_off + b.height])
        lon, lat = self.t.transform(xx, yy)
        return ((np.asarray(lon) + 180.0) % 360.0) - 180.0, np.asarray(lat)


def _refuse(model: PSM, z_img: np.ndarray, metadata, lon: np.ndarray, lat: np.ndarray):
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
