"""Synthetic embedding stores written through the store API (no model): random unit means."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from affine import Affine
from pyproj import CRS

from psm_mapping.grid import Block
from psm_mapping.store import DONE, FAULT, PENDING, BlockEmbeddings, EmbeddingStore, StoreSpec


def synthetic_store(path: Path, height: int, width: int, *, block: int = 8, zooms=(1, 3), dim: int = 16,
                    factors=None, seed: int = 0, holes: bool = True, probabilistic: bool = True,
                    sha: str = "0" * 64, stride: float = 100.0) -> EmbeddingStore:
    """A store of ``height`` x ``width`` pixels with random unit float16 means, ``var_sum`` in
    [15, 25], some PENDING and FAULT pixels and some DONE pixels without an embedding (``holes``)."""
    spec = StoreSpec(crs_wkt=CRS.from_epsg(32633).to_wkt(),
                     transform=tuple(Affine(stride, 0, 500_000.0, 0, -stride, 5_600_000.0))[:6], width=width,
                     height=height, stride=stride, block_size=block, zoom_levels=tuple(zooms), sat_type="sentinel",
                     checkpoint_sha256=sha, imagery="synthetic", min_valid=0.5, fc_dim=dim,
                     probabilistic=probabilistic, zoom_factors=tuple(factors or (1,) * len(zooms)))
    store = EmbeddingStore.open_or_create(str(path), spec, attrs={"metadata_options": None})
    rng = np.random.default_rng(seed)
    for b in store.iter_blocks():
        nz = len(range(len(zooms))[b.zoom_slice])
        shp = (nz, b.height, b.width)
        z = rng.standard_normal(shp + (dim,)).astype(np.float32)
        m = z / np.linalg.norm(z, axis=-1, keepdims=True)
        vs = rng.uniform(15, 25, shp).astype(np.float32) if probabilistic else np.full(shp, np.nan, np.float32)
        st = np.full(shp, DONE, np.uint8)
        if holes:
            u = rng.random(shp)
            st[u < 0.1] = PENDING
            st[(u >= 0.1) & (u < 0.15)] = FAULT
            nan = (u >= 0.15) & (u < 0.2)  # DONE, too little imagery: no embedding
            m[nan], vs[nan], z[nan] = np.nan, np.nan, np.nan
            m[st != DONE], vs[st != DONE], z[st != DONE] = np.nan, np.nan, np.nan
        store.write_block(BlockEmbeddings(block=b, z_img=z.astype(np.float16), mean=m.astype(np.float16),
                                          var_sum=vs, uncertainty=np.sqrt(np.abs(vs)), valid=np.ones(shp, np.float32),
                                          status=st))
    return store
