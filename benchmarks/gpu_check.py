"""One GPU check, one table (``benchmarks/gpu_check.sh`` runs it): the image model fp32 eager vs bf16
autocast vs bf16 + ``torch.compile`` (images/s, fraction of the bf16 matmul peak measured in the same
run), end-to-end chips/s of a map run on a synthetic local scene (GPU busy fraction, readers' queue
depth, device-side chip cutting), and bf16 vs fp32 map agreement.

Without CUDA it runs the same steps on CPU, smaller (a 2-block ViT-768 instead of ViT-B/16, a small
region), and says so: the GPU figures stay open.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_model import image_model, matmul_peak_gflops, time_images, vit_flops_per_image  # noqa: E402

ROWS: list[tuple[str, str, str]] = []


def row(what: str, value: str, note: str = "") -> None:
    ROWS.append((what, value, note))
    print(f"  {what}: {value} {note}", flush=True)


def model_part(device: torch.device, batch: int, iters: int, compile_: bool) -> None:
    gpu = device.type == "cuda"
    flops = vit_flops_per_image()
    if gpu:
        peak = matmul_peak_gflops(device, n=8192, repeats=5, dtype=torch.bfloat16)
        row("bf16 matmul peak (8192^3)", f"{peak / 1e3:.0f} TFLOP/s", torch.cuda.get_device_name(device))
    else:
        peak = matmul_peak_gflops(device)
        row("fp32 matmul peak (2048^3, CPU)", f"{peak:.0f} GFLOP/s")
    runs = {}
    fp32, _ = time_images(image_model(device, torch.float32), batch, iters, 1, "fp32 eager")
    runs["fp32 eager"] = fp32
    if gpu:
        runs["bf16 autocast"], _ = time_images(image_model(device, torch.bfloat16), batch, iters, 1, "bf16")
    if compile_:
        from psm_mapping.embed import compile_image_encoder

        dt = torch.bfloat16 if gpu else torch.float32
        m = image_model(device, dt)
        compile_image_encoder(m)
        t0 = time.perf_counter()
        runs[f"{'bf16' if gpu else 'fp32'} + compile"], _ = time_images(m, batch, iters, 2, "compiled")
        row("torch.compile warm-up + timing", f"{time.perf_counter() - t0:.0f} s")
    for name, r in runs.items():
        row(f"ViT-B/16 image path, {name}", f"{r.images_per_s:.1f} images/s",
            f"{r.gflops_per_s / 1e3:.2f} TFLOP/s = {r.gflops_per_s / peak:.0%} of the "
            f"{'bf16' if gpu else 'fp32'} matmul peak (batch {batch}, {flops / 1e9:.1f} GFLOP/image)")
    if gpu:
        row("bf16 / fp32 eager", f"{runs['bf16 autocast'].images_per_s / fp32.images_per_s:.2f}x")


def scene_inputs(folder: Path, gpu: bool):
    from pyproj import Transformer

    from geo_fixtures import texture, utm_scene
    from psm_mapping.model.factory import make_checkpoint, make_tokenizer, tiny_clap_config

    x0, y0, res = 500_000.0, 5_600_000.0, 10.0
    n = 3200 if gpu else 2000
    scene = utm_scene(folder / "scene.tif", texture(n, n, seed=3, smooth_px=20), res, origin=(x0, y0),
                      crs="EPSG:32633", overviews=(2, 4, 8))
    half = (n * res / 2 - 6600) if gpu else 1600.0  # GPU: region + a zoom-5 half footprint inside
    to_ll = Transformer.from_crs("EPSG:32633", 4326, always_xy=True)
    cx, cy = x0 + n * res / 2, y0 - n * res / 2
    ring = [list(to_ll.transform(cx + dx * half, cy + dy * half)) for dx, dy in
            [(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)]]
    region = folder / "region.geojson"
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    ck = folder / "vit.ckpt"
    if gpu:
        make_checkpoint(ck, sat_type="sentinel", embed_dim=768, depth=12, num_heads=12)
    else:
        make_checkpoint(ck, sat_type="sentinel", embed_dim=768, depth=2, num_heads=12)
    clap = folder / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    return scene, region, ck, clap, make_tokenizer(folder / "tok")


def map_part(device: torch.device, folder: Path, stride: float) -> None:
    from psm_mapping.run import MapConfig, map_region

    gpu = device.type == "cuda"
    scene, region, ck, clap, tok = scene_inputs(folder, gpu)
    maps = {}
    for dtype in ("bfloat16", "float32") if gpu else ("float32",):
        d = folder / dtype
        d.mkdir()
        cfg = MapConfig(region=str(region), imagery=str(scene), queries=["birds chirping"], checkpoint=str(ck),
                        clap_config=str(clap), tokenizer=str(tok), zoom_levels=(1, 3, 5), stride=stride,
                        device=device.type, dtype=dtype, batch_size="auto", out=str(d / "m.tif"),
                        store=str(d / "store"), previews=False, progress=False)
        lines: list[str] = []
        run = map_region(cfg, log_fn=lines.append)
        s = run.seconds
        emb = s.get("embed_total", float("nan"))
        busy = s.get("model", 0.0) / emb if emb else float("nan")
        row(f"map run {dtype} (ViT {'B/16' if gpu else '768 x 2'}, zooms 1,3,5, readers default)",
            f"{run.chips / emb:.0f} chips/s",
            f"{run.chips} chips in {emb:.1f} s; model busy {busy:.0%} of the embedding time; read {s.get('read', 0):.1f} s "
            f"(summed over readers); model waited {s.get('model_waits_for_readers', 0):.1f} s for readers, queue depth "
            f"{run.queue_depth:.1f}; {'device' if gpu else 'host'}-side cutting; "
            f"{[x for x in lines if x.startswith('batch size')][:1]}")
        import rasterio

        with rasterio.open(d / "m.tif") as src:
            maps[dtype] = src.read(1)
    if gpu:
        a, b = maps["float32"], maps["bfloat16"]
        m = np.isfinite(a) & np.isfinite(b)
        row("bf16 vs fp32 map (similarity, zoom 1)", f"max abs err {np.abs(a[m] - b[m]).max():.2e}",
            f"Pearson r {np.corrcoef(a[m], b[m])[0, 1]:.5f} over {int(m.sum())} px")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json")
    a = ap.parse_args(argv)
    gpu = torch.cuda.is_available() and a.device in ("auto", "cuda")
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        print("NOTE: no CUDA GPU visible: this is the CPU run of the GPU check (smaller model and region); "
              "the GPU figures (bf16, compile, GPU busy fraction, bf16 vs fp32 agreement) are OPEN.", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model_part(device, batch=256 if gpu else 8, iters=5 if gpu else 2, compile_=gpu)
        map_part(device, Path(tmp), stride=640.0 if gpu else 320.0)
    row("check wall time", f"{time.perf_counter() - t0:.0f} s")
    print("\n| check | result | detail |\n|---|---|---|")
    for w, v, n in ROWS:
        print(f"| {w} | {v} | {n} |")
    if not gpu:
        print("\n(CPU run: no GPU was visible; the GPU figures are open)")
    if a.json:
        Path(a.json).write_text(json.dumps(ROWS, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
