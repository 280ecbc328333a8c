"""Places: scores at sites (``psm-map points``, point stores) and per polygon (``psm-map zonal``).

Through the real CLI and library on real files: a 16 km synthetic scene, a tiny checkpoint with the
metadata fuser, a 4 x 4 px map at zooms 1, 3, 5; sites at its pixel centres must give the map's
values; a point store is reused and survives kill -9; zonal statistics are checked against NumPy.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry import Polygon, box

from psm_mapping.cli import main
from psm_mapping.outputs import MapBand, MapResult, write_cog, write_zarr
from psm_mapping.places import PointsConfig, PointStore, read_provenance, score_points, zonal_stats
from psm_mapping.places.zonal import weighted_quantile
from psm_mapping.store import DONE

from servers import write_scene
from test_map_e2e import UTM, write_region

REPO = Path(__file__).resolve().parents[1]
LEFT, TOP, RES, SIZE = 490_000.0, 4_994_000.0, 32.0, 500  # 16 km square
CX, CY = LEFT + SIZE * RES / 2, TOP - SIZE * RES / 2
STRIDE = 200.0
ZOOMS = "1,3,5"
QUERIES = ("birds chirping", "rain on a roof")
TOL = 1e-4


# -- inputs ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inp(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    from psm_mapping.model.factory import tiny_clap_config

    d = tmp_path_factory.mktemp("places")
    scene = d / "scene.tif"
    write_scene(scene, UTM, LEFT, TOP, RES, SIZE, SIZE, seed=11)
    clap = d / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    region = write_region(d / "region.geojson", half_m=2 * STRIDE, shape="square", center=(CX, CY))
    zones = d / "zones.geojson"
    gpd.GeoDataFrame({"zone": ["west", "east"]}, geometry=[
        box(CX - 2 * STRIDE, CY - 2 * STRIDE, CX, CY + 2 * STRIDE),
        box(CX, CY - 2 * STRIDE, CX + 2 * STRIDE, CY)], crs=UTM).to_crs(4326).to_file(zones)
    return {"dir": d, "scene": scene, "clap": clap, "ckpt": tiny_ckpt, "tokenizer": tokenizer_dir,
            "region": region, "zones": zones}


def model_args(inp) -> list[str]:
    return ["--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]), "--tokenizer",
            str(inp["tokenizer"]), "--device", "cpu", "--quiet"]


def point_args(inp, sites, out, *extra) -> list[str]:
    return ["points", str(sites), "--imagery", str(inp["scene"]), "--zoom-level", ZOOMS, *model_args(inp),
            "--out", str(out), *[a for q in QUERIES for a in ("--query", q)], *extra]


@pytest.fixture(scope="module")
def mapped(inp):
    """A map of both queries at zooms 1, 3, 5 with scores, and the zonal table beside it."""
    out = inp["dir"] / "map" / "map.tif"
    out.parent.mkdir()
    args = [str(inp["region"]), "--imagery", str(inp["scene"]), "--zoom-level", ZOOMS, "--stride", f"{STRIDE:g}",
            *model_args(inp), "--out", str(out), "--no-previews", "--score", "--zones", str(inp["zones"]),
            *[a for q in QUERIES for a in ("--query", q)]]
    assert main(args) == 0
    with rasterio.open(out) as src:
        bands = {src.tags(i)["name"]: src.read(i) for i in src.indexes}
        transform = src.transform
    return {"out": out, "bands": bands, "transform": transform}


@pytest.fixture(scope="module")
def centres(inp, mapped):
    """Every map pixel's centre, as the authors' mapping CSV (key, latitude, longitude)."""
    b = mapped["bands"][f"similarity:{QUERIES[0]}:z1"]
    rows, cols = np.nonzero(np.isfinite(b))
    assert len(rows) == 16
    t = mapped["transform"]
    x, y = t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e
    lon, lat = Transformer.from_crs(UTM, 4326, always_xy=True).transform(x, y)
    csv = inp["dir"] / "authors.csv"
    pd.DataFrame({"key": [f"site{i}" for i in range(len(rows))], "latitude": lat, "longitude": lon,
                  "habitat": ["wood"] * len(rows)}).to_csv(csv, index=False)
    return {"csv": csv, "rows": rows, "cols": cols, "x": x, "y": y, "lon": lon, "lat": lat}


@pytest.fixture(scope="module")
def scored(inp, centres):
    out = inp["dir"] / "pts" / "sites.csv"
    out.parent.mkdir()
    assert main(point_args(inp, centres["csv"], out)) == 0
    return {"out": out, "table": pd.read_csv(out)}


# -- sites at pixel centres give the map's values --------------------------------------------
def test_sites_at_pixel_centres_equal_the_map(mapped, centres, scored):
    t = scored["table"]
    assert list(t.columns[:4]) == ["key", "latitude", "longitude", "habitat"]  # the input's columns kept
    assert t["valid"].all()
    r, c = centres["rows"], centres["cols"]
    checked = 0
    for z in (1, 3, 5):
        for q in QUERIES:
            for kind in ("similarity", "score"):
                name = f"{kind}:{q}:z{z}"
                np.testing.assert_allclose(t[name].to_numpy(), mapped["bands"][name][r, c], atol=TOL, rtol=0)
                checked += 1
        name = f"uncertainty:z{z}"
        np.testing.assert_allclose(t[name].to_numpy(), mapped["bands"][name][r, c], atol=TOL, rtol=0)
        # the sites differ (scores span 0..1), and a score amplifies a similarity error by 1 / its range
        score = t[f"score:{QUERIES[0]}:z{z}"]
        assert score.min() == 0 and score.max() == pytest.approx(1)
    assert checked == 12
    prov = read_provenance(scored["out"])
    assert prov["zoom_levels"] == "1,3,5" and prov["checkpoint_sha256"]
    assert "similarity:<query>:z<zoom>" in prov["columns"]


def test_sites_in_another_crs_give_the_same_table(inp, centres, scored, tmp_path):
    pts = gpd.GeoDataFrame({"key": [f"site{i}" for i in range(len(centres["x"]))]},
                           geometry=gpd.points_from_xy(centres["x"], centres["y"]), crs=UTM).to_crs(3857)
    sites = tmp_path / "sites_3857.gpkg"
    pts.to_file(sites)
    out = tmp_path / "sites.parquet"
    assert main(point_args(inp, sites, out, "--store", str(scored["out"].parent / "psm-store"))) == 0
    got = gpd.read_parquet(out)
    assert got.crs.equals(CRS.from_epsg(3857)) and got.geometry.geom_type.eq("Point").all()
    for z in (1, 3, 5):
        for q in QUERIES:
            np.testing.assert_allclose(got[f"similarity:{q}:z{z}"], scored["table"][f"similarity:{q}:z{z}"],
                                       atol=1e-5, rtol=0)
    assert read_provenance(out)["queries"].startswith("text:")
    # a GeoParquet in the map's UTM zone, through the library
    gp = tmp_path / "sites_utm.parquet"
    pts.to_crs(UTM).to_parquet(gp)
    run = score_points(PointsConfig(sites=str(gp), imagery=str(inp["scene"]), checkpoint=str(inp["ckpt"]),
                                    clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]), zoom_levels=(5,),
                                    queries=[QUERIES[1]], device="cpu", progress=False, store=str(tmp_path / "s")),
                       log_fn=lambda *a: None)
    np.testing.assert_allclose(run.table[f"similarity:{QUERIES[1]}:z5"], scored["table"][f"similarity:{QUERIES[1]}:z5"],
                               atol=1e-5, rtol=0)


def test_point_store_reuse_runs_no_image_inference(inp, centres, scored, tmp_path):
    store_root = scored["out"].parent / "psm-store"
    cfg = dict(sites=str(centres["csv"]), imagery=str(inp["scene"]), checkpoint=str(inp["ckpt"]),
               clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]), zoom_levels=(1, 3, 5),
               device="cpu", progress=False, store=str(store_root))
    again = score_points(PointsConfig(queries=["waves on the beach"], **cfg), log_fn=lambda *a: None)
    assert again.image_model_calls == 0 and again.chips == 0
    fresh = score_points(PointsConfig(queries=["waves on the beach"], **{**cfg, "store": str(tmp_path / "s")}),
                         log_fn=lambda *a: None)
    assert fresh.image_model_calls > 0 and fresh.chips == 16 * 3
    col = "similarity:waves on the beach:z3"
    np.testing.assert_allclose(again.table[col], fresh.table[col], atol=1e-5, rtol=0)
    # psm-map query POINT_STORE: the same numbers, a table by suffix, no imagery
    [store] = list(store_root.glob("points-*.zarr"))
    q = tmp_path / "q.gpkg"
    assert main(["query", str(store), "--query", "waves on the beach", *model_args(inp), "--sites",
                 str(centres["csv"]), "--out", str(q)]) == 0
    got = gpd.read_file(q)
    np.testing.assert_allclose(got[col], fresh.table[col], atol=1e-5, rtol=0)
    assert read_provenance(q)["point_store"] == str(store)
    assert main(["info", str(store)]) == 0


def test_duplicates_embedded_once_and_invalid_sites_flagged(inp, centres, tmp_path, capsys):
    lon, lat = list(centres["lon"][:3]), list(centres["lat"][:3])
    # a duplicate of site 0, and a site far outside the imagery (valid false, empty values)
    frame = pd.DataFrame({"name": ["a", "b", "c", "a again", "far"], "lon": lon + [lon[0], 20.0],
                          "lat": lat + [lat[0], 10.0], "month": [3, "", 7, 3, 1]})
    csv = tmp_path / "dups.csv"
    frame.to_csv(csv, index=False)
    run = score_points(PointsConfig(sites=str(csv), imagery=str(inp["scene"]), checkpoint=str(inp["ckpt"]),
                                    clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]), zoom_levels=(1,),
                                    queries=["birds"], device="cpu", progress=False, store=str(tmp_path / "s")),
                       log_fn=lambda *a: None)
    t = run.table
    assert run.distinct_sites == 4 and run.chips == 3  # the far site has no chip, the duplicate none of its own
    assert t["valid"].tolist() == [True, True, True, True, False] and run.invalid_sites == 1
    assert np.isnan(t["similarity:birds:z1"].iloc[4]) and t["valid_fraction:z1"].iloc[4] == 0
    assert t["similarity:birds:z1"].iloc[3] == t["similarity:birds:z1"].iloc[0]
    # per-site month feeds fusion: site b (no month) differs from a run with month 7 for all
    out = tmp_path / "m.csv"
    assert main(["points", str(csv), "--imagery", str(inp["scene"]), "--zoom-level", "1", *model_args(inp),
                 "--query", "birds", "--month", "7", "--out", str(out), "--store", str(tmp_path / "s")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "1 of 5 sites have empty values" in err[-1]
    m7 = pd.read_csv(out)["similarity:birds:z1"]
    assert m7.iloc[2] == pytest.approx(t["similarity:birds:z1"].iloc[2], abs=1e-6)  # month 7 in the column
    assert abs(m7.iloc[1] - t["similarity:birds:z1"].iloc[1]) > 1e-6  # unknown -> --month 7


def test_kill_minus_9_and_resume_gives_the_same_table(inp, tmp_path):
    rng = np.random.default_rng(3)
    x, y = CX + rng.uniform(-3000, 3000, 500), CY + rng.uniform(-3000, 3000, 500)
    lon, lat = Transformer.from_crs(UTM, 4326, always_xy=True).transform(x, y)
    csv = tmp_path / "many.csv"
    pd.DataFrame({"lon": lon, "lat": lat}).to_csv(csv, index=False)
    store_root = tmp_path / "killed"
    args = ["points", str(csv), "--imagery", str(inp["scene"]), "--zoom-level", "1", *model_args(inp), "--query",
            "birds", "--batch-size", "8", "--store", str(store_root), "--out", str(tmp_path / "killed.csv")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from psm_mapping.cli import main; "
                             "sys.exit(main(sys.argv[1:]))", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = 0
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            stores = list(store_root.glob("points-*.zarr"))
            if stores:
                try:
                    done = int((PointStore.open(str(stores[0])).status() == DONE).sum())
                except Exception:  # being created
                    done = 0
                if done:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 < done < 500
    assert not (tmp_path / "killed.csv").exists()  # nothing at the final name
    assert main(args) == 0  # resume
    store = PointStore.open(str(next(store_root.glob("points-*.zarr"))))
    assert (store.status() == DONE).all()
    clean = tmp_path / "clean.csv"
    assert main([*args[:-4], "--store", str(tmp_path / "clean"), "--out", str(clean)]) == 0
    a, b = pd.read_csv(tmp_path / "killed.csv"), pd.read_csv(clean)
    pd.testing.assert_frame_equal(a, b, check_exact=False, atol=1e-6, rtol=0)


# -- zonal -----------------------------------------------------------------------------------
ZT = Affine(10.0, 0.0, 500_000.0, 0.0, -10.0, 5_000_000.0)  # 10 m pixels


def synthetic_map(folder: Path, fmt: str = "cog") -> tuple[Path, dict]:
    rng = np.random.default_rng(5)
    H, W = 40, 50
    sim = (-2.0 + rng.random((H, W))).astype(np.float32)
    sim[:3, :4] = np.nan  # nodata pixels inside a zone
    unc = (60 + 10 * rng.random((H, W))).astype(np.float32)
    lo, hi = np.nanmin(sim), np.nanmax(sim)
    score = ((sim - lo) / (hi - lo)).astype(np.float32)
    bands = [MapBand("similarity:birds:z1", sim, "sim", "similarity", "birds", 1),
             MapBand("score:birds:z1", score, "score", "score", "birds", 1),
             MapBand("uncertainty:z1", unc, "unc", "uncertainty", None, 1)]
    result = MapResult(bands, CRS.from_epsg(32632), ZT, {"checkpoint_sha256": "abc"})
    path = folder / ("m.tif" if fmt == "cog" else "m.zarr")
    (write_cog if fmt == "cog" else write_zarr)(result, path)
    return path, {"similarity:birds:z1": sim, "score:birds:z1": score, "uncertainty:z1": unc}


def pixel_box(r0, r1, c0, c1):
    return box(ZT.c + c0 * 10, ZT.f - r1 * 10, ZT.c + c1 * 10, ZT.f - r0 * 10)


def test_zonal_exact_on_aligned_polygons(tmp_path):
    path, arrays = synthetic_map(tmp_path)
    spans = [(0, 10, 0, 10), (5, 25, 12, 40), (30, 40, 45, 50)]
    zones = gpd.GeoDataFrame({"name": ["nw", "mid", "se"]}, geometry=[pixel_box(*s) for s in spans], crs=32632)
    zones = pd.concat([zones, gpd.GeoDataFrame({"name": ["outside"]}, geometry=[
        box(0, 0, 100, 100)], crs=32632)], ignore_index=True)
    t = zonal_stats(path, zones, threshold=0.6)
    assert t["name"].tolist() == ["nw", "mid", "se", "outside"]
    for i, (r0, r1, c0, c1) in enumerate(spans):
        for band, a in arrays.items():
            v = a[r0:r1, c0:c1].astype(np.float64).ravel()
            v = v[np.isfinite(v)]
            assert t[f"{band}:count"][i] == len(v)
            assert t[f"{band}:area"][i] == pytest.approx(len(v) * 100.0, rel=1e-12)
            assert t[f"{band}:mean"][i] == pytest.approx(v.mean(), rel=1e-12)
            assert t[f"{band}:min"][i] == v.min() and t[f"{band}:max"][i] == v.max()
            for s, q in (("median", 0.5), ("p10", 0.1), ("p90", 0.9)):
                assert t[f"{band}:{s}"][i] == pytest.approx(np.quantile(v, q), rel=1e-12)
        s = arrays["score:birds:z1"][r0:r1, c0:c1]
        s = s[np.isfinite(s)]
        assert t["score:birds:z1:frac_above"][i] == pytest.approx((s > 0.6).mean(), rel=1e-12)
        assert t["similarity:birds:z1:frac_above"][i] == pytest.approx((s > 0.6).mean(), abs=1e-6)
    assert "uncertainty:z1:frac_above" not in t.columns
    assert t["similarity:birds:z1:count"][3] == 0 and np.isnan(t["similarity:birds:z1:mean"][3])
    assert t["similarity:birds:z1:count"][0] == 100 - 12  # the NaN pixels are not counted


def test_zonal_partial_coverage_on_a_diagonal_polygon(tmp_path):
    path, arrays = synthetic_map(tmp_path)
    n, r0, c0 = 12, 20, 20  # a right triangle whose hypotenuse runs through pixel corners
    x0, y0 = ZT.c + c0 * 10, ZT.f - (r0 + n) * 10  # bottom-left corner
    tri = Polygon([(x0, y0), (x0 + n * 10, y0), (x0, y0 + n * 10)])
    t = zonal_stats(path, gpd.GeoDataFrame({"k": [1]}, geometry=[tri], crs=32632))
    # pixel (i, j) of the n x n block (i from the bottom): inside when i + j < n - 1, half on the diagonal
    a = arrays["similarity:birds:z1"][r0:r0 + n, c0:c0 + n][::-1].astype(np.float64)
    ii, jj = np.mgrid[0:n, 0:n]
    w = np.where(ii + jj < n - 1, 1.0, np.where(ii + jj == n - 1, 0.5, 0.0))
    assert t["similarity:birds:z1:count"][0] == pytest.approx(w.sum(), rel=1e-9) == n * n / 2
    assert t["similarity:birds:z1:mean"][0] == pytest.approx((w * a).sum() / w.sum(), rel=1e-9)
    sel = w > 0
    o = np.argsort(a[sel])
    assert t["similarity:birds:z1:median"][0] == pytest.approx(weighted_quantile(a[sel][o], w[sel][o], 0.5), rel=1e-9)
    assert t["similarity:birds:z1:min"][0] == a[sel].min()
    # exactextract's own weighted median agrees with ours
    from exactextract import exact_extract

    with rasterio.open(path) as src:
        ref = exact_extract(src, gpd.GeoDataFrame({"k": [1]}, geometry=[tri], crs=32632), ["median"],
                            output="pandas")
    assert ref["band_1_median" if "band_1_median" in ref else "median"][0] == pytest.approx(
        t["similarity:birds:z1:median"][0], abs=1e-6)


def test_zonal_cli_cog_and_zarr_agree_and_map_zones_table(inp, mapped, tmp_path):
    path, _ = synthetic_map(tmp_path)
    zpath, _ = synthetic_map(tmp_path, "zarr")
    zones = tmp_path / "z.geojson"
    gpd.GeoDataFrame({"name": ["a"]}, geometry=[pixel_box(2, 30, 3, 33)], crs=32632).to_crs(4326).to_file(zones)
    a, b = tmp_path / "a.csv", tmp_path / "b.parquet"
    assert main(["zonal", str(path), str(zones), "--out", str(a), "--quiet"]) == 0
    assert main(["zonal", str(zpath), str(zones), "--out", str(b), "--quiet"]) == 0
    ta, tb = pd.read_csv(a), gpd.read_parquet(b)
    assert ta["name"][0] == "a" and "geometry" in ta.columns
    np.testing.assert_allclose(ta["similarity:birds:z1:mean"], tb["similarity:birds:z1:mean"], rtol=1e-9)
    assert json.loads((tmp_path / "a.csv.provenance.json").read_text())["checkpoint_sha256"] == "abc"
    # psm-map REGION --zones: the same table as psm-map zonal of that map
    beside = Path(str(mapped["out"]) + ".zonal.csv")
    again = tmp_path / "again.csv"
    assert main(["zonal", str(mapped["out"]), str(inp["zones"]), "--out", str(again), "--quiet"]) == 0
    pd.testing.assert_frame_equal(pd.read_csv(beside), pd.read_csv(again))
    np.testing.assert_allclose(pd.read_csv(again)[f"similarity:{QUERIES[0]}:z1:count"], [8.0, 4.0], atol=1e-6)


# -- bad input: exit 2, one line, nothing written ----------------------------------------------
def _bad(capsys, args, out: Path, *needles: str) -> None:
    rc = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    for n in needles:
        assert n in err[0], err[0]
    assert not out.exists() and not (out.parent / "psm-store").exists()


@pytest.mark.parametrize("content,needles", [
    ("key,x,y\na,1,2\n", ("no longitude column", "--lon-col")),
    ("key,lat,lon\na,45,7\nb,45,seven\n", ("not a number", "row 2")),
    ("key,lat,lon\na,45,7\nb,95,7\nc,-91,7\n", ("out of range", "rows 2, 3")),
    ("", ("empty",)),
])
def test_bad_sites_csv(inp, tmp_path, capsys, content, needles):
    csv = tmp_path / "bad.csv"
    csv.write_text(content)
    out = tmp_path / "o" / "t.csv"
    out.parent.mkdir()
    _bad(capsys, point_args(inp, csv, out), out, *needles)


def test_bad_layers_and_maps(inp, tmp_path, capsys):
    out = tmp_path / "o" / "t.csv"
    out.parent.mkdir()
    _bad(capsys, point_args(inp, inp["zones"], out), out, "not points", "zonal")
    pts = tmp_path / "pts.geojson"
    gpd.GeoDataFrame({"k": [1]}, geometry=gpd.points_from_xy([7.0], [45.0]), crs=4326).to_file(pts)
    path, _ = synthetic_map(tmp_path)
    _bad(capsys, ["zonal", str(path), str(pts), "--out", str(out)], out, "not polygons", "points")
    _bad(capsys, ["zonal", str(inp["scene"]), str(inp["zones"]), "--out", str(out)], out, "not a psm-map output")
    _bad(capsys, ["zonal", str(path), str(inp["zones"]), "--out", str(tmp_path / "o" / "t.xlsx")],
         tmp_path / "o" / "t.xlsx", "*.csv")


def test_infonce_sites_use_cosine_like_the_map(inp, centres, ckpt_factory, tmp_path):
    ckpt = ckpt_factory(sat_type="sentinel", metadata_type="none", probabilistic=False)
    common = ["--imagery", str(inp["scene"]), "--zoom-level", "1", "--checkpoint", str(ckpt), "--clap-config",
              str(inp["clap"]), "--tokenizer", str(inp["tokenizer"]), "--device", "cpu", "--quiet", "--query", "birds"]
    m = tmp_path / "m.tif"
    assert main([str(inp["region"]), *common, "--stride", f"{STRIDE:g}", "--no-previews", "--out", str(m)]) == 0
    out = tmp_path / "t.geojson"
    assert main(["points", str(centres["csv"]), *common, "--out", str(out)]) == 0
    t = gpd.read_file(out)
    assert not [c for c in t.columns if c.startswith("uncertainty")]
    with rasterio.open(m) as src:
        sim = src.read(1)
    got = t["similarity:birds:z1"].to_numpy()
    np.testing.assert_allclose(got, sim[centres["rows"], centres["cols"]], atol=TOL, rtol=0)
    assert np.all(np.abs(got) <= 1 + 1e-6) and np.ptp(got) > 0
    assert json.loads(Path(str(out) + ".provenance.json").read_text())["loss_type"] == "infonce"


def test_sites_from_a_tile_server(inp, centres, tmp_path):
    """XYZ imagery as for maps: sites get values, and a map of the same server agrees at its pixels."""
    from servers import SceneTiles, TileServer

    common = ["--zoom-level", "1", *model_args(inp), "--query", "birds", "--imagery-option", "retries=1",
              "--store", str(tmp_path / "s")]
    with TileServer(SceneTiles(inp["scene"])) as srv:
        xyz = "xyz:" + srv.template()
        out = tmp_path / "t.csv"
        assert main(["points", str(centres["csv"]), "--imagery", xyz, *common, "--out", str(out)]) == 0
        m = tmp_path / "m.tif"
        assert main([str(inp["region"]), "--imagery", xyz, *common, "--stride", f"{STRIDE:g}", "--no-previews",
                     "--out", str(m)]) == 0
    t = pd.read_csv(out)
    assert t["valid"].all()
    with rasterio.open(m) as src:
        sim = src.read(1)
    np.testing.assert_allclose(t["similarity:birds:z1"], sim[centres["rows"], centres["cols"]], atol=TOL, rtol=0)
