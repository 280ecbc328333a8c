"""psm-map assess on CPU: observations against a map, and against a store.

* map: ``assess`` of N presence/absence observations against a psm-map COG of 6 value bands
  (3 queries x zooms 1, 3) plus 2 uncertainty bands, 1000 x 1000 px: read the map, the pixel of
  each site, AUC per band with a 1000-replicate spatial block bootstrap, JSON and CSV written.
  Goal: < 5 s for 10,000 observations x 6 bands.
  Presence-only (the presences of the same table against as many background points, AUC and
  Boyce with their intervals) is timed too (no goal).
* store: ``assess`` of S sites from a map's embedding store (chips centred on the sites, each at
  its eventDate month and hour) against ``score_points`` on the same sites, both into a fresh
  point store; ratio = assess / points, goal <= 1.15 (the assessment's own work is the figures).

Run: python benchmarks/bench_assess.py [--observations 10000] [--store-sites 256] [--smoke]
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
sys.path.insert(0, str(ROOT / "tests"))

from geo_fixtures import texture, utm_scene  # noqa: E402

CRS = "EPSG:32633"
X0, Y0 = 500_000.0, 5_600_000.0
QUERIES = ("birds chirping", "rain on a roof", "traffic noise")


def write_map(path: Path, side: int) -> tuple:
    from affine import Affine
    from pyproj import CRS as PCRS

    from psm_mapping.outputs import MapBand, MapResult, write_cog

    base = texture(side, side, seed=2, smooth_px=max(4, side // 50))[0].astype(np.float32) / 255.0
    bands = []
    for q, query in enumerate(QUERIES):
        for z in (1, 3):
            a = (base * (1 + 0.1 * q) + 0.01 * z).astype(np.float32)
            a[: side // 20, : side // 20] = np.nan
            bands.append(MapBand(f"similarity:{query}:z{z}", a, query, "similarity", query, z))
    for z in (1, 3):
        bands.append(MapBand(f"uncertainty:z{z}", (60 + 10 * base).astype(np.float32), "u", "uncertainty", None, z))
    t = Affine(20.0, 0.0, X0, 0.0, -20.0, Y0)
    write_cog(MapResult(bands, PCRS.from_epsg(32633), t, {"checkpoint": "bench"}), path)
    return base, t


def bench_map(folder: Path, n_obs: int, side: int, n_boot: int) -> dict:
    import pandas as pd
    from pyproj import Transformer

    from psm_mapping.assessment import assess

    folder.mkdir(parents=True)
    base, t = write_map(folder / "map.tif", side)
    rng = np.random.default_rng(0)
    col, row = rng.uniform(0, side, n_obs), rng.uniform(0, side, n_obs)
    lon, lat = Transformer.from_crs(CRS, 4326, always_xy=True).transform(X0 + col * t.a, Y0 + row * t.e)
    v = base[row.astype(int), col.astype(int)]
    present = rng.random(n_obs) < v
    obs = folder / "obs.csv"
    pd.DataFrame({"decimalLongitude": lon, "decimalLatitude": lat,
                  "occurrenceStatus": np.where(present, "present", "absent")}).to_csv(obs, index=False)
    t0, c0 = time.perf_counter(), time.process_time()
    res = assess(source=str(folder / "map.tif"), observations=str(obs), bootstrap=n_boot,
                 out=[str(folder / "r.json"), str(folder / "sites.csv")])
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    t0 = time.perf_counter()
    po = assess(source=str(folder / "map.tif"), observations=str(obs), kind="presence-only", bootstrap=n_boot,
                background=n_obs)
    total_po = time.perf_counter() - t0
    return {"observations": n_obs, "bands": len(res.bands), "pixels": side * side, "bootstrap": n_boot,
            "total_s": total, "cpu_s": cpu, "line": res.lines()[0], "po_s": total_po, "presences": po.bands[0].n,
            "background": po.bands[0].n_background}


def bench_store(folder: Path, n_sites: int) -> dict:
    import geopandas as gpd
    import pandas as pd
    from pyproj import Transformer
    from shapely.geometry import box

    from psm_mapping.assessment import assess
    from psm_mapping.assessment.fromstore import is_store
    from psm_mapping.cli import main
    from psm_mapping.model.factory import make_checkpoint, make_tokenizer, tiny_clap_config
    from psm_mapping.places import PointsConfig, score_points

    folder.mkdir(parents=True)
    res, size = 10.0, 1200
    scene = utm_scene(folder / "scene.tif", texture(size, size, seed=1, smooth_px=6), res, origin=(X0, Y0), crs=CRS)
    cx, cy = X0 + size * res / 2, Y0 - size * res / 2
    region = folder / "region.geojson"
    gpd.GeoDataFrame(geometry=[box(cx - 300, cy - 300, cx + 300, cy + 300)], crs=CRS).to_crs(4326).to_file(region)
    ckpt = make_checkpoint(folder / "b.ckpt", sat_type="sentinel", embed_dim=64,
                           metadata_type="latlong_month_time_asource_tsource")
    tok = make_tokenizer(folder / "tok")
    clap = folder / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    margs = ["--checkpoint", str(ckpt), "--clap-config", str(clap), "--tokenizer", str(tok), "--device", "cpu",
             "--quiet"]
    assert main([str(region), "--imagery", str(scene), "--zoom-level", "1,3", "--stride", "200", *margs,
                 "--out", str(folder / "map.tif"), "--no-previews", "--query", QUERIES[0]]) == 0
    [store] = [p for p in (folder / "psm-store").iterdir() if is_store(p) == "store"]
    rng = np.random.default_rng(1)
    x, y = cx + rng.uniform(-2000, 2000, n_sites), cy + rng.uniform(-2000, 2000, n_sites)
    lon, lat = Transformer.from_crs(CRS, 4326, always_xy=True).transform(x, y)
    month, hour = rng.integers(1, 13, n_sites), rng.integers(0, 24, n_sites)
    obs = folder / "obs.csv"
    pd.DataFrame({"decimalLongitude": lon, "decimalLatitude": lat,
                  "eventDate": [f"2024-{m:02d}-10T{h:02d}:00:00" for m, h in zip(month, hour)],
                  "occurrenceStatus": np.where(rng.random(n_sites) < 0.5, "present", "absent")}
                 ).to_csv(obs, index=False)
    sites = folder / "sites.csv"
    pd.DataFrame({"lon": lon, "lat": lat, "month": month, "hour": hour}).to_csv(sites, index=False)
    t0 = time.perf_counter()
    score_points(PointsConfig(sites=str(sites), imagery=str(scene), checkpoint=str(ckpt), clap_config=str(clap),
                              tokenizer=str(tok), zoom_levels=(1, 3), queries=list(QUERIES), device="cpu",
                              progress=False, store=str(folder / "pts-store"), out=str(folder / "pts.csv")),
                 log_fn=lambda *a: None)
    t_points = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = assess(source=str(store), observations=str(obs), queries=list(QUERIES), imagery=str(scene), device="cpu",
               bootstrap=1000, out=[str(folder / "r.json")])
    t_assess = time.perf_counter() - t0
    return {"sites": n_sites, "bands": len(r.bands), "points_s": t_points, "assess_s": t_assess,
            "ratio": t_assess / t_points}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--observations", type=int, default=10_000)
    ap.add_argument("--side", type=int, default=1000)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--store-sites", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite runs this)")
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    if a.smoke:
        a.observations, a.side, a.bootstrap, a.store_sites = 500, 200, 100, 24
    folder = Path(tempfile.mkdtemp(prefix="bench-assess-"))
    try:
        m = bench_map(folder / "m", a.observations, a.side, a.bootstrap)
        print(f"map: {m['observations']:,} observations x {m['bands']} bands over {m['pixels']:,} px, "
              f"{m['bootstrap']} bootstrap replicates: {m['total_s']:.2f} s end to end, {m['cpu_s']:.2f} s "
              f"CPU (goal < 5 s at 10,000 x 6); "
              f"presence-only ({m['presences']:,} presences, {m['background']:,} background, AUC + Boyce): "
              f"{m['po_s']:.2f} s")
        s = bench_store(folder / "s", a.store_sites)
        print(f"store: {s['sites']} sites x {s['bands']} bands: assess {s['assess_s']:.2f} s vs psm-map points "
              f"{s['points_s']:.2f} s: ratio {s['ratio']:.3f} (goal <= 1.15)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
