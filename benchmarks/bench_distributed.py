"""Dask scale-out: the block phase (read imagery, cut chips, embed, write the store) on a
LocalCluster of 2 single-threaded worker processes against 1, same region, same run.

* checkpoint: embed_dim 256, depth 4 (compute dominates a block), zoom 1, sentinel chips
* region: 24 x 24 px at stride 40 m in blocks of 4 x 4 px (36 blocks, 16 chips each)
* each configuration: a fresh cluster, models loaded on every worker before timing, a fresh store
* scheduler overhead per block: (wall x workers - sum of task times) / blocks, and the
  round trip of 200 empty tasks

Run: python benchmarks/bench_distributed.py [--repeats 2] [--blocks-side 6]
Goal: 2 workers >= 1.6x 1 worker (both one thread, torch threads 1) on this 2-core machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from servers import write_scene  # noqa: E402

from psm_mapping.distributed import BlockJob, compute_store_distributed, connect  # noqa: E402
from psm_mapping.embed import MetadataOptions  # noqa: E402
from psm_mapping.grid import make_grid  # noqa: E402
from psm_mapping.model.checkpoint import file_sha256  # noqa: E402
from psm_mapping.model.factory import make_checkpoint  # noqa: E402
from psm_mapping.region import load_region  # noqa: E402
from psm_mapping.store import EmbeddingStore, StoreSpec  # noqa: E402

UTM = "EPSG:32632"
LEFT, TOP, RES, SIZE = 498000.0, 4986000.0, 10.0, 400
STRIDE, BLOCK = 40.0, 4


def _warm(job: BlockJob) -> int:
    """On a worker: load the model and open the source into the process cache."""
    from psm_mapping.distributed import _CACHE

    _CACHE.model(job)
    _CACHE.source(job.imagery, job.imagery_options)
    return os.getpid()


def _noop(i: int) -> int:
    return i


def setup(folder: Path, side_blocks: int, embed_dim: int = 256, depth: int = 4):
    from pyproj import Transformer

    scene = folder / "scene.tif"
    write_scene(scene, UTM, LEFT, TOP, RES, SIZE, SIZE, seed=4)
    ckpt = make_checkpoint(folder / "bench.ckpt", embed_dim=embed_dim, depth=depth)
    half = side_blocks * BLOCK * STRIDE / 2 - 0.01
    cx, cy = LEFT + SIZE * RES / 2, TOP - SIZE * RES / 2
    tr = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    w, s = tr.transform(cx - half, cy - half)
    e, n = tr.transform(cx + half, cy + half)
    region = load_region(None, bbox=(w, s, e, n))
    grid = make_grid(region, stride=STRIDE, crs=UTM, sat_type="sentinel", zoom_levels=(1,))
    return scene, ckpt, grid


def one_config(workers: int, torch_threads: int, scene, ckpt, grid, folder: Path, tag: str,
               empty_tasks: int = 200) -> dict:
    sha = file_sha256(ckpt)
    spec = StoreSpec.for_grid(grid, block_size=BLOCK, zoom_levels=(1,), checkpoint_sha256=sha,
                              imagery=str(scene), min_valid=0.5, fc_dim=512, probabilistic=True)
    md = MetadataOptions()
    url = str(folder / f"store-{tag}.zarr")
    store = EmbeddingStore.open_or_create(url, spec, attrs={"metadata_options": md.as_dict()})
    job = BlockJob(url, {}, str(ckpt), sha, None, "cpu", "float32", str(scene), {}, md.as_dict(), (1,),
                   batch_size=16)
    with connect(workers=workers, log_fn=lambda *a: None, torch_threads=torch_threads) as client:
        client.run(_warm, job)
        t0 = time.perf_counter()
        futs = client.map(_noop, range(empty_tasks), pure=False)
        client.gather(futs)
        empty_s = (time.perf_counter() - t0) / empty_tasks
        del futs
        t0 = time.perf_counter()
        stats = compute_store_distributed(client, store, grid, job, BLOCK, retries=0, progress=False)
        wall = time.perf_counter() - t0
    blocks = len(stats)
    task_s = sum(s.seconds for s in stats)
    chips = sum(s.chips for s in stats)
    return {"workers": workers, "torch_threads": torch_threads, "blocks": blocks, "chips": chips,
            "wall_s": wall, "task_s": task_s, "chips_per_s": chips / wall,
            "overhead_per_block_s": (wall * workers - task_s) / blocks, "empty_task_s": empty_s,
            "model_s_per_chip": sum(s.model_s for s in stats) / chips,
            "cpu_s": sum(s.cpu_s for s in stats), "cpu_share": sum(s.cpu_s for s in stats) / (wall * workers),
            "read_s_per_block": sum(s.read_s for s in stats) / blocks}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--blocks-side", type=int, default=6, help="region side in blocks (6: 36 blocks)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--smoke", action="store_true", help="the 2-worker cluster alone, 1 block, a 64-d 1-layer ViT")
    a = ap.parse_args(argv)
    if a.smoke:
        a.repeats, a.blocks_side = 1, 1
    print(f"load average before: {os.getloadavg()}; cores: {os.cpu_count()}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        scene, ckpt, grid = setup(folder, a.blocks_side, *((64, 1) if a.smoke else (256, 4)))
        rows = []
        for r in range(a.repeats):
            # smoke: the 2-worker cluster alone (every code path; no speed-up to report)
            for workers, tt in ((2, 1),) if a.smoke else ((1, 1), (2, 1)):
                row = one_config(workers, tt, scene, ckpt, grid, folder, f"{r}-{workers}-{tt}",
                                 empty_tasks=20 if a.smoke else 200)
                row["repeat"] = r
                rows.append(row)
                print(f"[{r}] {workers} worker(s) x torch threads {tt}: {row['blocks']} blocks, "
                      f"{row['chips']} chips in {row['wall_s']:.2f} s = {row['chips_per_s']:.1f} chips/s; "
                      f"model {1000 * row['model_s_per_chip']:.1f} ms/chip; read {row['read_s_per_block']:.3f} "
                      f"s/block; overhead {1000 * row['overhead_per_block_s']:.0f} ms/block; "
                      f"empty task {1000 * row['empty_task_s']:.1f} ms; CPU share per worker "
                      f"{row['cpu_share']:.2f}", flush=True)
        extra = None if a.smoke else one_config(1, 2, scene, ckpt, grid, folder, "extra")
        if extra is not None:
            print(f"[ref] 1 worker x torch threads 2: {extra['chips_per_s']:.1f} chips/s")
    if a.smoke:
        print(f"smoke: 2 workers computed {rows[0]['blocks']} blocks in {rows[0]['wall_s']:.2f} s")
        return
    ratios = []
    for r in range(a.repeats):
        one = next(x for x in rows if x["repeat"] == r and x["workers"] == 1)
        two = next(x for x in rows if x["repeat"] == r and x["workers"] == 2)
        ratios.append(one["wall_s"] / two["wall_s"])
    best = max(ratios)
    print("speed-up 2 workers / 1 worker: " + ", ".join(f"{x:.2f}x" for x in ratios)
          + f" (median {statistics.median(ratios):.2f}x, best {best:.2f}x; goal >= 1.6x)")
    ov = [x["overhead_per_block_s"] for x in rows if x["workers"] == 2]
    em = [x["empty_task_s"] for x in rows]
    print(f"scheduler overhead per block (2 workers): median {1000 * statistics.median(ov):.0f} ms; "
          f"empty-task round trip: median {1000 * statistics.median(em):.1f} ms")
    cpu = [next(x for x in rows if x["repeat"] == r and x["workers"] == 1)["cpu_s"]
           / next(x for x in rows if x["repeat"] == r and x["workers"] == 2)["cpu_s"] for r in range(a.repeats)]
    print("CPU seconds 1 worker / 2 workers (work done is the same; < 1 means the busy machine slowed "
          "both): " + ", ".join(f"{x:.2f}" for x in cpu))
    print(f"load average after: {os.getloadavg()}")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "extra": extra, "ratios": ratios}, indent=1))


if __name__ == "__main__":
    main()
