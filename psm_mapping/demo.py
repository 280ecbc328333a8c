"""The built-in offline demo: a synthetic Sentinel-2-like scene, a small region, an untrained
checkpoint in the official format, a tokenizer trained on the spot and a synthetic bird-call
clip. It runs the real pipeline end to end (COG, Zarr, previews, HTML) in about a minute on 2
CPU cores. The weights are random: the maps show the machinery, not the science.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np

from .errors import OutputError

log = logging.getLogger(__name__)

#: where the synthetic scene is placed (near Lausanne, UTM 32N); the content is procedural
DEMO_CENTER = (6.63, 46.52)
DEMO_REGION_KM = 3.0
SCENE_KM = 19.0
SCENE_RES_M = 20.0


def _noise(rng: np.random.Generator, n: int, scales=(4, 8, 16, 32)) -> np.ndarray:
    """Smooth value noise in [0, 1], [n, n]."""
    import torch
    import torch.nn.functional as F

    acc = np.zeros((n, n), np.float32)
    for k, s in enumerate(scales):
        g = torch.from_numpy(rng.random((1, 1, s, s)).astype(np.float32))
        acc += F.interpolate(g, size=(n, n), mode="bicubic", align_corners=False)[0, 0].numpy() / (k + 1)
    acc -= acc.min()
    return acc / acc.max()


def make_scene(path: Path, seed: int = 7) -> Path:
    """A procedural land-cover scene (water, forest, fields, town) as an RGB GeoTIFF in UTM 32N."""
    import rasterio
    from pyproj import Transformer
    from rasterio.transform import from_origin

    n = int(SCENE_KM * 1000 / SCENE_RES_M)
    rng = np.random.default_rng(seed)
    elev, veg, town = _noise(rng, n), _noise(rng, n), _noise(rng, n, (3, 6, 12))
    rgb = np.empty((3, n, n), np.float32)
    fields = ((np.arange(n)[:, None] // 12 + np.arange(n)[None, :] // 17) % 3).astype(np.float32)
    cls = np.select([elev < 0.25, town > 0.78, veg > 0.55], [0, 1, 2], 3)
    palette = {0: (40, 70, 110), 1: (150, 145, 140), 2: (45, 80, 40), 3: (150, 140, 90)}
    for c, col in palette.items():
        for b in range(3):
            rgb[b][cls == c] = col[b]
    rgb[:, cls == 3] += (fields[cls == 3] * 18 - 18)[None]
    grid = (np.arange(n) % 6 == 0)
    streets = (grid[:, None] | grid[None, :]) & (cls == 1)
    rgb[:, streets] = 200
    rgb += rng.normal(0, 6, rgb.shape).astype(np.float32)
    data = np.clip(rgb, 0, 255).astype(np.uint8)
    x0, y0 = Transformer.from_crs("EPSG:4326", "EPSG:32632", always_xy=True).transform(*DEMO_CENTER)
    half = SCENE_KM * 500
    transform = from_origin(round(x0 - half), round(y0 + half), SCENE_RES_M, SCENE_RES_M)
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=n, height=n, count=3, dtype="uint8",
                       crs="EPSG:32632", transform=transform, tiled=True, compress="deflate",
                       photometric="RGB") as dst:
        dst.write(data)
        dst.build_overviews([2, 4], rasterio.enums.Resampling.average)
        dst.update_tags(DESCRIPTION="psm-mapping demo: synthetic procedural scene, not real imagery")
    return path


def make_region(path: Path) -> Path:
    """A ~3 km square-ish polygon around the scene centre, as GeoJSON."""
    from pyproj import Geod

    lon, lat = DEMO_CENTER
    g = Geod(ellps="WGS84")
    d = DEMO_REGION_KM * 500
    e = g.fwd(lon, lat, 90, d)[0] - lon
    nth = g.fwd(lon, lat, 0, d)[1] - lat
    ring = [[lon - e, lat - nth], [lon + e, lat - nth * 0.8], [lon + e * 0.9, lat + nth],
            [lon - e, lat + nth], [lon - e, lat - nth]]
    gj = {"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {"name": "demo"},
                                                      "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gj))
    return path


def make_chirps(path: Path, seconds: float = 4.0, sr: int = 44100) -> Path:
    """A synthetic bird-call-like clip (frequency-swept chirps)."""
    import soundfile as sf

    t = np.arange(int(seconds * sr)) / sr
    y = np.zeros_like(t)
    for k, start in enumerate(np.arange(0.2, seconds - 0.3, 0.45)):
        m = (t >= start) & (t < start + 0.18)
        tt = t[m] - start
        f = 2500 + 2500 * tt / 0.18 + 300 * k % 700
        y[m] += np.sin(2 * np.pi * np.cumsum(f) / sr) * np.hanning(m.sum())
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), (0.4 * y).astype(np.float32), sr)
    return path


def prepare_inputs(folder: Path) -> dict[str, Path]:
    """Demo inputs (cached in ``folder``): scene, region, checkpoint, tokenizer, audio."""
    from .model.factory import make_checkpoint, make_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"scene": folder / "scene.tif", "region": folder / "region.geojson",
             "checkpoint": folder / "psm_demo_untrained.ckpt", "tokenizer": folder / "tokenizer",
             "audio": folder / "chirps.wav"}
    if not paths["scene"].is_file():
        make_scene(paths["scene"])
    if not paths["region"].is_file():
        make_region(paths["region"])
    if not paths["checkpoint"].is_file():
        make_checkpoint(paths["checkpoint"], sat_type="sentinel", embed_dim=192, depth=2, num_heads=3,
                        hparams_extra={"untrained": True,
                                       "note": "psm-mapping demo: random weights, not a trained model"})
    if not (paths["tokenizer"] / "tokenizer.json").is_file():
        make_tokenizer(paths["tokenizer"])
    if not paths["audio"].is_file():
        make_chirps(paths["audio"])
    return paths


def run_demo(out: str | Path = "psm-demo-output", overwrite: bool = False, quiet: bool = False) -> dict:
    """Run the pipeline on the demo inputs; writes a COG, a Zarr, previews and an HTML page."""
    from .run import MapConfig, map_region

    out = Path(out)
    say = (lambda *a: None) if quiet else print
    if out.exists() and any(out.glob("*.tif")) and not overwrite:
        raise OutputError(f"{out} already holds a demo run: pass --overwrite or --out ANOTHER_FOLDER")
    if out.exists() and overwrite:
        for p in out.iterdir():
            if p.name != "inputs":
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    t0 = time.perf_counter()
    say("psm-map demo: UNTRAINED weights (random), synthetic scene - the maps show the pipeline, "
        "not real soundscapes. Use an official checkpoint (`psm-map weights`) for real maps.")
    inp = prepare_inputs(out / "inputs")
    common = dict(region=str(inp["region"]), imagery=str(inp["scene"]), queries=["birds chirping", "cars driving on a busy road"],
                  audio=[str(inp["audio"])], checkpoint=str(inp["checkpoint"]), tokenizer=str(inp["tokenizer"]),
                  zoom_levels=(1, 3, 5), stride=150.0, month=5, hour=14, store=str(out / "store"),
                  device="cpu", progress=not quiet, score=True,
                  extra_tags={"demo": "untrained weights, synthetic scene"})
    cog = map_region(MapConfig(out=str(out / "soundscape.tif"), format="cog", **common), log_fn=say)
    say(cog.summary())
    zarr = map_region(MapConfig(out=str(out / "soundscape.zarr"), format="zarr", previews=False, **common),
                      log_fn=say)
    say(f"zarr: {zarr.outputs.get('map')} (store reused: {zarr.image_model_calls} image model calls)")
    say(f"demo finished in {time.perf_counter() - t0:.0f} s; outputs in {out.resolve()}")
    return {"cog": cog, "zarr": zarr, "folder": out.resolve()}
