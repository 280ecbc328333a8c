"""Scale-true zoom sampling against dense sampling: chips per output pixel, end-to-end wall time and
the agreement of the maps (Pearson correlation per zoom over the valid pixels), in one run.

Scenes: the demo's (``psm_mapping.demo``: procedural land cover near Lausanne) at the demo's stride
(150 m) and at the default stride (640 m), and a second, different scene (smooth random texture at
10 m, ``tests/geo_fixtures.texture``) at 640 m. Checkpoints: a random full-width one (ViT embed_dim
768, 12 heads, fc_dim 512, the full metadata fuser; ``--depth`` blocks, default 2 to keep CPU time
short: width, not depth, sets what a chip shift does to the embedding scale) and the official-format
fixture ``psm_tiny_meta_sentinel.ckpt`` (``$PSM_FIXTURES`` or ../shared/fixtures), when present.

Run: python benchmarks/bench_zooms.py [--depth 2] [--work DIR] [--only demo150,demo640,texture640]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pyproj import Transformer  # noqa: E402

from psm_mapping.model.factory import make_checkpoint, make_tokenizer, tiny_clap_config  # noqa: E402
from psm_mapping.run import MapConfig, map_region  # noqa: E402

QUERIES = ["birds chirping", "cars driving on a busy road"]


def fixtures_dir() -> Path:
    return Path(os.environ.get("PSM_FIXTURES", ROOT.parent / "shared" / "fixtures"))


def texture_scene(folder: Path) -> tuple[Path, Path]:
    from geo_fixtures import texture, utm_scene

    x0, y0, res, n = 400_000.0, 5_300_000.0, 10.0, 3000  # 30 km
    scene = folder / "texture.tif"
    if not scene.exists():
        utm_scene(scene, texture(n, n, seed=11, smooth_px=30), res, origin=(x0, y0), crs="EPSG:32633",
                  overviews=(2, 4, 8))
    to_ll = Transformer.from_crs("EPSG:32633", 4326, always_xy=True)
    cx, cy, h = x0 + n * res / 2, y0 - n * res / 2, 4200.0
    ring = [list(to_ll.transform(cx + dx * h, cy + dy * h)) for dx, dy in
            [(-1, -1), (1, -1), (1, 0.7), (0.2, 1), (-1, 1), (-1, -1)]]
    region = folder / "texture.geojson"
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    return scene, region


def demo_scene(folder: Path) -> tuple[Path, Path]:
    from psm_mapping.demo import make_region, make_scene

    scene, region = folder / "demo.tif", folder / "demo.geojson"
    if not scene.exists():
        make_scene(scene)
    if not region.exists():
        make_region(region)
    return scene, region


def checkpoints(folder: Path, depth: int, smoke: bool = False) -> dict[str, dict]:
    out = {}
    if smoke:  # a tiny random checkpoint only
        tiny = folder / "tiny.ckpt"
        if not tiny.exists():
            make_checkpoint(tiny, sat_type="sentinel", embed_dim=64, depth=1)
        clap = folder / "clap.json"
        tiny_clap_config().to_json_file(str(clap))
        return {"random ViT-64 x1": {"checkpoint": str(tiny), "clap_config": str(clap)}}
    full = folder / f"full_width_depth{depth}.ckpt"
    if not full.exists():
        make_checkpoint(full, sat_type="sentinel", embed_dim=768, depth=depth, num_heads=12)
    clap = folder / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    out[f"random ViT-768 x{depth}"] = {"checkpoint": str(full), "clap_config": str(clap)}
    fx = fixtures_dir()
    if (fx / "psm_tiny_meta_sentinel.ckpt").is_file():
        out["fixture tiny"] = {"checkpoint": str(fx / "psm_tiny_meta_sentinel.ckpt"),
                               "clap_config": str(fx / "psm_tiny_meta_sentinel_clap_config.json")}
    else:
        print(f"(fixture checkpoint not found in {fx}: its rows are left out)")
    return out


def read(path: Path):
    import rasterio

    with rasterio.open(path) as s:
        return s.read(), list(s.descriptions)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    m = np.isfinite(a) & np.isfinite(b)
    if m.sum() < 3 or np.std(a[m]) == 0 or np.std(b[m]) == 0:
        return float("nan")
    return float(np.corrcoef(a[m], b[m])[0, 1])


def run_pair(work: Path, name: str, scene: Path, region: Path, stride: float, ck: dict, tok: Path) -> dict:
    res = {}
    for mode in ("dense", "scale"):
        d = work / "runs" / f"{name}-{ck['key']}-{mode}"
        d.mkdir(parents=True, exist_ok=True)
        cfg = MapConfig(region=str(region), imagery=str(scene), queries=QUERIES, checkpoint=ck["checkpoint"],
                        clap_config=ck["clap_config"], tokenizer=str(tok), zoom_levels=(1, 3, 5), stride=stride,
                        month=5, hour=14, out=str(d / "map.tif"), store=str(d / f"store-{time.time_ns()}"),
                        overwrite=True, previews=False, progress=False, device="cpu", zoom_sampling=mode)
        t0 = time.perf_counter()
        run = map_region(cfg, log_fn=lambda *a: None)
        wall = time.perf_counter() - t0
        res[mode] = {"run": run, "wall": wall, "map": read(d / "map.tif")}
    (a, desc), (b, _) = res["dense"]["map"], res["scale"]["map"]
    corr, rough = {}, {}
    for k, dsc in enumerate(desc):
        z = dsc.rsplit("at zoom ", 1)[1]
        kind = "unc" if dsc.startswith("image embedding uncertainty") else "sim"
        corr.setdefault((kind, z), []).append(pearson(a[k], b[k]))
        if kind == "sim":  # the dense map against itself one pixel to the right: its own smoothness
            rough.setdefault(z, []).append(pearson(a[k][:, :-1], a[k][:, 1:]))
    px = res["dense"]["run"].pixels
    return {"pixels": px, "chips_dense": res["dense"]["run"].chips, "chips_scale": res["scale"]["run"].chips,
            "wall_dense": res["dense"]["wall"], "wall_scale": res["scale"]["wall"],
            "embed_dense": res["dense"]["run"].seconds.get("embed_total"),
            "embed_scale": res["scale"]["run"].seconds.get("embed_total"),
            "corr": {f"{k}:z{z}": float(np.nanmin(v)) for (k, z), v in corr.items()},
            "neighbour": {f"z{z}": float(np.nanmin(v)) for z, v in rough.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=2, help="ViT depth of the random full-width checkpoint")
    ap.add_argument("--work", help="folder for scenes, checkpoints and runs (default: a temporary one)")
    ap.add_argument("--only", default="demo150,demo640,texture640")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--smoke", action="store_true", help="the demo scene at 640 m with a tiny checkpoint")
    a = ap.parse_args(argv)
    if a.smoke:
        a.only = "demo640"
    import torch

    torch.set_num_threads(a.threads)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench-zooms-"))
    work.mkdir(parents=True, exist_ok=True)
    tok = work / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        make_tokenizer(tok)
    cks = checkpoints(work, a.depth, smoke=a.smoke)
    settings = {"demo150": (*demo_scene(work), 150.0), "demo640": (*demo_scene(work), 640.0),
                "texture640": (*texture_scene(work), 640.0)}
    rows = []
    for name in a.only.split(","):
        scene, region, stride = settings[name]
        for label, ck in cks.items():
            ck = {**ck, "key": label.split()[0] + label.split()[-1]}
            t0 = time.perf_counter()
            r = run_pair(work, name, scene, region, stride, ck, tok)
            r.update(scene=name, checkpoint=label)
            rows.append(r)
            print(f"[{name} / {label}: {time.perf_counter() - t0:.0f} s]", flush=True)
    keys = ["sim:z1", "sim:z3", "sim:z5", "unc:z3", "unc:z5"]
    print("\nPearson r, scale-true vs dense (valid pixels; similarity: the lower of the two queries); "
          "'dense nb r': the dense map against itself shifted by one pixel (its own smoothness); "
          "nan: one cell covers the region (a constant map)")
    print(f"| scene (stride) | checkpoint | px | chips/px dense -> scale | {' | '.join(keys)} | dense nb r z3 / z5 "
          "| wall dense / scale (s) | speedup |")
    print("|---|---|---|---|" + "---|" * len(keys) + "---|---|---|")
    for r in rows:
        cs = " | ".join(f"{r['corr'].get(k, float('nan')):.4f}" for k in keys)
        nb = f"{r['neighbour'].get('z3', float('nan')):.3f} / {r['neighbour'].get('z5', float('nan')):.3f}"
        print(f"| {r['scene']} | {r['checkpoint']} | {r['pixels']} | {r['chips_dense'] / r['pixels']:.2f} -> "
              f"{r['chips_scale'] / r['pixels']:.3f} | {cs} | {nb} | {r['wall_dense']:.1f} / {r['wall_scale']:.1f} | "
              f"{r['wall_dense'] / r['wall_scale']:.2f}x |")
    sims = [v for r in rows for k, v in r["corr"].items() if k.startswith("sim") and k != "sim:z1"]
    ok = bool(sims) and min(sims) >= 0.99
    print(f"\nlowest similarity correlation at zooms 3/5: {min(sims):.4f} -> "
          f"{'scale-true holds its accuracy (>= 0.99)' if ok else 'below 0.99: dense stays the default'}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
