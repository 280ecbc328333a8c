"""Issue 19, findings 8, 9 and 11: bad input to the newer commands, through the real CLI.

Every refusal is exit code 2 and one line ``psm-map: error: ...``, nothing written; a ``--store`` that is a
store is used or refused, never written into; a missing chunk of a computed block is corruption; negative
coordinates are values; two runs on one point store compute each chunk once. The inputs are
test_places.py's (a 16 km scene, a tiny checkpoint with the metadata fuser, a 4 x 4 px map at zooms 1, 3, 5).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from pyproj import Transformer
from shapely.geometry import Polygon, box

from psm_mapping.cli import main
from psm_mapping.places import PointStore, zonal_stats

from servers import write_scene
from test_map_e2e import write_region
from test_places import (CX, CY, QUERIES, REPO, STRIDE, UTM, ZOOMS, centres, inp, mapped,  # noqa: F401 (fixtures)
                         model_args, point_args)


def fingerprint(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error: "), (rc, err)
    for n in needles:
        assert n.lower() in err[0].lower(), (n, err[0])
    return err[0]


def map_args(inp, out: Path, *extra: str) -> list[str]:
    return [str(inp["region"]), "--imagery", str(inp["scene"]), "--zoom-level", ZOOMS, "--stride", f"{STRIDE:g}",
            *model_args(inp), "--out", str(out), "--no-previews", *[a for q in QUERIES for a in ("--query", q)],
            *extra]


def query_args(inp, store: Path, out: Path, *extra: str) -> list[str]:
    return ["query", str(store), "--query", QUERIES[0], *model_args(inp), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def store(mapped) -> Path:
    """The embedding store of test_places' map (every block DONE)."""
    (zs,) = (mapped["out"].parent / "psm-store").glob("*.zarr")
    return zs


def band1(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


# -- 8: --store given a store's own .zarr folder ------------------------------------------------------
def test_store_given_its_own_folder_is_used_or_refused(inp, mapped, store, tmp_path, capsys):
    before = fingerprint(store.parent)
    out = tmp_path / "same.tif"
    assert main(map_args(inp, out, "--store", str(store))) == 0  # the same settings: this store, as is
    assert np.array_equal(band1(out), band1(mapped["out"]), equal_nan=True)
    assert not list(store.glob("*.zarr")) and not list(store.parent.glob(f"{store.name}/**/*.zarr"))
    assert fingerprint(store.parent) == before  # nothing to compute: nothing written
    # other settings: refused, naming what differs, nothing nested or written
    other = map_args(inp, tmp_path / "other.tif", "--store", str(store))
    other[other.index("--stride") + 1] = "300"
    one_line(capsys, other, "stride 300 vs 200", "--store")
    other = map_args(inp, tmp_path / "other.tif", "--store", str(store), "--min-valid", "0.7")
    one_line(capsys, other, "min valid 0.7 vs 0.5")
    assert fingerprint(store.parent) == before and not (tmp_path / "other.tif").exists()


# -- 11: a deleted chunk of a DONE block is corruption -------------------------------------------------
def test_deleted_mean_chunk_is_corruption(inp, mapped, store, centres, tmp_path, capsys):
    copy = tmp_path / "stores" / store.name
    shutil.copytree(store, copy)
    chunk = copy / "mean" / "c" / "0" / "0" / "0" / "0"  # zoom 1, the only block
    assert chunk.is_file()
    chunk.unlink()
    one_line(capsys, query_args(inp, copy, tmp_path / "q.tif"), "missing", "mean", "rerun")
    assert not (tmp_path / "q.tif").exists()
    # a profile re-fuses from z_img (the mean is not read): its missing chunk is the one that matters there
    point = f"{centres['lon'][0]:.6f},{centres['lat'][0]:.6f}"
    (copy / "z_img" / "c" / "0" / "0" / "0" / "0").unlink()
    one_line(capsys, query_args(inp, copy, tmp_path / "p.csv", "--point", point), "missing", "z_img", "rerun")
    assert not (tmp_path / "p.csv").exists()
    # the map run finds it and computes that block again: the map of the intact store
    out = tmp_path / "m.tif"
    args = map_args(inp, out, "--store", str(copy.parent))
    args.remove("--quiet")
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "corrupt" in err and re.search(r"chips embedded (\d+)", err).group(1) == str(16 * 3), err
    assert chunk.is_file() and np.array_equal(band1(out), band1(mapped["out"]), equal_nan=True)


def test_deleted_point_store_chunk_is_corruption(inp, centres, tmp_path, capsys):
    csv = tmp_path / "s.csv"
    pd.DataFrame({"lon": centres["lon"][:3], "lat": centres["lat"][:3]}).to_csv(csv, index=False)
    out, root = tmp_path / "t.csv", tmp_path / "ps"
    assert main(point_args(inp, csv, out, "--store", str(root))) == 0
    ref = pd.read_csv(out)
    (ps,) = root.glob("points-*.zarr")
    (ps / "z_img" / "c" / "0" / "0" / "0").unlink()
    one_line(capsys, ["query", str(ps), "--query", QUERIES[0], *model_args(inp), "--out", str(tmp_path / "q.csv")],
             "missing", "rerun")
    assert not (tmp_path / "q.csv").exists()
    args = point_args(inp, csv, out, "--store", str(root), "--overwrite")
    args.remove("--quiet")
    assert main(args) == 0  # psm-map points computes the chunk again
    assert "chips embedded 9;" in capsys.readouterr().err
    pd.testing.assert_frame_equal(pd.read_csv(out), ref, check_exact=False, atol=1e-6, rtol=0)
    # --store naming the point store itself: used as is with its settings, refused (naming them) with others
    before = fingerprint(root)
    assert main(point_args(inp, csv, tmp_path / "again.csv", "--store", str(ps))) == 0
    assert fingerprint(root) == before and not list(ps.glob("points-*"))
    other = point_args(inp, csv, tmp_path / "other.csv", "--store", str(ps))
    other[other.index("--zoom-level") + 1] = "1"
    one_line(capsys, other, "zoom levels 1 vs 1,3,5", "--store")
    assert fingerprint(root) == before and not (tmp_path / "other.csv").exists()


# -- 11: negative coordinates ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def west(tmp_path_factory):
    """A 16 km scene around lon -90.3, lat 38.6 (UTM 15N): every coordinate negative in longitude."""
    d = tmp_path_factory.mktemp("west")
    crs = "EPSG:32615"
    x, y = Transformer.from_crs(4326, crs, always_xy=True).transform(-90.3, 38.6)
    scene = d / "west.tif"
    write_scene(scene, crs, x - 8000.0, y + 8000.0, 32.0, 500, 500, seed=4)
    return scene


def test_negative_coordinates_in_every_option(inp, west, tmp_path, capsys):
    out = tmp_path / "w.tif"
    common = ["--imagery", str(west), "--zoom-level", "1", "--stride", f"{STRIDE:g}", *model_args(inp),
              "--no-previews", "--query", QUERIES[0], "--store", str(tmp_path / "s")]
    assert main(["--bbox", "-90.302,38.598,-90.298,38.602", *common, "--out", str(out)]) == 0
    sim = band1(out)
    assert np.isfinite(sim).sum() >= 4  # pixels whose centre is inside the box
    (zs,) = (tmp_path / "s").glob("*.zarr")
    prof = tmp_path / "p.csv"
    assert main(query_args(inp, zs, prof, "--point", "-90.3,38.6", "--months", "1,7", "--hours", "6")) == 0
    t = pd.read_csv(prof)
    assert len(t) == 2 and np.isfinite(t.select_dtypes("number").to_numpy()).all(), t
    # abbreviations (argparse allows them) and the = form keep working; a bad value is still one line
    assert main(["--bb=-90.302,38.598,-90.298,38.602", *common, "--out", str(tmp_path / "w2.tif")]) == 0
    assert np.array_equal(band1(tmp_path / "w2.tif"), sim, equal_nan=True)
    one_line(capsys, query_args(inp, zs, tmp_path / "x.csv", "--point", "-190,38.6"), "-190")


def test_negative_values_parse_for_every_one_value_option():
    """The parser joins a negative-looking value to every option that takes one value (coordinates,
    numbers): what argparse alone refuses as 'expected one argument'."""
    from psm_mapping.cli.map import map_parser

    p = map_parser()
    a = p.parse_args(["--bbox", "-91,38,-90,39", "--stride", "-40", "--min-valid", "-.5", "--query", "-3 dB"])
    assert (a.bbox, a.stride, a.min_valid, a.query) == ("-91,38,-90,39", -40.0, -0.5, ["-3 dB"])
    # a flag without a value keeps its meaning; the next option is not swallowed
    a = p.parse_args(["--overwrite", "--bbox", "-1,2,3,4"])
    assert a.overwrite and a.bbox == "-1,2,3,4"


# -- 11: tracebacks that are one line now ----------------------------------------------------------------
def test_zonal_on_a_cube_and_on_a_store(inp, store, tmp_path, capfd):
    cube = tmp_path / "cube.zarr"
    assert main(query_args(inp, store, cube, "--months", "1,7")) == 0
    capfd.readouterr()

    def line(argv, *needles):
        rc = main(argv)
        err = capfd.readouterr().err.strip().splitlines()  # fd level: zarr's warnings included
        assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error: "), err
        for n in needles:
            assert n in err[0], err[0]

    out = tmp_path / "z.csv"
    line(["zonal", str(cube), str(inp["zones"]), "--out", str(out)], "cube", "--month")
    line(["zonal", str(store), str(inp["zones"]), "--out", str(out)], "embedding store", "psm-map query")
    assert not out.exists()


def _zones_file(path: Path, geoms, crs=UTM) -> Path:
    gpd.GeoDataFrame({"zone": [f"z{i}" for i in range(len(geoms))]}, geometry=geoms, crs=crs).to_file(path)
    return path


def test_zones_with_a_null_geometry(inp, mapped, tmp_path, capsys):
    zones = tmp_path / "null.geojson"
    zones.write_text(json.dumps({"type": "FeatureCollection", "features": [
        json.loads(gpd.read_file(inp["zones"]).iloc[:1].to_json())["features"][0],
        {"type": "Feature", "properties": {"zone": "nothing"}, "geometry": None}]}))
    out = tmp_path / "z.csv"
    one_line(capsys, ["zonal", str(mapped["out"]), str(zones), "--out", str(out)], "without a geometry", "row 2")
    m1 = tmp_path / "m1.tif"
    one_line(capsys, map_args(inp, m1, "--zones", str(zones)), "without a geometry", "--zones")
    assert not out.exists() and not m1.exists() and not (tmp_path / "psm-store").exists()


def warnings_said(capsys, caplog) -> list[str]:
    """What the user reads besides errors: stderr lines and log warnings (the CLI prints those as
    ``WARNING: ...``; under pytest the log is captured apart)."""
    return capsys.readouterr().err.strip().splitlines() + [r.getMessage() for r in caplog.records
                                                          if r.levelname == "WARNING"]


def test_self_intersecting_zone_is_repaired_and_said(mapped, tmp_path, capsys, caplog):
    h = 2 * STRIDE
    bowtie = Polygon([(CX - h, CY - h), (CX + h, CY + h), (CX + h, CY - h), (CX - h, CY + h)])
    assert not bowtie.is_valid
    zones = _zones_file(tmp_path / "bowtie.geojson", [bowtie])
    out = tmp_path / "z.csv"
    assert main(["zonal", str(mapped["out"]), str(zones), "--out", str(out), "--quiet"]) == 0
    err = warnings_said(capsys, caplog)
    assert len(err) == 1 and "make_valid" in err[0] and "invalid polygon" in err[0], err
    col = f"similarity:{QUERIES[0]}:z1:count"
    got = pd.read_csv(out)[col][0]
    fixed = gpd.GeoDataFrame({"zone": ["z0"]}, geometry=[shapely.make_valid(bowtie)], crs=UTM).to_crs(4326)
    want = zonal_stats(mapped["out"], fixed)[col][0]
    assert got == pytest.approx(want, abs=1e-9) and want == pytest.approx(8.0, abs=1e-6)  # two 2x2 px triangles


def test_zones_missing_the_map(inp, mapped, tmp_path, capsys, caplog):
    far = box(CX + 20_000, CY, CX + 21_000, CY + 1000)
    zones = _zones_file(tmp_path / "far.geojson", [far, far])
    out = tmp_path / "z.csv"
    one_line(capsys, ["zonal", str(mapped["out"]), str(zones), "--out", str(out)], "none of the 2 zones", "overlaps")
    m = tmp_path / "m.tif"
    one_line(capsys, map_args(inp, m, "--zones", str(zones)), "none of the 2 zones", "--zones")
    assert not out.exists() and not m.exists()
    # some zones off the map: a warning, their rows empty
    near = box(CX - STRIDE, CY - STRIDE, CX + STRIDE, CY + STRIDE)
    zones = _zones_file(tmp_path / "some.geojson", [near, far])
    caplog.clear()
    assert main(["zonal", str(mapped["out"]), str(zones), "--out", str(out), "--quiet"]) == 0
    err = warnings_said(capsys, caplog)
    assert len(err) == 1 and "1 of 2 zones do not overlap the map (row 2)" in err[0], err
    assert pd.read_csv(out)[f"similarity:{QUERIES[0]}:z1:count"].tolist() == pytest.approx([4.0, 0.0])


def test_sites_missing_the_imagery(inp, tmp_path, capsys):
    csv = tmp_path / "far.csv"
    pd.DataFrame({"lon": [20.0, 20.1], "lat": [10.0, 10.1]}).to_csv(csv, index=False)
    out = tmp_path / "t.csv"
    one_line(capsys, point_args(inp, csv, out, "--store", str(tmp_path / "s")), "none of the 2 sites",
             "imagery")
    assert not out.exists() and not list((tmp_path / "s").glob("points-*")) if (tmp_path / "s").exists() else True


def test_sites_with_disagreeing_coordinate_columns(inp, centres, tmp_path, capsys):
    lon, lat = centres["lon"][:2], centres["lat"][:2]
    csv = tmp_path / "two.csv"
    pd.DataFrame({"lon": lon, "longitude": lon + 0.01, "lat": lat}).to_csv(csv, index=False)
    out = tmp_path / "t.csv"
    one_line(capsys, point_args(inp, csv, out), "two longitude columns", "'lon' and 'longitude'", "--lon-col")
    csv.write_text(pd.DataFrame({"lat": lat, "lon": lon, "latitude": -lat}).to_csv(index=False))
    one_line(capsys, point_args(inp, csv, out), "two latitude columns", "--lat-col")
    assert not out.exists()


def test_info_on_a_store_with_truncated_metadata(store, tmp_path, capsys):
    copy = tmp_path / store.name
    shutil.copytree(store, copy)
    meta = copy / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    one_line(capsys, ["info", str(copy)], "zarr.json", "not readable json", "remove the folder")


def test_convert_into_a_folder_no_file_can_be_made_in(inp, tmp_path, capsys):
    """/proc: read-only to root too (chmod does not stop root, so a read-only folder is this one)."""
    one_line(capsys, ["convert", str(inp["ckpt"]), "/proc/psm-test.safetensors"], "/proc", "cannot write")
    assert not Path("/proc/psm-test.safetensors").exists()


# -- 9: two runs on one point store compute each chunk once --------------------------------------------
def test_two_points_runs_on_one_store_compute_each_chunk_once(inp, tmp_path):
    rng = np.random.default_rng(9)
    n = 512  # 4 site chunks
    x, y = CX + rng.uniform(-3000, 3000, n), CY + rng.uniform(-3000, 3000, n)
    lon, lat = Transformer.from_crs(UTM, 4326, always_xy=True).transform(x, y)
    csv = tmp_path / "many.csv"
    pd.DataFrame({"lon": lon, "lat": lat}).to_csv(csv, index=False)
    root = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmds = []
    for name in ("a", "b"):
        args = point_args(inp, csv, tmp_path / f"{name}.csv", "--store", str(root), "--batch-size", "16")
        args[args.index("--zoom-level") + 1] = "1"
        args.remove("--quiet")
        cmds.append([sys.executable, "-m", "psm_mapping.cli", *args])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for c in cmds]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errs]
    chips = [int(re.search(r"chips embedded ([\d,]+);", e).group(1).replace(",", "")) for e in errs]
    assert sum(chips) == n, (chips, errs)  # every site embedded once, by one of the runs
    (ps,) = root.glob("points-*.zarr")
    assert not list(root.glob(".*tmp*")) and not list(root.glob("*.locks/*.lock"))  # locks released
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a.csv"), pd.read_csv(tmp_path / "b.csv"))
    assert (PointStore.open(str(ps)).status() == 1).all()
