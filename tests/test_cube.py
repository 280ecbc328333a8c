"""Month x hour cubes (issue 13): fusion re-runs from one store's ``z_img`` over many settings.

One store is built with the tiny metadata checkpoint (the official format, full metadata) on the
8 x 8 px triangle of ``test_map_e2e`` with ``--month 5 --hour 14`` as the store's own setting.
Cubes over months 3, 5 and hours 7, 14 are compared with single-setting maps of the same store.
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from psm_mapping.cli import main
from psm_mapping.config import MapConfig, check_hours, check_months
from psm_mapping.errors import InputError

from test_map_e2e import UTM, band, base_args, grid_for, make_inputs

MONTHS, HOURS = (3, 5), (7, 14)
SETTINGS = [(m, h) for m in MONTHS for h in HOURS]
#: the store's own setting: its stored (float16) mean is what a single map of it reads
OWN = (5, 14)
#: bound between a fusion re-run and the single map reading the stored float16 ``mean`` of the
#: same setting: measured 5.0e-05 (max abs, similarity) on this store; asserted with 4x margin
F16_BOUND = 2e-4


@pytest.fixture(scope="module")
def inp(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    return make_inputs(tmp_path_factory.mktemp("cube-inputs"), tiny_ckpt, tokenizer_dir)


@pytest.fixture(scope="module")
def built(inp, tmp_path_factory):
    out = tmp_path_factory.mktemp("cube-built") / "map.tif"
    assert main(base_args(inp, out, "--query", "birds", "--month", str(OWN[0]), "--hour", str(OWN[1]),
                          "--no-previews")) == 0
    (store,) = (out.parent / "psm-store").glob("*.zarr")
    return store


def common(inp) -> list[str]:
    return ["--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]), "--tokenizer",
            str(inp["tokenizer"]), "--device", "cpu", "--quiet", "--query", "birds"]


@pytest.fixture(scope="module")
def singles(inp, built, tmp_path_factory):
    """``psm-map query STORE --month m --hour h`` for every setting (COG, no previews)."""
    d = tmp_path_factory.mktemp("cube-singles")
    out = {}
    for m, h in SETTINGS:
        p = d / f"m{m}_h{h}.tif"
        assert main(["query", str(built), *common(inp), "--month", str(m), "--hour", str(h), "--no-previews",
                     "--out", str(p)]) == 0
        out[(m, h)] = p
    return out


@pytest.fixture(scope="module")
def cube_zarr(inp, built, tmp_path_factory):
    out = tmp_path_factory.mktemp("cube-zarr") / "cube.zarr"
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hours", "7,14", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------- parsing
def test_months_hours_parsing():
    assert check_months("3,6,9") == (3, 6, 9)
    assert check_months("1-12") == tuple(range(1, 13))
    assert check_hours("0-23/3") == (0, 3, 6, 9, 12, 15, 18, 21)
    assert check_hours(" 6 , 12-14 ,6") == (6, 12, 13, 14)
    assert check_months([12, 1, 2]) == (12, 1, 2)
    assert check_months(None) is None
    for bad in ("0", "13", "", ",", "5-2", "x", "1-12/0", "3.5"):
        with pytest.raises(InputError) as ei:
            check_months(bad)
        assert ei.value.option == "months" and "\n" not in str(ei.value)
    with pytest.raises(InputError, match="out of range"):
        check_hours("24")
    cfg = MapConfig(region="r.geojson", queries=["x"], months="1-12/6", hours=[0, 12]).validate()
    assert cfg.is_cube and cfg.months == (1, 7) and cfg.hours == (0, 12)
    assert not MapConfig(queries=["x"]).validate().is_cube
    with pytest.raises(InputError, match="both month and months"):
        MapConfig(queries=["x"], month=5, months="3").validate()


# ---------------------------------------------------------------------------- the cube
def test_zarr_cube_slices_equal_single_maps(inp, cube_zarr, singles):
    import rioxarray  # noqa: F401
    import xarray as xr

    ds = xr.open_zarr(cube_zarr)
    v = ds["similarity_birds"]
    assert v.dims == ("month", "hour", "zoom", "y", "x") and v.dtype == np.float32
    assert ds["uncertainty"].dims == v.dims
    assert list(ds.month.values) == list(MONTHS) and list(ds.hour.values) == list(HOURS)
    assert list(ds.month_name.values) == ["March", "May"] and list(ds.hour_label.values) == ["07:00", "14:00"]
    assert list(ds.zoom.values) == [1]
    assert ds.rio.crs.to_epsg() == 32632
    with rasterio.open(singles[OWN]) as src:
        assert ds.rio.transform() == src.transform
    # chunks: one month, every hour, one zoom, the whole (small) grid
    assert v.encoding["chunks"] == (1, 2, 1, 8, 8)
    mask = grid_for(inp).mask
    bound_own = 0.0
    for (m, h), path in singles.items():
        got = ds["similarity_birds"].sel(month=m, hour=h, zoom=1).values
        want = band(path, "birds")
        assert np.array_equal(np.isfinite(got), mask) and np.array_equal(np.isfinite(want), mask)
        unc = ds["uncertainty"].sel(month=m, hour=h, zoom=1).values
        if (m, h) == OWN:  # the single map reads the stored float16 mean
            bound_own = float(np.nanmax(np.abs(got - want)))
            assert bound_own < F16_BOUND
            np.testing.assert_allclose(unc, band(path, "uncertainty"), rtol=0, atol=F16_BOUND)
        else:  # both are fusion re-runs from z_img
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
            np.testing.assert_allclose(unc, band(path, "uncertainty"), rtol=0, atol=1e-5)
    print(f"float16 bound measured at the store's own setting: {bound_own:.2e}")
    # the settings differ, everywhere
    a = ds["similarity_birds"].sel(month=3, hour=7, zoom=1).values
    for m, h in SETTINGS[1:]:
        b = ds["similarity_birds"].sel(month=m, hour=h, zoom=1).values
        assert np.abs(a - b)[mask].min() > 1e-6, (m, h)
    # provenance
    assert ds.attrs["cube_months"] == "3,5" and ds.attrs["cube_hours"] == "7,14"
    assert "z_img" in ds.attrs["cube_source"] and "checkpoint_sha256" in ds.attrs
    item = json.loads(Path(str(cube_zarr) + ".stac.json").read_text())
    assert item["properties"]["psm:cube"]["months"] == [3, 5] and item["properties"]["psm:cube"]["hours"] == [7, 14]
    assert "z_img" in item["properties"]["psm:cube"]["source"]
    assert item["assets"]["data"]["href"] == "./cube.zarr"
    from psm_mapping.outputs import read_info

    info = read_info(cube_zarr)
    assert [b["variable"] for b in info.bands] == ["similarity_birds", "uncertainty"]
    assert info.bands[0]["dims"] == {"month": 2, "hour": 2, "zoom": 1, "y": 8, "x": 8}


def test_previews_animation_grid_and_slider(cube_zarr):
    from PIL import Image

    d = Path(str(cube_zarr) + ".preview")
    gifs = sorted(p.name for p in d.glob("*.gif"))
    assert gifs == ["similarity_birds_z1.gif", "uncertainty_z1.gif"]
    with Image.open(d / "similarity_birds_z1.gif") as im:
        assert im.n_frames == len(SETTINGS) and im.info.get("loop") == 0
        frames = []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    assert all(not np.array_equal(frames[0], f) for f in frames[1:])
    with Image.open(d / "similarity_birds_z1_grid.png") as im:
        assert im.width > 2 * 40 and im.height > 2 * 40
    page = (d / "index.html").read_text()
    assert 'id="month" type="range"' in page and 'id="hour" type="range"' in page
    entries = json.loads(page.split('id="entries">')[1].split("</script>")[0])
    assert len(entries) == 2 and all(len(e["frames"]) == len(SETTINGS) for e in entries)
    assert entries[0]["vmin"] < entries[0]["vmax"]  # one colour range for every frame


def test_one_axis_and_map_run_cube(inp, built, cube_zarr, singles, tmp_path):
    """``--months 3,5 --hour 7``: the hour axis is dropped; the map command makes the same cube
    from the same store (nothing embedded)."""
    import xarray as xr

    out = tmp_path / "months.zarr"
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hour", "7", "--no-previews", "--score",
                 "--out", str(out)]) == 0
    ds = xr.open_zarr(out)
    assert ds["similarity_birds"].dims == ("month", "zoom", "y", "x") and "hour" not in ds.dims
    sc = ds["score_birds"].values  # one 0..1 scale over the whole cube, per zoom
    assert np.nanmin(sc) == 0.0 and np.nanmax(sc) == 1.0 and np.nanmax(sc[0]) != np.nanmax(sc[1])
    np.testing.assert_allclose(ds["similarity_birds"].sel(month=3, zoom=1).values, band(singles[(3, 7)], "birds"),
                               rtol=0, atol=1e-5)
    run_out = tmp_path / "run" / "cube.zarr"
    run_out.parent.mkdir()
    assert main(base_args(inp, run_out, "--query", "birds", "--months", "3,5", "--hours", "7,14", "--store",
                          str(built.parent), "--no-previews")) == 0
    a, b = xr.open_zarr(run_out), xr.open_zarr(cube_zarr)
    np.testing.assert_allclose(a["similarity_birds"].values, b["similarity_birds"].values, rtol=0, atol=1e-5)


def test_cog_folder_and_multiband(inp, built, singles, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    out = tmp_path / "cube.tif"
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hours", "7,14", "--cube-layout", "folder",
                 "--no-previews", "--out", str(out)]) == 0
    folder = tmp_path / "cube"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted(f"cube_m{m:02d}_h{h:02d}.{ext}" for m, h in SETTINGS for ext in ("tif", "qml"))
    for (m, h), path in singles.items():
        f = folder / f"cube_m{m:02d}_h{h:02d}.tif"
        valid, errors, _ = cog_validate(str(f))
        assert valid, errors
        with rasterio.open(f) as src:
            assert src.tags()["month"] == str(m) and src.tags()["hour"] == str(h)
            assert f"month={m}" in src.tags()["metadata"] and f"hour={h}" in src.tags()["metadata"]
            assert "z_img" in src.tags()["cube_source"]
        tol = F16_BOUND if (m, h) == OWN else 1e-5
        np.testing.assert_allclose(band(f, "birds"), band(path, "birds"), rtol=0, atol=tol)
    item = json.loads((tmp_path / "cube.stac.json").read_text())
    assert sorted(item["assets"]) == sorted(f"m{m:02d}_h{h:02d}{s}" for m, h in SETTINGS for s in ("", "_style"))
    # one multi-band COG: a band per (setting, query/uncertainty, zoom), named with month and hour
    one = tmp_path / "bands.tif"
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hours", "7,14", "--no-previews",
                 "--out", str(one)]) == 0
    valid, errors, _ = cog_validate(str(one))
    assert valid, errors
    with rasterio.open(one) as src:
        assert src.count == len(SETTINGS) * 2
        d = src.descriptions
        assert "[month 3, hour 7]" in d[0] and "uncertainty" in d[1] and "[month 5, hour 14]" in d[-1]
        assert src.tags(3)["month"] == "3" and src.tags(3)["hour"] == "14"
        np.testing.assert_allclose(src.read(3), band(singles[(3, 14)], "birds"), rtol=0, atol=1e-5)


def _pixel_lonlat(inp, row: int, col: int) -> tuple[float, float]:
    g = grid_for(inp)
    x, y = g.transform @ (col + 0.5, row + 0.5)
    return Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(x, y)


def test_point_profile_csv_and_heatmap(inp, built, cube_zarr, tmp_path):
    import xarray as xr
    from PIL import Image

    g = grid_for(inp)
    row, col = (int(v[0]) for v in np.nonzero(g.mask))
    lon, lat = _pixel_lonlat(inp, row, col)
    out = tmp_path / "p.csv"
    assert main(["query", str(built), *common(inp), "--point", f"{lon},{lat}", "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1 * 1 * 12 * 24  # queries x zooms x months x hours
    assert list(rows[0]) == ["query", "kind", "zoom", "month", "hour", "similarity", "uncertainty", "lon", "lat"]
    assert {r["month"] for r in rows} == {str(m) for m in range(1, 13)}
    assert {r["hour"] for r in rows} == {str(h) for h in range(24)}
    with Image.open(Path(str(out) + ".heatmap.png")) as im:
        assert im.width > 24 * 14
    ds = xr.open_zarr(cube_zarr)
    for r in rows:
        m, h = int(r["month"]), int(r["hour"])
        if (m, h) in SETTINGS:
            want = float(ds["similarity_birds"].sel(month=m, hour=h, zoom=1).values[row, col])
            assert abs(float(r["similarity"]) - want) < 1e-5
    small = tmp_path / "small.csv"
    assert main(["query", str(built), *common(inp), "--point", f"{lon},{lat}", "--months", "3,5", "--hour", "7",
                 "--out", str(small)]) == 0
    rows = list(csv.DictReader(small.open()))
    assert [(r["month"], r["hour"]) for r in rows] == [("3", "7"), ("5", "7")]  # the fixed hour is named


# ---------------------------------------------------------------------------- refusals
def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


BAD_QUERY = {
    "months 0": (["--months", "0"], ["months", "0", "1..12"]),
    "months 13": (["--months", "13"], ["months", "13", "1..12"]),
    "hours 24": (["--hours", "24"], ["hours", "24", "0..23"]),
    "hours backwards": (["--hours", "5-2"], ["5-2", "backwards"]),
    "empty months": (["--months", ""], ["months", "empty"]),
    "empty hours": (["--hours", ","], ["hours", "empty"]),
    "month and months": (["--month", "5", "--months", "3,4"], ["--month", "--months"]),
    "no fusion": (["--months", "3", "--no-fusion"], ["--no-fusion", "drop"]),
    "band limit": (["--months", "1-12", "--hours", "0-23"], ["576 cog bands", "200", ".zarr", "--cube-layout folder"]),
    "point outside": (["--point", "0,0"], ["--point", "outside the store"]),
    "point garbage": (["--point", "abc"], ["--point", "lon,lat"]),
}


@pytest.mark.parametrize("case", list(BAD_QUERY))
def test_bad_cube_input_query(case, inp, built, tmp_path, capsys):
    extra, words = BAD_QUERY[case]
    before = _tree(built)
    out = tmp_path / "out"
    out.mkdir()
    target = out / ("p.csv" if "--point" in extra else "c.tif")
    capsys.readouterr()
    rc = main(["query", str(built), *common(inp), *extra, "--out", str(target)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("psm-map: error:"), err
    assert all(w.lower() in err[0].lower() for w in words), err[0]
    assert list(out.iterdir()) == []
    assert _tree(built) == before


@pytest.mark.parametrize("metadata_type,extra,words", [
    ("none", ["--months", "1-12"], ["no metadata fusion", "metadata checkpoint"]),
    ("latlong_month", ["--hours", "0-23"], ["have no hour", "--hours"]),
    ("latlong_month_time_asource_tsource", ["--hours", "5-2"], ["backwards"]),
    ("latlong_month_time_asource_tsource", ["--months", "1,2", "--zoom-sampling", "scale"],
     ["--zoom-sampling dense"]),
])
def test_bad_cube_input_map_run(metadata_type, extra, words, inp, ckpt_factory, tmp_path, capsys):
    """A map run refuses before it creates the store or writes anything."""
    ck = ckpt_factory(sat_type="sentinel", metadata_type=metadata_type)
    out = tmp_path / "out"
    out.mkdir()
    args = base_args({**inp, "ckpt": ck}, out / "cube.zarr", "--query", "birds", *extra)
    capsys.readouterr()
    rc = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error:"), err
    assert all(w.lower() in err[0].lower() for w in words), err[0]
    assert list(out.iterdir()) == []


def test_html_time_slider_script_runs(cube_zarr, tmp_path):
    """The page's script (node, no browser): the sliders pick the frame of (month, hour), play steps
    hours first, then months."""
    import re
    import shutil
    import subprocess

    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    page = (Path(str(cube_zarr) + ".preview") / "index.html").read_text(encoding="utf-8")
    data = {m.group(1): m.group(2) for m in re.finditer(
        r'<script type="application/json" id="(\w+)">(.*?)</script>', page, re.S)}
    (inline,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    stub = """
const els={}, on={};
function el(id){ if(!els[id]) els[id]={id:id,style:{},textContent:'',value:'0',selectedIndex:0,
  addEventListener(ev,f){ on[id+':'+ev]=f; } }; return els[id]; }
global.document={getElementById:el};
global.setInterval=function(f){ global.tick=f; return 1; }; global.clearInterval=function(){};
"""
    init = "".join(f"el({json.dumps(k)}).textContent={json.dumps(v)};\n" for k, v in data.items())
    check = """
const E=JSON.parse(els.entries.textContent);
function want(i){ return 'data:image/png;base64,'+E[0].frames[i]; }
if(els.frame.src!==want(0)) throw new Error('first frame');
els.month.value='1'; els.hour.value='1'; on['hour:input']();
if(els.frame.src!==want(3)) throw new Error('slider frame');
if(els.setting.textContent!=='May (5), 14:00') throw new Error('label '+els.setting.textContent);
on['play:click'].call(els.play); tick();
if(els.frame.src!==want(0)) throw new Error('play wraps to the first setting');
els.hour.value='0'; els.month.value='0'; tick();
if(els.frame.src!==want(1)) throw new Error('play steps the hour first');
console.log('ok');
"""
    js = tmp_path / "page.js"
    js.write_text(stub + init + inline + check, encoding="utf-8")
    out = subprocess.run(["node", str(js)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.mark.parametrize("streamed", [False, True])
def test_dask_driver_cube(inp, built, cube_zarr, tmp_path, monkeypatch, streamed):
    """The dask driver fills the store on the cluster and makes the same cube on the workers, one
    task per tile (here the store is complete: nothing is embedded), in memory or streamed through
    the scratch Zarr (removed afterwards)."""
    import xarray as xr
    from distributed import Client, get_task_stream

    if streamed:
        monkeypatch.setenv("PSM_CUBE_EAGER_BYTES", "1")

    from psm_mapping.distributed import map_region_distributed

    cfg = MapConfig(region=str(inp["region"]), imagery=str(inp["scene"]), queries=["birds"],
                    checkpoint=str(inp["ckpt"]), clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]),
                    zoom_levels=(1,), stride=40.0, device="cpu", out=str(tmp_path / "d.zarr"), format="zarr",
                    store=str(built.parent), progress=False, previews=False, months="3,5", hours="7,14")
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        with get_task_stream(client) as ts:
            run = map_region_distributed(cfg, client=client, log_fn=lambda *a: None)
    assert run.blocks_computed == 0 and run.chips == 0
    tiles = [t for t in ts.data if str(t["key"]).startswith("_cube_tile")]
    assert len(tiles) >= 1  # the tiles ran as the workers' tasks
    assert not [p.name for p in tmp_path.iterdir() if "scratch" in p.name]  # no scratch left
    a, b = xr.open_zarr(tmp_path / "d.zarr"), xr.open_zarr(cube_zarr)
    np.testing.assert_allclose(a["similarity_birds"].values, b["similarity_birds"].values, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------- the engine's cube
def _zoom_band(path, z: int) -> np.ndarray:
    with rasterio.open(path) as src:
        for i, d in enumerate(src.descriptions, 1):
            if "birds" in d and d.endswith(f"zoom {z}"):
                return src.read(i)
    raise AssertionError(f"no birds band at zoom {z} in {path}")


@pytest.fixture(scope="module")
def scale_store(inp, tmp_path_factory):
    """A scale-true store (zoom 2 on its own, coarser grid) with the store's own setting OWN."""
    from psm_mapping.store import EmbeddingStore

    out = tmp_path_factory.mktemp("cube-scale") / "map.tif"
    assert main(base_args(inp, out, "--query", "birds", "--month", str(OWN[0]), "--hour", str(OWN[1]),
                          "--zoom-level", "1,2", "--zoom-sampling", "scale", "--no-previews")) == 0
    (store,) = (out.parent / "psm-store").glob("*.zarr")
    spec = EmbeddingStore.open(store).spec
    assert not spec.dense and max(spec.zoom_factors) > 1
    return store


def test_scale_true_store_cube_equals_single_maps(inp, scale_store, tmp_path):
    """A scale-true store is answered (no longer refused): each (month, hour, zoom) slice of its
    cube equals ``psm-map query STORE --month m --hour h`` (the same engine windows, scale-true
    zooms resampled to the output grid): 1e-5 for re-fused settings, the float16 bound at the
    store's own setting (the single map reads the stored mean)."""
    import xarray as xr

    cube = tmp_path / "cube.zarr"
    assert main(["query", str(scale_store), *common(inp), "--months", "3,5", "--hours", "7,14", "--no-previews",
                 "--out", str(cube)]) == 0
    ds = xr.open_zarr(cube)
    assert list(ds.zoom.values) == [1, 2]
    for m, h in SETTINGS:
        single = tmp_path / f"m{m}_h{h}.tif"
        assert main(["query", str(scale_store), *common(inp), "--month", str(m), "--hour", str(h),
                     "--no-previews", "--out", str(single)]) == 0
        for z in (1, 2):
            got = ds["similarity_birds"].sel(month=m, hour=h, zoom=z).values
            want = _zoom_band(single, z)
            assert np.isfinite(got).sum() > 0
            assert np.array_equal(np.isfinite(got), np.isfinite(want)), (m, h, z)
            np.testing.assert_allclose(got, want, rtol=0, atol=F16_BOUND if (m, h) == OWN else 1e-5)
    a = ds["similarity_birds"].sel(month=3, hour=7).values
    b = ds["similarity_birds"].sel(month=5, hour=7).values
    assert np.nanmax(np.abs(a - b)) > 1e-6  # the settings differ


def test_streamed_cube_equals_in_memory(inp, built, cube_zarr, tmp_path, monkeypatch):
    """Past the in-memory limit ($PSM_CUBE_EAGER_BYTES, here 1 byte) a cube is never held whole:
    it is computed tile by tile into a scratch Zarr and streamed into the writers; its outputs
    equal the in-memory cube's, and no scratch is left behind."""
    import xarray as xr

    import psm_mapping.cube as C

    # the in-memory multi-band COG and the score, for comparison
    eager_tif = tmp_path / "eager" / "cube.tif"
    eager_tif.parent.mkdir()
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hours", "7,14", "--score",
                 "--no-previews", "--out", str(eager_tif)]) == 0
    monkeypatch.setenv("PSM_CUBE_EAGER_BYTES", "1")
    streamed = []
    real = C.stream_cube
    monkeypatch.setattr(C, "stream_cube", lambda *a, **k: streamed.append(a[5]) or real(*a, **k))

    def held_whole(*a, **k):
        raise AssertionError("a cube past the limit was held in memory")

    monkeypatch.setattr(C, "cube_store", held_whole)
    out = tmp_path / "s" / "cube.zarr"
    out.parent.mkdir()
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hours", "7,14", "--out", str(out)]) == 0
    a, b = xr.open_zarr(out), xr.open_zarr(cube_zarr)
    for v in ("similarity_birds", "uncertainty"):
        assert a[v].encoding["chunks"] == b[v].encoding["chunks"]
        np.testing.assert_array_equal(a[v].values, b[v].values)
    assert (out.parent / "cube.zarr.preview" / "index.html").exists()
    tif = tmp_path / "s" / "cube.tif"
    assert main(["query", str(built), *common(inp), "--months", "3,5", "--hours", "7,14", "--score",
                 "--no-previews", "--out", str(tif)]) == 0
    with rasterio.open(tif) as s, rasterio.open(eager_tif) as e:
        assert s.count == e.count and s.descriptions == e.descriptions
        np.testing.assert_array_equal(s.read(), e.read())
    assert len(streamed) == 2
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        ["cube.zarr", "cube.zarr.stac.json", "cube.zarr.preview", "cube.tif", "cube.qml", "cube.tif.stac.json"])
