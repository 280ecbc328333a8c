"""psm-map assess: maps scored against field observations.

The figures are checked against independent computations (pair counts for AUC, pandas for the
correlations, a plain-Python transcription of ecospat's published ``ecospat.boyce`` for the Boyce
index); the block bootstrap's coverage in a seeded simulation; a real COG through the real CLI
(JSON, table, HTML with its images); store scoring against ``psm-map points`` at each site's
month and hour; bad inputs: exit 2, one line, nothing written.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from psm_mapping.assessment import metrics
from psm_mapping.assessment.bootstrap import percentile_interval, spatial_blocks


# -- AUC -------------------------------------------------------------------------------------
def pair_count_auc(scores, positive) -> float:
    """O(n^2): the share of (presence, absence) pairs ranked right, ties half."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_pair_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 300
    scores = rng.integers(0, 12, n).astype(float)  # many ties
    positive = rng.random(n) < 0.3 + 0.04 * scores
    got = metrics.auc(scores, positive)
    assert got == pytest.approx(pair_count_auc(scores, positive), abs=1e-12)
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        pass
    else:
        assert got == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)
    # weights are multiplicities: the weighted AUC is the AUC of the repeated data
    w = rng.integers(0, 4, n)
    rep = np.repeat(np.arange(n), w)
    assert metrics.auc(scores, positive, w) == pytest.approx(pair_count_auc(scores[rep], positive[rep]), abs=1e-12)
    assert 0.5 < got < 1  # the data carry signal: a broken sign would fail
    # the ROC curve's trapezoid area is the AUC
    fpr, tpr = metrics.roc_curve(scores, positive)
    assert np.trapezoid(tpr, fpr) == pytest.approx(got, abs=1e-12)


# -- correlations ------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 5])
def test_pearson_and_spearman_equal_pandas(seed):
    """Within 1e-12 of pandas (SciPy is not installed here; pandas' corr and rank are an
    independent implementation)."""
    rng = np.random.default_rng(seed)
    x = np.round(rng.normal(size=400), 1)  # ties in both
    y = np.round(x + rng.normal(size=400), 1)
    sx, sy = pd.Series(x), pd.Series(y)
    assert abs(metrics.pearson(x, y) - sx.corr(sy, method="pearson")) < 1e-12
    # Spearman: pandas' Pearson of pandas' average ranks (pandas' own spearman needs SciPy)
    assert abs(metrics.spearman(x, y) - sx.rank().corr(sy.rank())) < 1e-12
    w = rng.integers(0, 3, 400)
    rep = np.repeat(np.arange(400), w)
    assert abs(metrics.spearman(x, y, w) - sx[rep].rank().corr(sy[rep].rank())) < 1e-12
    assert abs(metrics.pearson(x, y, w) - sx[rep].corr(sy[rep], method="pearson")) < 1e-12


# -- Boyce -------------------------------------------------------------------------------------
def ecospat_boyce_reference(fit, obs, res=100):
    """ecospat::ecospat.boyce(fit, obs) with its defaults (nclass = 0, window.w = "default",
    res = 100, rm.duplicate = TRUE, method = "spearman"), transcribed step by step from the
    published R source (ecospat 3.2+, CRAN; Hirzel et al. 2006) into plain Python."""
    fit, obs = list(map(float, fit)), list(map(float, obs))
    mini, maxi = min(fit + obs), max(fit + obs)
    window_w = (max(fit) - min(fit)) / 10
    by = (maxi - mini - window_w) / res
    vec_mov = [mini + i * by for i in range(res + 1)]  # seq(from = mini, to = maxi - window.w, by)
    vec_mov[res] = vec_mov[res] + 1  # "trick to avoid error with closed interval in R"
    f, kept_mov = [], []
    for lo in vec_mov:
        hi = lo + window_w
        p = sum(1 for o in obs if lo <= o <= hi) / len(obs)
        e = sum(1 for v in fit if lo <= v <= hi) / len(fit)
        if e == 0 and p == 0:
            continue  # NaN: dropped
        ratio = math.inf if e == 0 else round(p / e, 10)
        f.append(ratio)
        kept_mov.append(lo)
    nxt = f[1:] + [1.0]  # f != c(f[-1], TRUE)
    r = [i for i in range(len(f)) if f[i] != nxt[i]]
    a, b = [f[i] for i in r], [kept_mov[i] for i in r]

    def ranks(v):  # R's rank(): ties get their average rank
        return [sum(1 for u in v if u < x) + (sum(1 for u in v if u == x) + 1) / 2 for x in v]

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    num = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return num / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_boyce_equals_the_ecospat_reference_on_a_fixed_case():
    rng = np.random.default_rng(42)
    fit = np.round(rng.beta(2, 2, 2000), 3)  # background suitability
    obs = np.round(rng.beta(4, 2, 150), 3)  # presences favour high suitability
    got = metrics.boyce(fit, obs)
    ref = ecospat_boyce_reference(fit, obs)
    assert abs(got.index - ref) < 1e-12
    assert 0.8 < got.index <= 1.0
    assert got.window_width == pytest.approx((fit.max() - fit.min()) / 10)
    assert len(got.ratio) == len(got.midpoints) and len(got.ratio) <= 101
    # analytic case: presences drawn in proportion to suitability -> P/E rises -> index 1
    fit = np.linspace(0, 1, 1001)
    obs = np.concatenate([np.full(k, v) for k, v in zip(range(1, 11), np.linspace(0.05, 0.95, 10))])
    assert metrics.boyce(fit, obs).index == pytest.approx(ecospat_boyce_reference(fit, obs), abs=1e-12)
    assert metrics.boyce(fit, obs).index > 0.9


# -- bootstrap coverage --------------------------------------------------------------------------
def test_block_bootstrap_interval_covers_at_the_stated_rate():
    """400 simulated surveys (60 clusters of 5 sites, a cluster per 5 km block), the true AUC known
    (Phi(d / sqrt 2) for unit normals d apart); the 95 % interval must cover it in 95 % +- 3.5 % of
    them (3 binomial SDs at 400 surveys; a percentile interval over ~60 blocks undercovers a little).
    Seeded: deterministic (this seed: 95.75 %)."""
    rng = np.random.default_rng(7)
    d = 0.8
    true_auc = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt 2)
    covered, reps, k, m = 0, 400, 60, 5
    for rep in range(reps):
        cx, cy = rng.uniform(0, 1, k), rng.uniform(50, 51, k)
        lon = np.repeat(cx, m) + rng.normal(0, 0.001, k * m)
        lat = np.repeat(cy, m) + rng.normal(0, 0.001, k * m)
        positive = rng.random(k * m) < 0.4
        scores = rng.normal(0, 1, k * m) + d * positive
        blocks = spatial_blocks(lon, lat, block_km=5.0)
        ci = percentile_interval(lambda w: metrics.auc_replicates(scores, positive, w), blocks, 300, seed=rep)
        covered += ci.low <= true_auc <= ci.high
    assert abs(covered / reps - 0.95) <= 0.035, covered


# -- a real COG through the library and the CLI ------------------------------------------------
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import geopandas as gpd  # noqa: E402
from affine import Affine  # noqa: E402
from pyproj import CRS, Transformer  # noqa: E402

from psm_mapping.assessment import assess  # noqa: E402
from psm_mapping.cli import main  # noqa: E402
from psm_mapping.outputs import MapBand, MapResult, write_cog, write_zarr  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
UTM = "EPSG:32632"
MT = Affine(100.0, 0, 500_000.0, 0, -100.0, 5_000_000.0)  # 100 m pixels
H = W = 60
QS = ("birds chirping", "rain on a roof")


def write_map(path: Path, seed: int = 3) -> dict:
    """A psm-map COG (the real writer): similarity per query at zooms 1 and 3, uncertainty per zoom,
    a NaN corner (no imagery)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:H, 0:W]
    arrays, bands = {}, []
    for q, query in enumerate(QS):
        for z in (1, 3):
            a = (np.sin(xx / (7 + q)) + np.cos(yy / (9 + z)) + 0.1 * rng.normal(size=(H, W))).astype(np.float32)
            a[:6, :6] = np.nan
            name = f"similarity:{query}:z{z}"
            arrays[name] = a
            bands.append(MapBand(name, a, f"{query}, zoom {z}", "similarity", query, z))
    for z in (1, 3):
        u = (50 + rng.random((H, W))).astype(np.float32)
        u[:6, :6] = np.nan
        arrays[f"uncertainty:z{z}"] = u
        bands.append(MapBand(f"uncertainty:z{z}", u, f"uncertainty, zoom {z}", "uncertainty", None, z))
    (write_cog if path.suffix == ".tif" else write_zarr)(
        MapResult(bands, CRS.from_epsg(32632), MT, {"checkpoint": "tiny.ckpt", "checkpoint_sha256": "f00"}), path)
    return arrays


def observations(n: int, seed: int, arrays: dict, band: str, *, outside: int = 0, nan: int = 0):
    """Sites at random pixels: ``(frame with decimalLatitude/decimalLongitude/occurrenceStatus, rows,
    cols)``; presence more likely where ``band`` is high; ``outside`` sites off the map, ``nan``
    sites on the NaN corner."""
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(6, H, n), rng.integers(6, W, n)
    rows[:nan], cols[:nan] = rng.integers(0, 6, nan), rng.integers(0, 6, nan)
    x = MT.c + (cols + rng.uniform(0.05, 0.95, n)) * MT.a
    y = MT.f + (rows + rng.uniform(0.05, 0.95, n)) * MT.e
    x[nan:nan + outside] -= 50_000  # 50 km west of the map
    lon, lat = Transformer.from_crs(UTM, 4326, always_xy=True).transform(x, y)
    v = np.nan_to_num(arrays[band][rows, cols])
    present = rng.random(n) < 1 / (1 + np.exp(-2 * v))
    frame = pd.DataFrame({"occurrenceID": [f"o{i}" for i in range(n)], "decimalLatitude": lat,
                          "decimalLongitude": lon, "occurrenceStatus": np.where(present, "present", "absent"),
                          "eventDate": "2024-05-03T06:30:00", "noise_db": 40 + 5 * v + rng.normal(0, 2, n)})
    return frame, rows, cols


@pytest.fixture(scope="module")
def cog(tmp_path_factory):
    d = tmp_path_factory.mktemp("assess")
    arrays = write_map(d / "map.tif")
    frame, rows, cols = observations(300, 1, arrays, f"similarity:{QS[0]}:z1", outside=7, nan=5)
    frame.to_csv(d / "obs.csv", index=False)
    return {"dir": d, "map": d / "map.tif", "arrays": arrays, "obs": d / "obs.csv", "frame": frame, "rows": rows,
            "cols": cols}


def test_map_values_are_the_pixels_containing_the_sites(cog):
    res = assess(source=str(cog["map"]), observations=str(cog["obs"]), bootstrap=200, seed=1)
    assert res.kind == "presence-absence"
    assert [b.band.name for b in res.bands] == [f"similarity:{q}:z{z}" for q in QS for z in (1, 3)]
    present = cog["frame"]["occurrenceStatus"].eq("present").to_numpy()
    inside = np.ones(300, bool)
    inside[5:12] = False
    for b in res.bands:
        truth = cog["arrays"][b.band.name][cog["rows"], cog["cols"]].astype(np.float64)
        got = res.table[b.band.name].to_numpy()
        ok = inside & np.isfinite(truth)
        np.testing.assert_array_equal(got[ok], truth[ok])
        assert b.unscored == {"no_value": list(range(5)), "outside": list(range(5, 12))}
        assert b.n == 288 and b.n_present == int(present[ok].sum())
        f = b.figures["auc"]
        assert f.value == pytest.approx(pair_count_auc(truth[ok], present[ok]), abs=1e-12)
        assert f.low < f.value < f.high and f.replicates == 200
        assert b.uncertainty["mean"] == pytest.approx(
            np.mean(cog["arrays"][f"uncertainty:z{b.band.zoom}"][cog["rows"], cog["cols"]][ok]), rel=1e-6)
    assert res.bands[0].figures["auc"].value > 0.7  # the band the presences follow
    line = res.lines()[0]
    assert line.startswith(f"{QS[0]}, zoom 1: AUC 0.") and line.endswith(f"n 288 ({res.bands[0].n_present} present)")
    # the same seed: the same intervals; --query picks bands
    again = assess(source=str(cog["map"]), observations=str(cog["obs"]), bootstrap=200, seed=1, queries=[QS[1]])
    assert [b.band.query for b in again.bands] == [QS[1], QS[1]]
    assert again.bands[0].figures["auc"] == res.bands[2].figures["auc"]
    # the same map as Zarr: the same numbers
    write_map(cog["dir"] / "map.zarr")
    z = assess(source=str(cog["dir"] / "map.zarr"), observations=str(cog["obs"]), bootstrap=200, seed=1)
    for a, b in zip(res.bands, z.bands):
        assert a.figures == b.figures and a.unscored == b.unscored and a.uncertainty == b.uncertainty


def test_numeric_and_presence_only_kinds(cog, tmp_path):
    num = assess(source=str(cog["map"]), observations=str(cog["obs"]), column="noise_db", bootstrap=100)
    assert num.kind == "numeric"
    b = num.bands[0]
    ok = num.table[b.band.name].notna().to_numpy()
    x, y = num.table[b.band.name][ok], num.table["noise_db"][ok]
    assert abs(b.figures["pearson"].value - x.corr(y)) < 1e-12
    assert abs(b.figures["spearman"].value - x.rank().corr(y.rank())) < 1e-12
    assert b.figures["spearman"].value > 0.5
    # presences only (a GeoJSON in the map's UTM zone): AUC against seeded background, Boyce index
    pres = cog["frame"][cog["frame"]["occurrenceStatus"] == "present"].drop(columns="occurrenceStatus")
    g = gpd.GeoDataFrame(pres.drop(columns=["decimalLatitude", "decimalLongitude"]),
                         geometry=gpd.points_from_xy(pres["decimalLongitude"], pres["decimalLatitude"]),
                         crs=4326).to_crs(UTM)
    g.to_file(tmp_path / "pres.geojson")
    po = assess(source=str(cog["map"]), observations=str(tmp_path / "pres.geojson"), background=2000, bootstrap=50,
                seed=4)
    assert po.kind == "presence-only"
    b = po.bands[0]
    bg = po.background["values"][0]
    assert len(bg) == 2000 and np.isfinite(bg).all()
    v = po.table[b.band.name].dropna().to_numpy()
    assert b.figures["auc"].value == pytest.approx(
        metrics.auc(np.concatenate([bg, v]), np.r_[np.zeros(2000, bool), np.ones(len(v), bool)]), abs=1e-12)
    assert b.figures["boyce"].value == pytest.approx(ecospat_boyce_reference(bg, v), abs=1e-12)
    assert b.figures["boyce"].value > 0.5 and b.figures["auc"].value > 0.6
    po2 = assess(source=str(cog["map"]), observations=str(tmp_path / "pres.geojson"), background=2000,
                 bootstrap=50, seed=4)
    np.testing.assert_array_equal(po2.background["values"], po.background["values"])


def run_cli(*args, cwd=None):
    env = {**__import__("os").environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "psm_mapping.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


def test_cli_writes_json_table_and_html_report(cog, tmp_path):
    outs = [tmp_path / "r.json", tmp_path / "sites.csv", tmp_path / "r.html"]
    p = run_cli("assess", cog["map"], cog["obs"], "--bootstrap", "100", "--seed", "2",
                *[a for o in outs for a in ("--out", o)], "--quiet")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("birds chirping, zoom 1: AUC ")
    doc = json.loads(outs[0].read_text())
    prov = doc["provenance"]
    assert prov["observations"]["sha256"] == __import__("hashlib").sha256(cog["obs"].read_bytes()).hexdigest()
    assert prov["source"]["kind"] == "map" and prov["checkpoint_sha256"] == "f00"
    assert prov["settings"]["bootstrap"] == 100 and prov["settings"]["seed"] == 2
    assert prov["settings"]["block_km"] > 0 and prov["observations"]["event_time"]
    assert not prov["observations"]["event_time_used"]  # a map is one month and hour
    b0 = doc["bands"][0]
    assert b0["summary"] == lines[0] and b0["unscored"]["outside"]["rows"] == list(range(6, 13))
    assert 0.5 < b0["figures"]["auc"]["value"] < 1 and b0["figures"]["auc"]["low"] < b0["figures"]["auc"]["high"]
    table = pd.read_csv(outs[1])
    assert len(table) == 300 and table["assess:status:" + b0["band"]].fillna("").eq("outside").sum() == 7
    page = outs[2].read_text()
    assert page.count("data:image/png;base64,") == 4 and "Boyce" not in page.split("<h2>Methods")[0]
    import base64
    import io

    from PIL import Image

    png = base64.b64decode(page.split("data:image/png;base64,")[1].split('"')[0])
    assert Image.open(io.BytesIO(png)).size[0] > 400
    # the same command again: refused (exists), nothing changed
    before = outs[0].read_bytes()
    p = run_cli("assess", cog["map"], cog["obs"], "--out", outs[0])
    assert p.returncode == 2 and "exists" in p.stderr and outs[0].read_bytes() == before


def test_a_failing_table_leaves_no_report(cog, tmp_path, monkeypatch, capsys):
    """The JSON, the HTML report and the per-site table are committed together: a table that
    cannot be written (here a full disk under the Parquet writer) leaves none of them."""
    import errno

    from psm_mapping.places import tables

    def full(gdf, path, blob):  # as a writer does on a full disk: begun, then refused
        Path(path).write_bytes(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(tables, "_write_parquet", full)
    out = tmp_path / "out"
    out.mkdir()
    outs = [out / "r.json", out / "r.html", out / "sites.parquet"]
    assert main(["assess", str(cog["map"]), str(cog["obs"]), "--bootstrap", "20", "--quiet",
                 *[a for o in outs for a in ("--out", str(o))]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "sites.parquet" in err[0], err
    assert list(out.iterdir()) == []  # no report, no JSON, no staged file


@pytest.mark.parametrize("case", ["no_coords", "unknown_column", "no_absence", "few_sites", "all_outside"])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(cog, tmp_path, case):
    f = cog["frame"].copy()
    extra = []
    if case == "no_coords":
        f = f.drop(columns=["decimalLatitude", "decimalLongitude"])
    elif case == "unknown_column":
        extra = ["--column", "nosuch"]
    elif case == "no_absence":
        f["occurrenceStatus"] = "present"
        extra = ["--kind", "presence-absence"]
    elif case == "few_sites":
        f = f.iloc[:9]
    else:
        f["decimalLongitude"] -= 5
    obs = tmp_path / "obs.csv"
    f.to_csv(obs, index=False)
    p = run_cli("assess", cog["map"], obs, *extra, "--out", tmp_path / "r.json", "--out", tmp_path / "r.html",
                "--out", tmp_path / "s.csv")
    assert p.returncode == 2, p.stdout + p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psm-map: error: "), p.stderr
    assert {"no_coords": "longitude", "unknown_column": "nosuch", "no_absence": "absences",
            "few_sites": "fewer than 10", "all_outside": "outside"}[case] in err[0]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["obs.csv"]


# -- from a store: psm-map points at each site's month and hour ---------------------------------
STORE_Q = "birds chirping"


@pytest.fixture(scope="module")
def built_store(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    """A real map run (tiny checkpoint with the metadata fuser) that leaves its embedding store."""
    from psm_mapping.model.factory import tiny_clap_config
    from servers import write_scene
    from test_map_e2e import UTM as SCENE_UTM, write_region

    d = tmp_path_factory.mktemp("assess_store")
    left, top, res, size = 490_000.0, 4_994_000.0, 32.0, 500
    cx, cy = left + size * res / 2, top - size * res / 2
    scene = d / "scene.tif"
    write_scene(scene, SCENE_UTM, left, top, res, size, size, seed=11)
    clap = d / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    region = write_region(d / "region.geojson", half_m=400, shape="square", center=(cx, cy))
    margs = ["--checkpoint", str(tiny_ckpt), "--clap-config", str(clap), "--tokenizer", str(tokenizer_dir),
             "--device", "cpu", "--quiet"]
    assert main([str(region), "--imagery", str(scene), "--zoom-level", "1,3", "--stride", "200", *margs,
                 "--out", str(d / "map.tif"), "--no-previews", "--query", STORE_Q]) == 0
    from psm_mapping.assessment.fromstore import is_store

    [store] = [p for p in (d / "psm-store").iterdir() if is_store(p) == "store"]
    rng = np.random.default_rng(5)
    n = 14
    x, y = cx + rng.uniform(-2500, 2500, n), cy + rng.uniform(-2500, 2500, n)
    lon, lat = Transformer.from_crs(SCENE_UTM, 4326, always_xy=True).transform(x, y)
    months = rng.integers(1, 13, n)
    hours = rng.integers(0, 24, n)
    dates = [f"2024-{m:02d}-11T{h:02d}:20:00+02:00" for m, h in zip(months, hours)]
    dates[0], dates[1] = "2024-06-07", "2024-06-01/2024-07-15"  # a day: month only; across months: neither
    obs = pd.DataFrame({"decimalLongitude": lon, "decimalLatitude": lat, "eventDate": dates,
                        "occurrenceStatus": ["present", "absent"] * (n // 2)})
    obs.to_csv(d / "obs.csv", index=False)
    month = [6, ""] + [int(m) for m in months[2:]]
    hour = ["", ""] + [int(h) for h in hours[2:]]
    pd.DataFrame({"lon": lon, "lat": lat, "month": month, "hour": hour}).to_csv(d / "sites.csv", index=False)
    return {"dir": d, "store": store, "scene": scene, "obs": d / "obs.csv", "sites": d / "sites.csv",
            "margs": margs, "ckpt": tiny_ckpt}


def test_store_scoring_equals_psm_map_points_at_each_sites_month_and_hour(built_store, tmp_path):
    b = built_store
    res = assess(source=str(b["store"]), observations=str(b["obs"]), queries=[STORE_Q], imagery=str(b["scene"]),
                 device="cpu", bootstrap=50)
    assert [band.band.name for band in res.bands] == [f"similarity:{STORE_Q}:z1", f"similarity:{STORE_Q}:z3"]
    out = tmp_path / "pts.csv"
    assert main(["points", str(b["sites"]), "--imagery", str(b["scene"]), "--zoom-level", "1,3", *b["margs"],
                 "--out", str(out), "--query", STORE_Q, "--store", str(tmp_path / "ps")]) == 0
    pts = pd.read_csv(out)
    for z in (1, 3):
        col = f"similarity:{STORE_Q}:z{z}"
        np.testing.assert_allclose(res.table[col].to_numpy(), pts[col].to_numpy(), rtol=0, atol=1e-6)
        assert np.isfinite(pts[col]).all()
    assert res.provenance["observations"]["event_time_used"] and res.provenance["source"]["kind"] == "store"
    assert res.provenance["checkpoint_sha256"]
    # the month and hour change the values: without event time they differ from the table above
    flat = assess(source=str(b["store"]), observations=str(b["obs"]), queries=[STORE_Q], imagery=str(b["scene"]),
                  device="cpu", bootstrap=0, event_time=False)
    col = f"similarity:{STORE_Q}:z1"
    assert not np.allclose(flat.table[col].to_numpy(), pts[col].to_numpy(), rtol=0, atol=1e-6)


def test_presence_only_from_a_store_draws_background_over_its_computed_pixels(built_store):
    b = built_store
    obs = pd.read_csv(b["obs"]).drop(columns="occurrenceStatus")
    # 14 presences; 100 background points over the store's 4 x 4 computed pixels (800 m square)
    path = b["dir"] / "po.csv"
    pd.concat([obs, obs]).to_csv(path, index=False)
    res = assess(source=str(b["store"]), observations=str(path), queries=[STORE_Q], imagery=str(b["scene"]),
                 device="cpu", bootstrap=20, background=100, seed=3)
    assert res.kind == "presence-only" and res.bands[0].n_background == 100
    from psm_mapping.store import EmbeddingStore

    spec = EmbeddingStore.open(str(b["store"])).spec
    x, y = Transformer.from_crs(4326, CRS.from_wkt(spec.crs_wkt), always_xy=True).transform(
        res.background["lon"], res.background["lat"])
    t = Affine(*spec.transform)
    assert (x >= t.c).all() and (x <= t.c + spec.width * t.a).all()
    assert (y <= t.f).all() and (y >= t.f + spec.height * t.e).all()
    assert np.isfinite(res.bands[0].figures["auc"].value) and np.isfinite(res.bands[0].figures["boyce"].value)
    # each background point is fused at the month and hour of a presence (the presences' dates, not
    # the store's one setting): its value is `psm-map points` at that place, month and hour
    known = pd.read_csv(b["sites"])  # the presences' months and hours (0 / -1: not in their date)
    pairs = set(zip(known["month"].fillna(0).astype(int), known["hour"].fillna(-1).astype(int)))
    bg = res.background
    assert set(zip(bg["month"].tolist(), bg["hour"].tolist())) <= pairs and len(set(bg["month"].tolist())) > 1
    sites = pd.DataFrame({"lon": bg["lon"], "lat": bg["lat"], "month": pd.Series(bg["month"]).replace(0, None),
                          "hour": pd.Series(bg["hour"]).replace(-1, None)})  # unknown: empty cells
    sites.to_csv(b["dir"] / "bg.csv", index=False)
    out = b["dir"] / "bg-points.csv"
    assert main(["points", str(b["dir"] / "bg.csv"), "--imagery", str(b["scene"]), "--zoom-level", "1,3",
                 *b["margs"], "--out", str(out), "--overwrite", "--query", STORE_Q,
                 "--store", str(b["dir"] / "bg-ps")]) == 0
    np.testing.assert_allclose(bg["values"][0], pd.read_csv(out)[f"similarity:{STORE_Q}:z1"].to_numpy(),
                               rtol=0, atol=1e-6)


def test_cli_on_a_map_from_a_real_psm_map_run(built_store, tmp_path):
    """The COG of the real map run: sites at its pixel centres get its pixel values; a GeoParquet table
    and the HTML report are written."""
    import rasterio

    b = built_store
    with rasterio.open(b["dir"] / "map.tif") as src:
        bands = {src.tags(i)["name"]: src.read(i) for i in src.indexes}
        t, crs = src.transform, src.crs.to_string()
    sim = bands[f"similarity:{STORE_Q}:z1"]
    rows, cols = np.nonzero(np.isfinite(sim))
    x, y = t.c + (cols + 0.5) * t.a, t.f + (rows + 0.5) * t.e
    lon, lat = Transformer.from_crs(crs, 4326, always_xy=True).transform(x, y)
    obs = tmp_path / "obs.csv"
    pd.DataFrame({"key": np.arange(len(rows)), "latitude": lat, "longitude": lon,
                  "detected": ["yes", "no"] * (len(rows) // 2)}).to_csv(obs, index=False)
    out = tmp_path / "sites.parquet"
    p = run_cli("assess", b["dir"] / "map.tif", obs, "--column", "detected", "--bootstrap", "50", "--out", out,
                "--out", tmp_path / "r.html", "--quiet")
    assert p.returncode == 0, p.stderr
    assert [ln.split(":")[0] for ln in p.stdout.splitlines()] == [f"{STORE_Q}, zoom 1", f"{STORE_Q}, zoom 3"]
    got = gpd.read_parquet(out)
    for z in (1, 3):
        name = f"similarity:{STORE_Q}:z{z}"
        np.testing.assert_array_equal(got[name].to_numpy(), bands[name][rows, cols].astype(np.float64))
        np.testing.assert_array_equal(got[f"uncertainty:z{z}"].to_numpy(), bands[f"uncertainty:z{z}"][rows, cols])
    assert "UNTRAINED" not in p.stdout and (tmp_path / "r.html").read_text().count("data:image/png;base64,") == 2


# -- observations: column names, kinds, event time -----------------------------------------------
def test_observation_columns_kinds_and_event_time(tmp_path):
    from psm_mapping.assessment.observations import load_observations

    n = 12
    lon, lat = np.linspace(8.0, 8.1, n), np.linspace(45.0, 45.1, n)
    dates = ["2024-03-05T07:15:00Z", "2024-08-20T18:00+02:00", "2024-11-02", "2024-06-01/2024-07-15",
             "2024-06-01T05:00/2024-06-01T05:40", "2024-06", "", "2024-01-31T23:59:59", "not a date",
             "2024-02-10T10:00", "2024-02-10T10:00", "2024-02-10T10:00"]
    f = pd.DataFrame({"decimalLongitude": lon, "decimalLatitude": lat, "eventDate": dates,
                      "individualCount": [0, 3, 1, 0, 2, 0, 5, 1, 0, 1, 0, 2], "detected": ["Yes", "no"] * 6,
                      "level_db": np.arange(n) * 1.5})
    f.to_csv(tmp_path / "o.csv", index=False)
    o = load_observations(tmp_path / "o.csv")  # no occurrenceStatus: individualCount, 0 = absent
    assert o.kind == "presence-absence" and o.column == "individualCount"
    np.testing.assert_array_equal(o.value, (f["individualCount"] > 0).astype(float))
    assert o.sites.month.tolist() == [3, 8, 11, 0, 6, 6, 0, 1, 0, 2, 2, 2]
    assert o.sites.hour.tolist() == [7, 18, -1, -1, 5, -1, -1, 23, -1, 10, 10, 10]
    assert o.event_time
    assert load_observations(tmp_path / "o.csv", event_time=False).sites.month is None
    assert load_observations(tmp_path / "o.csv", column="detected").value.tolist() == [1.0, 0.0] * 6
    num = load_observations(tmp_path / "o.csv", column="level_db")
    assert num.kind == "numeric" and num.value[3] == 4.5
    po = load_observations(tmp_path / "o.csv", column="detected", kind="presence-only")
    assert po.kind == "presence-only" and len(po.value) == 6 and po.dropped == 6 and po.rows.tolist()[:2] == [0, 2]
    # x/y columns in a projected CRS (--crs), and the sha256 of the file
    from pyproj import Transformer

    x, y = Transformer.from_crs(4326, 32632, always_xy=True).transform(lon, lat)
    pd.DataFrame({"x": x, "y": y, "occurrenceStatus": ["present", "absent"] * 6}).to_csv(tmp_path / "xy.csv",
                                                                                        index=False)
    xy = load_observations(tmp_path / "xy.csv", crs="EPSG:32632")
    np.testing.assert_allclose(xy.sites.lon, lon, atol=1e-9)
    np.testing.assert_allclose(xy.sites.lat, lat, atol=1e-9)
    import hashlib

    assert xy.sha256 == hashlib.sha256((tmp_path / "xy.csv").read_bytes()).hexdigest()


def test_store_bad_inputs_exit_2(built_store, tmp_path, capsys):
    b = built_store
    cases = {"no query": ([], "--query"), "no imagery": (["--query", STORE_Q], "--imagery"),
             "wrong imagery": (["--query", STORE_Q, "--imagery", str(tmp_path / "other.tif")], "imagery")}
    from servers import write_scene
    from test_map_e2e import UTM as SCENE_UTM

    write_scene(tmp_path / "other.tif", SCENE_UTM, 490_000.0, 4_994_000.0, 32.0, 500, 500, seed=12)
    for args, needle in cases.values():
        assert main(["assess", str(b["store"]), str(b["obs"]), *args, "--out", str(tmp_path / "r.json")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("psm-map: error: ") and needle in err[0], err
    assert not (tmp_path / "r.json").exists()
