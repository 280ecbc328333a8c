"""The explorer's speed against the store's size: ``psm-map serve`` as a real uvicorn subprocess
over synthetic stores of growing size (``--sides 500,2000``: 0.25M and 4M pixels, one zoom
level), written with :class:`psm_mapping.store.EmbeddingStore` (smooth random unit ``mean``
vectors, float16, 512-d; ``var_sum``, ``uncertainty``; every pixel DONE), with a tiny checkpoint
(the store records its sha256) and tokenizer.

Measured over HTTP on 127.0.0.1, per store size, in one run:

* new text query -> its first tile (queries never asked before) at web zoom 8 (the tile at the
  store's centre: one tile covers the whole store; the same view for every query, as a user
  typing sound after sound: the first run reads the store's cells, later ones find them cached)
  and at web zoom 14 (each query at a new place inside the store: its cells read every time):
  p50, p95, every run, and the part spent embedding the text (the server's ``Server-Timing``);
  and the large / small ratio of those p50s
* a cached tile (the same tile URL again): p50; a tile of an already computed query not rendered
  before (web zooms 10..15): p50
* point values: p50
* the server's RSS: peak (sampled every 50 ms) and at the end

Goals (issue 20, this 2-core CPU, ``--memory-limit 1.5``): first tile <= 0.3 s at both zooms
and sizes; large / small ratio <= 1.5; cached tile <= 20 ms; RSS <= 1.5 GB.

Run: python benchmarks/bench_serve.py [--sides 500,2000] [--memory-limit 1.5] [--keep DIR] [--smoke]
(``--keep DIR`` builds the stores once and reuses them; ``--smoke``: a 64 px store, a few requests.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from affine import Affine  # noqa: E402
from pyproj import CRS, Transformer  # noqa: E402

from psm_mapping.levels import build_levels, has_levels  # noqa: E402
from psm_mapping.store import DONE, EmbeddingStore, StoreSpec  # noqa: E402

D = 512
PX = 40.0
EPSG = 32633
WORDS = ["birds chirping", "heavy rain", "traffic on a highway", "waves on the shore", "church bells",
         "wind in trees", "children playing", "a dog barking", "frogs at night", "a busy market",
         "a quiet library", "thunder", "a tractor", "cows mooing", "a waterfall", "sirens", "a train",
         "crickets", "a crowd cheering", "bells of goats"]


def origin(side: int) -> tuple[float, float]:
    """The store's top-left corner (UTM 33N, metres): the store centred in the web zoom 8 tile
    around 15 E 50.5 N, so that one zoom 8 tile covers it (up to ~2400 px at 40 m)."""
    import morecantile

    tms = morecantile.tms.get("WebMercatorQuad")
    b = tms.bounds(tms.tile(15.0, 50.5, 8))
    tr = Transformer.from_crs("EPSG:4326", f"EPSG:{EPSG}", always_xy=True)
    cx, cy = tr.transform((b.left + b.right) / 2, (b.bottom + b.top) / 2)
    half = side * PX / 2
    return round((cx - half) / PX) * PX, round((cy + half) / PX) * PX


def build_store(path: Path, side: int, block: int, ckpt_sha: str, zooms=(1,)) -> EmbeddingStore:
    left, top = origin(side)
    spec = StoreSpec(crs_wkt=CRS.from_epsg(EPSG).to_wkt(),
                     transform=tuple(Affine(PX, 0, left, 0, -PX, top))[:6], width=side, height=side,
                     stride=PX, block_size=block, zoom_levels=tuple(zooms), sat_type="sentinel",
                     checkpoint_sha256=ckpt_sha, imagery="synthetic", min_valid=0.5, fc_dim=D,
                     probabilistic=True)
    store = EmbeddingStore.open_or_create(str(path), spec, attrs={"metadata_options": None,
                                                                  "provenance": {"imagery": "synthetic"}})
    g = store.group
    Z = len(zooms)
    rng = np.random.default_rng(0)
    # noise rows drawn from a pool (drawing 512 normals per pixel dominates the build otherwise)
    pool = rng.standard_normal((8192, D), dtype=np.float32) * 0.3
    xx = np.arange(side) / side
    for r in range(0, side, block):  # one band of blocks at a time: whole chunks per write
        h = min(block, side - r)
        yy = (np.arange(r, r + h) / side)[:, None]
        m = pool[rng.integers(0, len(pool), (Z, h, side))]
        # smooth structure + noise, so tiles look like maps (and PNGs compress like maps)
        for k in range(8):
            m[..., k] += 3 * np.sin(6 * xx[None, :] + k) * np.cos(5 * yy - k)
        m /= np.linalg.norm(m, axis=-1, keepdims=True)
        g["mean"][:, r:r + h] = m.astype(np.float16)
        g["z_img"][:, r:r + h] = m.astype(np.float16)  # a real store holds z_img wherever it holds a mean
        vs = rng.uniform(15, 25, (Z, h, side)).astype(np.float32)
        g["var_sum"][:, r:r + h] = vs
        g["uncertainty"][:, r:r + h] = np.sqrt(vs) * 15
        g["valid"][:, r:r + h] = 1.0
        g["status"][:, r:r + h] = np.full((Z, h, side), DONE, np.uint8)
    build_levels(store)  # the overviews a run writes with each block
    return store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if len(xs) else float("nan")


class RssPeak:
    """The peak RSS of a process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        import psutil

        self.proc, self.peak, self.interval = psutil.Process(pid), 0, interval
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except Exception:
                return
            time.sleep(self.interval)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def stop(self) -> int:
        self._stop.set()
        self._t.join(2)
        return self.peak


def measure(path: Path, side: int, common: list[str], a, tmp: Path) -> dict:
    """Start ``psm-map serve`` on ``path``; time its answers; stop it."""
    import httpx
    import morecantile

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2"}
    port = free_port()
    log_path = tmp / f"serve-{side}.log"
    log = open(log_path, "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "psm_mapping.cli", "serve", str(path), *common,
                             "--port", str(port), "--basemap", "none", "--memory-limit", str(a.memory_limit)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600)
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"server exited: {log_path.read_text()[-2000:]}")
            try:
                if client.get("/api/info").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        t_start = time.perf_counter() - t0
        rss = RssPeak(proc.pid)
        tms = morecantile.tms.get("WebMercatorQuad")
        left, top = origin(side)
        tr = Transformer.from_crs(f"EPSG:{EPSG}", "EPSG:4326", always_xy=True)
        side_m = side * PX
        rng = np.random.default_rng(side)

        def lonlat(fx, fy):
            return tr.transform(left + fx * side_m, top - fy * side_m)

        def get_tile(z, lon, lat, **params):
            t = tms.tile(lon, lat, z)
            t0 = time.perf_counter()
            r = client.get(f"/tiles/{z}/{t.x}/{t.y}.png", params=params)
            dt = time.perf_counter() - t0
            assert r.status_code == 200 and len(r.content) > 200, (r.status_code, r.text[:200])
            timing = dict(p.split(";dur=") for p in r.headers.get("server-timing", "").split(", ") if ";dur=" in p)
            embed_ms.append(float(timing.get("embed", "nan")))
            return dt, t

        words = iter(WORDS * 10)
        out = {"side": side, "start_s": t_start}
        embed_ms: list[float] = []
        # ---- new query -> first tile: web zoom 8 (the whole store in one tile), then 14
        for z in (8, 14):
            first = []
            embed_ms.clear()
            for i in range(a.queries):
                fx, fy = (0.5, 0.5) if z == 8 else rng.uniform(0.2, 0.8, 2)
                first.append(get_tile(z, *lonlat(fx, fy), text=f"{next(words)} {z} {i}")[0])
            out[f"first_z{z}"] = first
            out[f"embed_z{z}"] = list(embed_ms)
        # ---- tiles of a computed query, not rendered before (web zooms 10..15)
        q = {"text": WORDS[0]}
        get_tile(12, *lonlat(0.5, 0.5), **q)
        newtile = []
        for i in range(a.tiles):
            z = int(rng.integers(10, 16))
            newtile.append(get_tile(z, *lonlat(*rng.uniform(0.05, 0.95, 2)), **q)[0])
        out["new_tile"] = newtile
        # ---- the same tile URL again (the rendered-tile cache)
        same = [get_tile(14, *lonlat(0.5, 0.5), **q)[0] for _ in range(a.tiles)]
        out["cached_tile"] = same[1:]
        # ---- points
        points = []
        for _ in range(a.tiles):
            lon, lat = lonlat(*rng.uniform(0.01, 0.99, 2))
            t0 = time.perf_counter()
            r = client.get("/api/point", params={**q, "lon": lon, "lat": lat})
            points.append(time.perf_counter() - t0)
            assert r.status_code == 200 and r.json()["valid"], r.text[:200]
        out["point"] = points
        out["held"] = client.get("/api/stats").json()["held_bytes"]
        out["rss_end"] = rss.now()
        out["rss_peak"] = rss.stop()
        return out
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def main(argv=None) -> int:
    from psm_mapping.model.checkpoint import file_sha256
    from psm_mapping.model.factory import make_checkpoint, make_tokenizer, tiny_clap_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", default="500,2000", help="store sides in pixels, comma-separated (default "
                    "500,2000: 0.25M and 4M pixels)")
    ap.add_argument("--block-size", type=int, default=128, help="store chunk side (default 128)")
    ap.add_argument("--memory-limit", type=float, default=1.5, help="GB for `psm-map serve` (default 1.5)")
    ap.add_argument("--queries", type=int, default=5, help="new queries timed per web zoom and size (default 5)")
    ap.add_argument("--tiles", type=int, default=40, help="tiles / points timed per kind and size (default 40)")
    ap.add_argument("--keep", help="build (or reuse) the stores in this folder instead of a temporary one")
    ap.add_argument("--smoke", action="store_true", help="a 64 px store and a few requests (seconds)")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sides, a.block_size, a.queries, a.tiles = "64", 32, 2, 3
    sides = [int(s) for s in str(a.sides).split(",") if s.strip()]
    tmp = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="psm-bench-serve-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = tmp / "psm_tiny.ckpt"
        if not ckpt.exists():
            make_checkpoint(ckpt, sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource",
                            embed_dim=64)
        tok = tmp / "tok"
        if not tok.exists():
            make_tokenizer(tok)
        clap = tmp / "clap.json"
        tiny_clap_config().to_json_file(str(clap))
        common = ["--checkpoint", str(ckpt), "--clap-config", str(clap), "--tokenizer", str(tok)]
        results = []
        for side in sides:
            path = tmp / f"store-{side}-b{a.block_size}.zarr"
            t0 = time.perf_counter()
            if not path.exists():
                build_store(path, side, a.block_size, file_sha256(ckpt))
            elif not has_levels(EmbeddingStore.open(str(path))):  # a store kept from before levels
                build_levels(EmbeddingStore.open(str(path), mode="r+"))
            t_build = time.perf_counter() - t0
            size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
            r = measure(path, side, common, a, tmp)
            r.update(build_s=t_build, disk=size)
            results.append(r)

        print(f"command: python benchmarks/bench_serve.py --sides {','.join(map(str, sides))} "
              f"--memory-limit {a.memory_limit:g} --block-size {a.block_size} --queries {a.queries} "
              f"--tiles {a.tiles}{' --smoke' if a.smoke else ''}; CPU cores {os.cpu_count()}")
        for r in results:
            s = r["side"]
            print(f"store {s} x {s} px ({s * s / 1e6:.2f} M px, 1 zoom, {D}-d float16 means, "
                  f"{r['disk'] / 1e9:.2f} GB on disk, built in {r['build_s']:.0f} s); server up in {r['start_s']:.1f} s")
            for z in (8, 14):
                f = r[f"first_z{z}"]
                e = np.median(r[f"embed_z{z}"])
                print(f"  new query -> first tile, web zoom {z:2d}: p50 {pct(f, 50):7.0f} ms  p95 {pct(f, 95):7.0f} ms"
                      f"  (goal p50 <= 300 ms; of which the text embedding {e:.0f} ms)  runs: "
                      + ", ".join(f"{x * 1e3:.0f}" for x in f))
            print(f"  cached tile (same URL again)       : p50 {pct(r['cached_tile'], 50):7.1f} ms  (goal <= 20 ms)")
            print(f"  new tile of a computed query z10-15: p50 {pct(r['new_tile'], 50):7.1f} ms  "
                  f"p95 {pct(r['new_tile'], 95):7.1f} ms")
            print(f"  point                              : p50 {pct(r['point'], 50):7.1f} ms")
            print(f"  server RSS: peak {r['rss_peak'] / 1e9:.2f} GB, at the end {r['rss_end'] / 1e9:.2f} GB "
                  f"(goal <= 1.5 GB); caches hold {r['held'] / 1e9:.2f} GB")
        if len(results) > 1:
            small, large = results[0], results[-1]
            for z in (8, 14):
                ratio = pct(large[f"first_z{z}"], 50) / pct(small[f"first_z{z}"], 50)
                print(f"first tile p50 ratio {large['side']} / {small['side']} px side, web zoom {z}: "
                      f"{ratio:.2f} x (goal <= 1.5 x)")
        return 0
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
