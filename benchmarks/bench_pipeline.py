"""The input side alone: chips/s delivered to a null model (zeros of the right shape), per stage, in
one run, for a local COG and for XYZ tiles served on 127.0.0.1.

Configurations, each with a fresh source and tile cache (a warm-up run first fills GDAL's cache):
* baseline:  the single prefetch thread of earlier versions (``--readers 0``: one thread reads the
             next block, chips are cut in the model's thread)
* readers=N: N reader threads read, decode, warp and cut into bounded queues (psm_mapping.pipeline)
* procs=2:   two reader *processes* (read/decode/warp there, windows pickled back, cut in the model's
             thread): the alternative the threads are measured against

Stages: fetch (HTTP), decode (PNG/JPEG), warp (to the lattice) come from the XYZ source's counters;
a local COG's read is GDAL decode+resample in one call ("read"); cut = chips sliced from windows;
copy = uint8 -> normalised float tensor on the device (CPU here). Stage seconds are summed over the
threads that ran them, so with 2 readers they can exceed the wall time.

Run: python benchmarks/bench_pipeline.py [--size 2600] [--block-size 16] [--zooms 1]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_tiler import cut_tiles, make_region, make_scene  # noqa: E402
from psm_mapping import constants  # noqa: E402
from psm_mapping.embed import cut_batches, read_block  # noqa: E402
from psm_mapping.grid import make_grid  # noqa: E402
from psm_mapping.pipeline import PipelineStats, stream_units  # noqa: E402
from psm_mapping.tiling import ChipReader, normalize_chips  # noqa: E402


@dataclass
class Result:
    name: str
    chips: int
    wall: float
    read: float = 0.0
    cut: float = 0.0
    copy: float = 0.0
    wait: float = 0.0
    fetch: float = 0.0
    decode: float = 0.0
    warp: float = 0.0
    depth: float = 0.0
    load: float = 0.0

    @property
    def rate(self) -> float:
        return self.chips / self.wall


class NullModel:
    """Copies each batch to the device as the embedder does (uint8 -> normalised float32), returns zeros."""

    def __init__(self, device="cpu"):
        self.device, self.copy_s, self.chips = torch.device(device), 0.0, 0

    def __call__(self, batch):
        t0 = time.perf_counter()
        x = normalize_chips(torch.from_numpy(batch.chips), device=self.device)
        self.copy_s += time.perf_counter() - t0
        self.chips += len(batch)
        return torch.zeros((x.shape[0], 512))


def open_src(kind: str, spec: str):
    from psm_mapping.imagery import open_source

    if kind == "xyz":
        from psm_mapping.imagery.xyz import XYZSource

        return XYZSource(spec, max_zoom=14, min_zoom=10, name="bench-xyz", memory_cache_tiles=4096)
    return open_source(spec)


def units_of(grid, block_size):
    return list(grid.blocks(block_size))


def run_threads(kind, spec, grid, zooms, block_size, batch_size, readers) -> Result:
    src = open_src(kind, spec)
    reader = ChipReader(src, grid.crs, grid.sat_type)
    model = NullModel()
    todo = iter(units_of(grid, block_size))
    cut_s = [0.0]

    def read(b):
        return read_block(b, grid=grid, source=reader, zoom_levels=zooms)

    def cut(b, windows):
        return cut_batches(b, windows, batch_size)

    t0 = time.perf_counter()
    st = PipelineStats()
    if readers == 0:  # the former loop: one prefetch thread, chips cut here
        for u in stream_units(lambda: next(todo, None), read, None, 1, stats=st):
            t1 = time.perf_counter()
            batches = list(cut_batches(u.item, u.result, batch_size))  # (lazily in the old loop: same work)
            cut_s[0] += time.perf_counter() - t1
            for _, b in batches:
                model(b)
        cut_total = cut_s[0]
    else:
        for u in stream_units(lambda: next(todo, None), read, cut, readers, depth=4, stats=st):
            for _, b in u.iter_batches():
                model(b)
            st.wait_s += u.wait_s
        cut_total = st.cut_s
    wall = time.perf_counter() - t0
    r = Result(f"readers={readers}" if readers else "baseline (1 prefetch thread)", model.chips, wall,
               read=st.read_s, cut=cut_total, copy=model.copy_s, wait=st.wait_s, depth=st.mean_depth(),
               load=os.getloadavg()[0])
    s = getattr(src, "stats", None)
    if s is not None:
        r.fetch, r.decode, r.warp = s.fetch_seconds, s.decode_seconds, s.warp_seconds
    src.close()
    return r


# -- reader processes ----------------------------------------------------------------------------
_P: dict = {}


def _proc_init(kind, spec, crs_wkt, sat_type):
    from pyproj import CRS as _CRS

    torch.set_num_threads(1)
    _P["src"] = open_src(kind, spec)
    _P["reader"] = ChipReader(_P["src"], _CRS.from_wkt(crs_wkt), sat_type)


def _proc_read(grid, b, zooms):
    t0 = time.perf_counter()
    w = read_block(b, grid=grid, source=_P["reader"], zoom_levels=zooms)
    return w, time.perf_counter() - t0


def run_procs(kind, spec, grid, zooms, block_size, batch_size, n=2) -> Result:
    model = NullModel()
    blocks = units_of(grid, block_size)
    with ProcessPoolExecutor(n, initializer=_proc_init, initargs=(kind, spec, grid.crs.to_wkt(), grid.sat_type)) as pool:
        pool.submit(int, 0).result()  # processes up before the clock starts
        t0 = time.perf_counter()
        futs = [pool.submit(_proc_read, grid, b, zooms) for b in blocks[:n + 1]]
        nxt, read_s, cut_s, wait_s = n + 1, 0.0, 0.0, 0.0
        for i, b in enumerate(blocks):
            tw = time.perf_counter()
            windows, dt = futs[i].result()
            wait_s += time.perf_counter() - tw
            read_s += dt
            if nxt < len(blocks):
                futs.append(pool.submit(_proc_read, grid, blocks[nxt], zooms))
                nxt += 1
            t1 = time.perf_counter()
            batches = list(cut_batches(b, windows, batch_size))
            cut_s += time.perf_counter() - t1
            for _, bt in batches:
                model(bt)
        wall = time.perf_counter() - t0
    return Result(f"procs={n}", model.chips, wall, read=read_s, cut=cut_s, copy=model.copy_s, wait=wait_s,
                  load=os.getloadavg()[0])


def table(title: str, rows: list[Result], xyz: bool) -> None:
    base = rows[0].rate
    print(f"\n{title}")
    stages = ["fetch", "decode", "warp"] if xyz else ["read"]
    head = ["config", "chips", "wall s", "chips/s", "vs baseline", *stages, "cut", "copy", "model waits", "queue", "load avg"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        st = [f"{getattr(r, s):.2f}" for s in stages]
        print(f"| {r.name} | {r.chips} | {r.wall:.2f} | {r.rate:.0f} | {r.rate / base:.2f}x | " + " | ".join(st)
              + f" | {r.cut:.2f} | {r.copy:.2f} | {r.wait:.2f} | {r.depth:.1f} | {r.load:.1f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2600, help="scene side in 10 m pixels")
    ap.add_argument("--zooms", default="1")
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (the copy stage)")
    ap.add_argument("--no-procs", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a 400 px scene, no process pool (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.size, a.no_procs = 400, True
    torch.set_num_threads(a.threads)
    zooms = tuple(int(z) for z in a.zooms.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        path = make_scene(Path(tmp), a.size)
        margin = constants.footprint_m("sentinel", max(zooms)) / 2 + 200
        grid = make_grid(make_region(a.size, margin), zoom_levels=zooms)
        print(f"scene {a.size} px at 10 m; grid {grid.shape} at {grid.stride:g} m, zooms {zooms}, "
              f"blocks of {a.block_size} px: {grid.n_blocks(a.block_size)} blocks, "
              f"{grid.pixel_count * len(zooms)} chips")
        configs = [0, 1, 2]
        run_threads("local", str(path), grid, zooms, a.block_size, a.batch_size, 1)  # warm GDAL's cache
        rows = [run_threads("local", str(path), grid, zooms, a.block_size, a.batch_size, n) for n in configs]
        if not a.no_procs:
            rows.append(run_procs("local", str(path), grid, zooms, a.block_size, a.batch_size))
        table("local COG (deflate, overviews)", rows, xyz=False)

        from servers import TileServer

        t0 = time.perf_counter()
        tiles = cut_tiles(path, range(10, 15))
        print(f"\nxyz: {len(tiles)} tiles cut in {time.perf_counter() - t0:.1f} s, served from memory on 127.0.0.1")
        with TileServer(lambda z, x, y: tiles.get(f"/{z}/{x}/{y}")) as srv:
            url = srv.template()
            rows = [run_threads("xyz", url, grid, zooms, a.block_size, a.batch_size, n) for n in configs]
            if not a.no_procs:
                rows.append(run_procs("xyz", url, grid, zooms, a.block_size, a.batch_size))
        table("XYZ tiles on 127.0.0.1 (JPEG/PNG 256 px, Web Mercator -> UTM lattice)", rows, xyz=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
