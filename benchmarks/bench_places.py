"""Places on CPU: site scoring against the model alone, and zonal statistics over a 1M-pixel map.

* points: ``score_points`` embedding N scattered sites into a fresh point store (chips cut by
  ``ChipReader.chips_at`` with prefetch, batched across sites, Zarr chunk writes, status) against
  the same ``ImageModel`` on the same chips cut beforehand and held in memory. overhead =
  (embed total - model only) / model only; goal <= 15 %. A ViT of embed_dim 384, depth 4 (untrained,
  full metadata fuser) keeps it short, as in bench_e2e.py.
* zonal: ``write_zonal`` (read the COG, exactextract coverage, statistics of every band, CSV with
  provenance) for P random polygons over a 1000 x 1000 px map with B bands; goal < 10 s for 1,000.

Run: python benchmarks/bench_places.py [--sites 192] [--zooms 1] [--polygons 1000] [--bands 7]
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

import torch  # noqa: E402
from pyproj import Transformer  # noqa: E402

from geo_fixtures import texture, utm_scene  # noqa: E402

X0, Y0, RES = 500_000.0, 5_600_000.0, 10.0
CRS = "EPSG:32633"


def bench_points(folder: Path, n_sites: int, zooms, embed_dim: int, depth: int, batch: int) -> dict:
    import pandas as pd

    from psm_mapping.model import PSM
    from psm_mapping.model.factory import make_checkpoint, make_tokenizer, tiny_clap_config
    from psm_mapping.places import PointsConfig, score_points
    from psm_mapping.places.embed import ChipSource, ImageModel
    from psm_mapping.imagery import open_source

    folder.mkdir(parents=True)
    margin = max(zooms) * 2560.0 / 2 + 200
    spread = 6000.0
    size = int((spread + 2 * margin) / RES) + 1
    scene = utm_scene(folder / "scene.tif", texture(size, size, seed=1, smooth_px=6), RES, origin=(X0, Y0), crs=CRS)
    cx, cy = X0 + size * RES / 2, Y0 - size * RES / 2
    rng = np.random.default_rng(0)
    x, y = cx + rng.uniform(-spread / 2, spread / 2, n_sites), cy + rng.uniform(-spread / 2, spread / 2, n_sites)
    lon, lat = Transformer.from_crs(CRS, 4326, always_xy=True).transform(x, y)
    sites = folder / "sites.csv"
    pd.DataFrame({"key": np.arange(n_sites), "latitude": lat, "longitude": lon}).to_csv(sites, index=False)
    ckpt = make_checkpoint(folder / "bench.ckpt", sat_type="sentinel", embed_dim=embed_dim, depth=depth,
                           num_heads=max(1, embed_dim // 64))
    tok = make_tokenizer(folder / "tok")
    clap = folder / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    cfg = PointsConfig(sites=str(sites), imagery=str(scene), checkpoint=str(ckpt), clap_config=str(clap),
                       tokenizer=str(tok), zoom_levels=tuple(zooms), queries=["birds chirping"], device="cpu",
                       progress=False, store=str(folder / "store"), batch_size=batch,
                       out=str(folder / "sites_scored.csv"))
    run = score_points(cfg, log_fn=lambda *a: None)
    # model only: the same chips, cut beforehand, through the same ImageModel
    model = PSM.from_checkpoint(ckpt, clap_config=str(clap), device="cpu")
    keys = np.column_stack([lon, lat])
    keys = np.unique(np.round(keys, 9), axis=0)
    with open_source(str(scene)) as src:
        chips = ChipSource(src, "sentinel", keys).read(slice(0, len(keys)), tuple(zooms))
    im = ImageModel(model, torch.device("cpu"), batch)
    im(chips["chips"][:batch], chips["zooms"][:batch])  # warm-up
    t0 = time.perf_counter()
    for s in range(0, len(chips["chips"]), 128):  # the store's site chunks
        im(chips["chips"][s:s + 128], chips["zooms"][s:s + 128])
    model_only = time.perf_counter() - t0
    embed = run.seconds["embed_total"]
    return {"sites": n_sites, "chips": run.chips, "embed_total_s": embed, "model_only_s": model_only,
            "sites_per_s": n_sites / embed, "overhead": (embed - model_only) / model_only,
            "query_and_table_s": run.seconds["query"], "run": run.seconds}


def bench_zonal(folder: Path, n_polygons: int, n_bands: int, side: int = 1000) -> dict:
    import geopandas as gpd
    from affine import Affine
    from pyproj import CRS as PCRS
    from shapely.geometry import Polygon

    from psm_mapping.outputs import MapBand, MapResult, write_cog
    from psm_mapping.places import write_zonal, zonal_stats
    from psm_mapping.places.zonal import load_zones, read_map

    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    kinds = ["similarity", "score", "uncertainty"]
    bands = []
    base = texture(side, side, seed=2, smooth_px=20)[0].astype(np.float32) / 255.0
    for i in range(n_bands):
        kind = kinds[i % 3]
        a = base + 0.01 * i if kind != "uncertainty" else 60 + 10 * base
        a = a.astype(np.float32)
        a[:50, :50] = np.nan
        bands.append(MapBand(f"{kind}:q{i}:z1" if kind != "uncertainty" else f"uncertainty:z{i}", a, kind, kind,
                             None, 1))
    t = Affine(40.0, 0.0, X0, 0.0, -40.0, Y0)
    path = folder / "map.tif"
    write_cog(MapResult(bands, PCRS.from_epsg(32633), t, {}), path)
    polys = []
    for cx, cy in rng.uniform(0, side * 40.0, (n_polygons, 2)):
        r = rng.uniform(200, 3000)
        k = rng.integers(5, 12)
        ang = np.sort(rng.uniform(0, 2 * np.pi, k))
        rad = r * rng.uniform(0.5, 1.0, k)
        polys.append(Polygon(np.column_stack([X0 + cx + rad * np.cos(ang), Y0 - cy + rad * np.sin(ang)])))
    zones = folder / "zones.gpkg"
    gpd.GeoDataFrame({"id": np.arange(n_polygons)}, geometry=polys, crs=32633).to_crs(4326).to_file(zones)
    t0 = time.perf_counter()
    write_zonal(path, zones, folder / "zonal.csv")
    total = time.perf_counter() - t0
    m, g = read_map(path), load_zones(zones)
    t1 = time.perf_counter()
    zonal_stats(m, g)
    stats = time.perf_counter() - t1
    return {"polygons": n_polygons, "bands": n_bands, "pixels": side * side, "total_s": total, "stats_only_s": stats}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=192)
    ap.add_argument("--zooms", default="1")
    ap.add_argument("--embed-dim", type=int, default=384)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--polygons", type=int, default=1000)
    ap.add_argument("--bands", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-points", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="4 sites, a 64-d 1-layer ViT, 10 polygons x 2 bands")
    a = ap.parse_args(argv)
    if a.smoke:
        a.sites, a.embed_dim, a.depth, a.polygons, a.bands = 4, 64, 1, 10, 2
    torch.set_num_threads(a.threads)
    folder = Path(tempfile.mkdtemp(prefix="bench-places-"))
    try:
        if not a.skip_points:
            p = bench_points(folder / "p", a.sites, [int(z) for z in a.zooms.split(",")], a.embed_dim, a.depth,
                             a.batch_size)
            print(f"points: {p['sites']} sites, {p['chips']} chips: embed total {p['embed_total_s']:.1f} s "
                  f"({p['sites_per_s']:.1f} sites/s) vs model only {p['model_only_s']:.1f} s: overhead "
                  f"{100 * p['overhead']:+.1f}% (goal <= 15%); query + table {p['query_and_table_s']:.2f} s")
        z = bench_zonal(folder / "z", a.polygons, a.bands, side=200 if a.smoke else 1000)
        print(f"zonal: {z['polygons']} polygons x {z['bands']} bands over {z['pixels']:,} px: {z['total_s']:.2f} s "
              f"end to end (read, coverage, stats, CSV), {z['stats_only_s']:.2f} s zonal_stats (goal < 10 s)")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
