"""How long ``psm-map query STORE --query TEXT --out q.tif`` takes on a small store, against
``python -c "import torch"`` in the same run (new processes, medians of 3).

The store is synthetic (random unit ``mean`` vectors, float16, 512-d; ``var_sum``,
``uncertainty``; every pixel done), written with :class:`psm_mapping.store.EmbeddingStore`; it
records a tiny official-format checkpoint (its sha256 and path), a tokenizer and the CLAP config,
so the command needs nothing else, as for a store a map run wrote.

* import torch: ``python -c "import torch"``
* query, text not cached: the store's ``text_cache/`` emptied before each run (checkpoint, text
  tower, tokenizer, embedding, similarity, COG)
* query, text cached: the same text again (no text tower is built)

Goal: the cached query <= 1.6 x import torch. ``--smoke``: a 32 x 32 store, one run each.

Run: python benchmarks/bench_query_latency.py [--side 256] [--repeats 3] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

D = 512
GOAL = 1.6


def build_store(folder: Path, side: int, block: int = 64) -> Path:
    from affine import Affine
    from pyproj import CRS

    from psm_mapping.model.checkpoint import file_sha256
    from psm_mapping.model.factory import TINY_CLAP, make_checkpoint, make_tokenizer, tiny_clap_config
    from psm_mapping.store import DONE, EmbeddingStore, StoreSpec

    ckpt = make_checkpoint(folder / "psm_tiny.ckpt", sat_type="sentinel",
                           metadata_type="latlong_month_time_asource_tsource", embed_dim=64,
                           clap_config=tiny_clap_config())
    tok = make_tokenizer(folder / "tok")
    spec = StoreSpec(crs_wkt=CRS.from_epsg(32633).to_wkt(),
                     transform=tuple(Affine(40.0, 0, 500_000.0, 0, -40.0, 5_600_000.0))[:6],
                     width=side, height=side, stride=40.0, block_size=block, zoom_levels=(1,),
                     sat_type="sentinel", checkpoint_sha256=file_sha256(ckpt), imagery="synthetic",
                     min_valid=0.5, fc_dim=D, probabilistic=True)
    path = folder / "store.zarr"
    store = EmbeddingStore.open_or_create(
        str(path), spec, attrs={"metadata_options": None, "provenance": {"imagery": "synthetic"},
                                "checkpoint_path": str(ckpt), "tokenizer": str(tok), "clap_config": TINY_CLAP})
    g = store.group
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1, side, side, D), dtype=np.float32)
    m /= np.linalg.norm(m, axis=-1, keepdims=True)
    g["mean"][:] = m.astype(np.float16)
    g["z_img"][:] = m.astype(np.float16)  # a real store holds z_img wherever it holds a mean
    vs = rng.uniform(15, 25, (1, side, side)).astype(np.float32)
    g["var_sum"][:] = vs
    g["uncertainty"][:] = np.sqrt(vs) * 15
    g["valid"][:] = 1.0
    g["status"][:] = DONE
    return path


def timed(cmd: list[str], env: dict, cwd: Path) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-2000:]}")
    return dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=256, help="store pixels per side (default 256)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="a 32 x 32 store, one run each (the suite runs it)")
    a = ap.parse_args(argv)
    side, reps = (32, 1) if a.smoke else (a.side, a.repeats)
    tmp = Path(tempfile.mkdtemp(prefix="psm-bench-qlat-"))
    try:
        store = build_store(tmp, side)
        env = {k: v for k, v in os.environ.items() if k != "PSM_CHECKPOINT"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        py = sys.executable
        query = [py, "-m", "psm_mapping.cli", "query", str(store), "--query", "birds chirping",
                 "--out", "q.tif", "--overwrite", "--quiet"]
        cache = store / "text_cache"
        t_torch, t_cold, t_warm = [], [], []
        if not a.smoke:
            timed(query, env, tmp)  # the first run fills OS caches (all rows then measure the same way)
        for _ in range(reps):  # interleaved: a busy machine slows all three alike
            t_torch.append(timed([py, "-c", "import torch"], env, tmp))
            shutil.rmtree(cache, ignore_errors=True)
            t_cold.append(timed(query, env, tmp))
            t_warm.append(timed(query, env, tmp))
        if not any(cache.glob("*.npy")):
            raise SystemExit("the query wrote no text cache entry")
        base = statistics.median(t_torch)
        rows = [("import torch", t_torch), ("query, text not cached", t_cold), ("query, text cached", t_warm)]
        print(f"psm-map query on a {side} x {side} store (1 zoom), medians of {reps}:")
        for name, ts in rows:
            med = statistics.median(ts)
            print(f"  {name:<24} {med:6.2f} s   {med / base:5.2f} x import torch   "
                  f"(runs: {', '.join(f'{t:.2f}' for t in ts)})")
        ratio = statistics.median(t_warm) / base
        print(f"goal: cached query <= {GOAL} x import torch: {'met' if ratio <= GOAL else 'MISSED'} ({ratio:.2f})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
