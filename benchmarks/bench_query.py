"""One text query over an embedding store of 1M pixels: ``query.query_store`` against a float64
NumPy evaluation of the csd formula on the same store, in the same run.

The store is synthetic, written with :class:`psm_mapping.store.EmbeddingStore`: 1000 x 1000 px,
one zoom level, random unit ``mean`` vectors (float16, 512-d), ``var_sum`` and ``uncertainty``
(float32), every block done (``z_img`` left unwritten: a plain query does not read it).

* query_store: the library call the CLI makes (reads the store block by block, float16 ->
  float32, one matrix product, two additions)
* NumPy float64: the same arrays read from the same store, ``-(2 - 2 mu.q + vs + vs_q)`` in float64

Goals: query_store <= 2 s; >= 10x the NumPy float64 evaluation.

Run: python benchmarks/bench_query.py [--side 1000] [--block-size 64] [--repeats 3]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from affine import Affine  # noqa: E402
from pyproj import CRS  # noqa: E402

from psm_mapping.model.heads import ProbEmbedding  # noqa: E402
from psm_mapping.query import Query, query_store  # noqa: E402
from psm_mapping.store import DONE, EmbeddingStore, StoreSpec  # noqa: E402

D = 512


def build_store(path: Path, side: int, block: int, seed: int = 0) -> EmbeddingStore:
    spec = StoreSpec(crs_wkt=CRS.from_epsg(32633).to_wkt(),
                     transform=tuple(Affine(40.0, 0, 500_000.0, 0, -40.0, 5_600_000.0))[:6],
                     width=side, height=side, stride=40.0, block_size=block, zoom_levels=(1,),
                     sat_type="sentinel", checkpoint_sha256="0" * 64, imagery="synthetic", min_valid=0.5,
                     fc_dim=D, probabilistic=True)
    store = EmbeddingStore.open_or_create(str(path), spec, attrs={"metadata_options": None})
    g = store.group
    rng = np.random.default_rng(seed)
    for r in range(0, side, block):  # one band of blocks at a time: whole chunks per write
        h = min(block, side - r)
        m = rng.standard_normal((1, h, side, D), dtype=np.float32)
        m /= np.linalg.norm(m, axis=-1, keepdims=True)
        g["mean"][:, r:r + h] = m.astype(np.float16)
        g["z_img"][:, r:r + h] = m.astype(np.float16)  # a real store holds z_img wherever it holds a mean
        vs = rng.uniform(15, 25, (1, h, side)).astype(np.float32)
        g["var_sum"][:, r:r + h] = vs
        g["uncertainty"][:, r:r + h] = np.sqrt(vs) * 15
        g["valid"][:, r:r + h] = 1.0
    g["status"][:] = DONE
    return store


def numpy_float64(store: EmbeddingStore, q_mean: np.ndarray, q_vs: float) -> np.ndarray:
    """The csd formula in float64 NumPy over the same store, a band of blocks at a time."""
    s = store.spec
    g = store.group
    out = np.full((1, s.height, s.width), np.nan, np.float32)
    q = q_mean.astype(np.float64)
    for r in range(0, s.height, s.block_size):
        mean = np.asarray(g["mean"][:, r:r + s.block_size]).astype(np.float64)
        vs = np.asarray(g["var_sum"][:, r:r + s.block_size]).astype(np.float64)
        out[:, r:r + s.block_size] = -(2.0 - 2.0 * (mean @ q) + vs + q_vs)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=1000)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", help="build (or reuse) the store in this folder instead of a temporary one")
    ap.add_argument("--smoke", action="store_true", help="a 64 px store, one repeat (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.side, a.block_size, a.repeats = 64, 32, 1
    torch.set_num_threads(a.threads)
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="psm-bench-query-"))
    try:
        path = tmp / f"store-{a.side}-{a.block_size}.zarr"
        t0 = time.perf_counter()
        if path.exists():
            store = EmbeddingStore.open(str(path))
        else:
            store = build_store(path, a.side, a.block_size)
        t_build = time.perf_counter() - t0
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        rng = np.random.default_rng(1)
        raw = torch.from_numpy(rng.standard_normal((1, D)).astype(np.float32))
        emb = ProbEmbedding.from_heads(raw, torch.full((1, D), -4.0))
        q = Query("birds", "text", emb)

        lib = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            maps = query_store(store, [q])
            lib.append(time.perf_counter() - t0)
        ref = []
        for _ in range(max(1, a.repeats - 1)):
            t0 = time.perf_counter()
            want = numpy_float64(store, emb.mean[0].numpy(), float(emb.var_sum()[0]))
            ref.append(time.perf_counter() - t0)
        # the arithmetic alone, on the same slabs held in memory (no store reads in either)
        from psm_mapping.engine import QueryMatrix, similarity

        bs = a.block_size
        slabs = [(np.asarray(store.group["mean"][:, r:r + bs]), np.asarray(store.group["var_sum"][:, r:r + bs]))
                 for r in range(0, a.side, bs)]
        qvs = float(emb.var_sum()[0])
        q64 = emb.mean[0].double().numpy()
        qmat = QueryMatrix(emb.mean.float(), emb.var_sum())
        t0 = time.perf_counter()
        for m, vs in slabs:  # the engine's kernel
            _ = similarity(m, vs, qmat)
        c_lib = time.perf_counter() - t0
        t0 = time.perf_counter()
        for m, vs in slabs:
            _ = -(2.0 - 2.0 * (m.astype(np.float64) @ q64) + vs.astype(np.float64) + qvs)
        c_ref = time.perf_counter() - t0
        del slabs
        err = float(np.nanmax(np.abs(maps.similarity[0] - want)))
        tl, tr = min(lib), min(ref)
        px = a.side * a.side
        print(f"command: python benchmarks/bench_query.py --side {a.side} --block-size {a.block_size} "
              f"--repeats {a.repeats} --threads {a.threads}")
        print(f"store: {px:,} px x 1 zoom, {D}-d float16 means, blocks {a.block_size} px, "
              f"{size / 1e6:.0f} MB on disk (built in {t_build:.1f} s); torch threads {torch.get_num_threads()}")
        print(f"query_store   : {tl:6.2f} s  ({px / tl / 1e6:5.2f} Mpx/s)   runs: "
              + ", ".join(f"{x:.2f}" for x in lib))
        print(f"NumPy float64 : {tr:6.2f} s  ({px / tr / 1e6:5.2f} Mpx/s)   runs: "
              + ", ".join(f"{x:.2f}" for x in ref))
        print(f"arithmetic (same slabs in memory): float16->float32 + product {c_lib:.2f} s, "
              f"NumPy float64 {c_ref:.2f} s: {c_ref / c_lib:.1f}x (goal >= 10x)")
        print(f"end to end, both reading the {size / 1e9:.1f} GB store: {tr / tl:.1f}x (bound by the "
              f"store read, which both pay); time {tl:.2f} s (goal <= 2 s); max |difference| {err:.2e}")
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
