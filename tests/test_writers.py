"""Map writers: COG, Zarr, previews, HTML; overwrite protection and no partial outputs."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess

import affine
import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import CRS

from psm_mapping import outputs as writers
from psm_mapping.outputs import preview as preview_mod
from psm_mapping.errors import InputError, OutputError
from psm_mapping.outputs import MapBand, MapResult

UTM = CRS.from_epsg(32633)
T = affine.Affine(40.0, 0.0, 500_000.0, 0.0, -40.0, 4_650_000.0)


def _disc(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 2 - 2) ** 2


def make_result(h: int = 37, w: int = 53, seed: int = 0) -> MapResult:
    rng = np.random.default_rng(seed)
    inside = _disc(h, w)
    sim1 = np.where(inside, rng.normal(-3, 1, (h, w)), np.nan).astype(np.float32)
    sim2 = np.where(inside, rng.normal(-5, 1, (h, w)), np.nan).astype(np.float32)
    unc = np.where(inside, rng.uniform(0.1, 0.5, (h, w)), np.nan).astype(np.float32)
    score = np.where(inside, rng.uniform(0, 1, (h, w)), np.nan).astype(np.float32)
    bands = [
        MapBand("similarity:birds chirping:z1", sim1, "similarity to 'birds chirping' at zoom 1",
                "similarity", "birds chirping", 1),
        MapBand("similarity:rain & <wind>:z1", sim2, "similarity to 'rain & <wind>' at zoom 1",
                "similarity", "rain & <wind>", 1),
        MapBand("uncertainty:z1", unc, "uncertainty at zoom 1", "uncertainty", None, 1),
        MapBand("score:birds chirping:z1", score, "score 0-1 of 'birds chirping' at zoom 1",
                "score", "birds chirping", 1),
    ]
    left, top = T.c, T.f
    right, bottom = T @ (w, h)
    from pyproj import Transformer

    tr = Transformer.from_crs(UTM, 4326, always_xy=True)
    ring = [tr.transform(x, y) for x, y in
            [(left + 200, bottom + 200), (right - 200, bottom + 200), (right - 200, top - 200),
             (left + 200, top - 200), (left + 200, bottom + 200)]]
    region = {"type": "Feature", "properties": {},
              "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in ring]]}}
    tags = {"checkpoint_sha256": "ab" * 32, "sat_type": "sentinel", "zoom_levels": "1",
            "queries": json.dumps(["birds chirping", "rain & <wind>"]),
            "imagery_source": "scene.tif", "imagery_attribution": "Test imagery (c) nobody",
            "imagery_license": "CC0", "stride_m": "40", "untrained_weights": "true"}
    return MapResult(bands, UTM, T, tags, region)


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_array_equal(a[~np.isnan(a)], b[~np.isnan(b)])


def listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ------------------------------------------------------------------------------------ COG
def test_cog_roundtrip_valid_and_described(tmp_path):
    from rio_cogeo.cogeo import cog_validate

    res = make_result()
    out = writers.write_cog(res, tmp_path / "map.tif")
    assert out == tmp_path / "map.tif"
    assert listing(tmp_path) == ["map.tif"]
    valid, errors, warns = cog_validate(str(out), quiet=True)
    assert valid and not errors, errors
    with rasterio.open(out) as src:
        assert src.count == 4 and (src.height, src.width) == (37, 53)
        assert src.dtypes == ("float32",) * 4
        assert np.isnan(src.nodata)
        assert CRS.from_wkt(src.crs.to_wkt()).to_epsg() == 32633
        assert src.transform.almost_equals(T)
        assert src.block_shapes[0] == (512, 512)
        assert src.compression.name.lower() == "deflate"
        assert src.tags(ns="IMAGE_STRUCTURE").get("PREDICTOR") == "3"
        for i, band in enumerate(res.bands, 1):
            assert_same(src.read(i), band.data)
            assert src.descriptions[i - 1] == band.description
            bt = src.tags(i)
            assert bt["kind"] == band.kind and bt["name"] == band.name
            assert bt.get("query") == band.query
            assert bt["zoom"] == "1"
            assert float(bt["STATISTICS_MAXIMUM"]) == pytest.approx(float(np.nanmax(band.data)))
            assert float(bt["STATISTICS_VALID_PERCENT"]) == pytest.approx(
                100 * np.isfinite(band.data).mean(), abs=1e-3)
        # NaN outside the region is masked for GDAL readers
        assert src.read_masks(1)[0, 0] == 0 and src.read_masks(1)[18, 26] == 255
        tags = src.tags()
        for k, v in res.tags.items():
            assert tags[k] == v
        assert "created" in tags and tags["software"].startswith("psm-mapping")
        assert json.loads(tags["band_names"]) == [b.name for b in res.bands]


def test_cog_big_raster_tiled_with_overviews_zstd(tmp_path):
    from rio_cogeo.cogeo import cog_validate

    h, w = 900, 1100
    inside = _disc(h, w)
    data = np.where(inside, np.linspace(0, 1, w, dtype=np.float32)[None, :], np.nan)
    res = MapResult([MapBand("uncertainty:z3", data.astype(np.float32), "uncertainty at zoom 3",
                             "uncertainty", None, 3)], UTM, T, {"sat_type": "sentinel"})
    out = writers.write_cog(res, tmp_path / "big.tif", compress="zstd")
    valid, errors, _ = cog_validate(str(out), strict=True, quiet=True)
    assert valid and not errors, errors
    with rasterio.open(out) as src:
        assert src.block_shapes[0] == (512, 512)
        assert src.compression.name.lower() == "zstd"
        ovs = src.overviews(1)
        assert len(ovs) >= 1 and ovs[0] == 2
        assert src.tags()["OVERVIEW_RESAMPLING"] == "AVERAGE"
        assert_same(src.read(1), res.bands[0].data)
        ov = src.read(1, out_shape=(h // 2, w // 2))  # served from the overview
        assert np.isnan(ov[0, 0]) and np.isfinite(ov[h // 4, w // 4])
        # average of a horizontal ramp: the mean of two neighbours
        c = w // 4
        np.testing.assert_allclose(ov[h // 4, c], data[h // 2, 2 * c: 2 * c + 2].mean(), rtol=1e-5)


@pytest.mark.skipif(shutil.which("gdalinfo") is None, reason="gdalinfo not installed")
def test_cog_gdalinfo_reads_it(tmp_path):
    out = writers.write_cog(make_result(), tmp_path / "map.tif")
    info = json.loads(subprocess.run(["gdalinfo", "-json", str(out)], check=True,
                                     capture_output=True, text=True).stdout)
    assert len(info["bands"]) == 4
    assert info["bands"][0]["description"] == "similarity to 'birds chirping' at zoom 1"


# ----------------------------------------------------------------------------------- Zarr
@pytest.mark.parametrize("where", ["local", "memory"])
def test_zarr_roundtrip_xarray_rioxarray(tmp_path, where):
    import rioxarray  # noqa: F401
    import xarray as xr

    res = make_result()
    url = str(tmp_path / "map.zarr") if where == "local" else f"memory://psmtest-{tmp_path.name}/map.zarr"
    written = writers.write_zarr(res, url)
    ds = xr.open_zarr(written)  # consolidated metadata, plain call
    assert ds.rio.crs.to_epsg() == 32633
    assert ds.rio.transform().almost_equals(T)
    assert ds.sizes == {"y": 37, "x": 53}
    np.testing.assert_allclose(ds.x.values[:2], [500_020.0, 500_060.0])
    np.testing.assert_allclose(ds.y.values[:2], [4_649_980.0, 4_649_940.0])
    names = json.loads(ds.attrs["band_variables"])
    assert names == ["similarity_birds_chirping_z1", "similarity_rain_wind_z1", "uncertainty_z1",
                     "score_birds_chirping_z1"]
    for var, band in zip(names, res.bands):
        da = ds[var]
        assert da.dtype == np.float32 and da.dims == ("y", "x")
        assert da.rio.crs.to_epsg() == 32633
        assert_same(da.values, band.data)
        assert da.attrs["band_name"] == band.name and da.attrs["description"] == band.description
        assert da.attrs["kind"] == band.kind and da.attrs["zoom"] == 1
        assert da.attrs.get("query") == band.query
    assert ds.attrs["checkpoint_sha256"] == "ab" * 32
    assert ds.attrs["untrained_weights"] == "true"
    if where == "local":
        assert listing(tmp_path) == ["map.zarr"]
        assert (tmp_path / "map.zarr" / ".zmetadata").exists()
        # GDAL's Zarr driver (what QGIS uses) sees CRS, transform and values
        with rasterio.open(f'ZARR:"{written}":/uncertainty_z1') as src:
            assert CRS.from_wkt(src.crs.to_wkt()).to_epsg() == 32633
            assert src.transform.almost_equals(T)
            assert_same(src.read(1), res.bands[2].data)
    else:
        import fsspec

        fs = fsspec.filesystem("memory")
        parent = f"/psmtest-{tmp_path.name}"
        assert [p.rsplit("/", 1)[-1] for p in fs.ls(parent, detail=False)] == ["map.zarr"]
        with pytest.raises(OutputError, match="pass overwrite"):
            writers.write_zarr(res, url)
        res.bands[0].data[18, 26] = 42.0
        writers.write_zarr(res, url, overwrite=True)
        assert float(xr.open_zarr(url)["similarity_birds_chirping_z1"][18, 26]) == 42.0
        assert len(fs.ls(parent, detail=False)) == 1
        fs.rm(parent, recursive=True)


# ------------------------------------------------------------------------------- previews
def test_previews_png_and_html(tmp_path):
    res = make_result()
    files = writers.write_previews(res, tmp_path / "prev")
    assert listing(tmp_path) == ["prev"]
    pngs = [f for f in files if f.suffix == ".png"]
    assert len(pngs) == 2 * len(res.bands) and all(f.exists() for f in files)
    figure = Image.open(tmp_path / "prev" / "similarity_birds_chirping_z1.png")
    figure.load()
    assert figure.mode == "RGBA" and figure.width > 300
    overlay = np.asarray(Image.open(tmp_path / "prev" / "uncertainty_z1_overlay.png"))
    assert overlay.ndim == 3 and overlay.shape[2] == 4
    alpha = overlay[..., 3]
    assert alpha[0, 0] == 0 and alpha[-1, -1] == 0  # outside the disc: transparent
    cy, cx = alpha.shape[0] // 2, alpha.shape[1] // 2
    assert alpha[cy, cx] == 255
    assert 0.3 < (alpha == 255).mean() < 0.9

    page = (tmp_path / "prev" / "index.html").read_text(encoding="utf-8")
    import html as _html

    for band in res.bands:
        assert _html.escape(band.name) in page
    assert "rain & <wind>" not in page.split("<script")[0]  # escaped in the markup
    assert page.count("data:image/png;base64,") >= 1
    embedded = json.loads(re.search(r'<script type="application/json" id="bands">(.*?)</script>',
                                    page, re.S).group(1).replace("<\\/", "</"))
    assert [e["name"] for e in embedded] == [b.name for b in res.bands]
    assert [e["cmap"] for e in embedded] == ["viridis", "viridis", "magma", "viridis"]
    west, south, east, north = writers.lonlat_bounds(UTM, res.bounds())
    assert f"{west:.6f}" in page and f"{north:.6f}" in page
    assert 14.9 < west < east < 15.1 and 41.9 < south < north < 42.1
    assert "Untrained weights" in page and "Test imagery (c) nobody" in page
    ob = embedded[0]["overlay_bounds"]
    assert ob[0] == pytest.approx(west, abs=1e-3) and ob[3] == pytest.approx(north, abs=1e-3)


@pytest.mark.skipif(shutil.which("node") is None, reason="node not installed")
def test_html_script_runs_offline(tmp_path):
    """The page's own script runs without Leaflet (offline) and fills in the first band."""
    writers.write_previews(make_result(), tmp_path / "prev")
    page = (tmp_path / "prev" / "index.html").read_text(encoding="utf-8")
    data = {m.group(1): m.group(2) for m in re.finditer(
        r'<script type="application/json" id="(\w+)">(.*?)</script>', page, re.S)}
    inline = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(inline) == 1
    stub = """
const els={};
function el(id){ if(!els[id]) els[id]={id:id,style:{},textContent:'',value:'0.75',selectedIndex:0,
  addEventListener(){} }; return els[id]; }
global.document={getElementById:el};
global.window=global;
"""
    el_init = "".join(f"el({json.dumps(k)}).textContent={json.dumps(v)};\n" for k, v in data.items())
    check = """
if(!els.figure.src.startsWith('data:image/png;base64,')) throw new Error('no figure');
if(els.bandinfo.textContent.indexOf('zoom 1')<0) throw new Error('no band info');
if(el('map').style.display==='block') throw new Error('map shown offline');
console.log('ok');
"""
    js = tmp_path / "page.js"
    js.write_text(stub + el_init + inline[0] + check, encoding="utf-8")
    out = subprocess.run(["node", str(js)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------------- write_outputs
@pytest.mark.parametrize("fmt", ["cog", "zarr"])
def test_write_outputs_all(tmp_path, fmt):
    res = make_result()
    out = tmp_path / ("map.tif" if fmt == "cog" else "map.zarr")
    got = writers.write_outputs(res, out, fmt=fmt)
    prev = out.name + ".preview"  # each output its own preview folder
    assert got["map"] == out and got["html"] == tmp_path / prev / "index.html"
    assert got["stac"] == tmp_path / (out.name + ".stac.json")
    style = ["map.qml"] if fmt == "cog" else []  # QGIS's style beside a COG (tests/test_qgis.py)
    assert listing(tmp_path) == sorted([out.name, prev, out.name + ".stac.json", *style])
    assert got.get("style") == (tmp_path / "map.qml" if fmt == "cog" else None)
    assert len(got["previews"]) == 2 * len(res.bands)
    info = writers.read_info(out)
    assert info.format == fmt and (info.width, info.height) == (53, 37)
    assert info.crs == "EPSG:32633"
    assert [b["name"] for b in info.bands] == [b.name for b in res.bands]
    assert [b["description"] for b in info.bands] == [b.description for b in res.bands]
    assert info.bands[2]["kind"] == "uncertainty" and int(info.bands[2]["zoom"]) == 1
    assert info.tags["checkpoint_sha256"] == "ab" * 32
    assert info.bounds_lonlat[0] == pytest.approx(15.0, abs=1e-6)
    text = info.summary()
    assert "EPSG:32633" in text and "birds chirping" in text and "53 x 37" in text
    json.dumps(info.as_dict())  # JSON-ready


def test_write_outputs_remote_zarr_with_local_previews(tmp_path):
    import fsspec
    import xarray as xr

    res = make_result()
    url = f"memory://psmtest-{tmp_path.name}/out/map.zarr"
    got = writers.write_outputs(res, url, fmt="zarr", preview_dir=tmp_path / "p")
    assert got["map"] == url and got["html"].exists()
    ds = xr.open_zarr(url)
    assert ds.rio.crs.to_epsg() == 32633
    # the same provenance snapshot in the map and the page
    assert ds.attrs["created"] in got["html"].read_text(encoding="utf-8")
    with pytest.raises(OutputError, match="pass overwrite"):
        writers.write_outputs(res, url, fmt="zarr", previews=False)
    with pytest.raises(OutputError, match="not a local path"):
        writers.write_outputs(res, f"memory://psmtest-{tmp_path.name}/map.tif", fmt="cog")
    fsspec.filesystem("memory").rm(f"/psmtest-{tmp_path.name}", recursive=True)


# --------------------------------------------------------------- overwrite and failures
def test_existing_outputs_are_kept_unless_overwrite(tmp_path):
    res = make_result()
    cog = writers.write_cog(res, tmp_path / "map.tif")
    zarr_path = writers.write_zarr(res, tmp_path / "map.zarr")
    prev = tmp_path / "prev"
    writers.write_previews(res, prev)
    before = (cog.read_bytes(), sorted(os.listdir(zarr_path)), sorted(os.listdir(prev)))
    for call in (lambda **k: writers.write_cog(res, cog, **k),
                 lambda **k: writers.write_zarr(res, zarr_path, **k),
                 lambda **k: writers.write_previews(res, prev, **k),
                 lambda **k: writers.write_outputs(res, tmp_path / "map.tif", **k)):
        with pytest.raises(OutputError, match=r"exists: pass overwrite .* another out"):
            call()
    assert (cog.read_bytes(), sorted(os.listdir(zarr_path)), sorted(os.listdir(prev))) == before
    assert listing(tmp_path) == ["map.tif", "map.zarr", "prev"]

    # write_outputs checks every target before writing any: map.tif is new, preview exists
    (tmp_path / "new.tif.preview").mkdir()
    with pytest.raises(OutputError, match="new.tif.preview"):
        writers.write_outputs(res, tmp_path / "new.tif")
    assert not (tmp_path / "new.tif").exists()

    res.bands[0].data[18, 26] = 7.5
    writers.write_cog(res, cog, overwrite=True)
    writers.write_zarr(res, zarr_path, overwrite=True)
    writers.write_previews(res, prev, overwrite=True)
    with rasterio.open(cog) as src:
        assert src.read(1)[18, 26] == 7.5
    import xarray as xr

    assert float(xr.open_zarr(zarr_path)["similarity_birds_chirping_z1"][18, 26]) == 7.5
    assert listing(tmp_path) == ["map.tif", "map.zarr", "new.tif.preview", "prev"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    import rasterio.shutil
    import xarray as xr

    res = make_result()
    real_copy = rasterio.shutil.copy

    def copy_then_fail(src, dst, *a, **k):
        real_copy(src, dst, *a, **k)
        with rasterio.open(dst) as cog:  # the COG was really built (in memory, then written by Python)
            assert cog.count == len(res.bands)
        raise RuntimeError("disk fell off")

    monkeypatch.setattr(rasterio.shutil, "copy", copy_then_fail)
    with pytest.raises(RuntimeError):
        writers.write_cog(res, tmp_path / "map.tif")
    assert listing(tmp_path) == []
    monkeypatch.undo()

    real_to_zarr = xr.Dataset.to_zarr

    def to_zarr_then_fail(self, *a, **k):
        real_to_zarr(self, *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", to_zarr_then_fail)
    with pytest.raises(OutputError, match="No space left"):
        writers.write_zarr(res, tmp_path / "map.zarr")
    assert listing(tmp_path) == []
    monkeypatch.undo()

    # previews fail on the third band: the COG staged before them goes too
    calls = {"n": 0}
    real_fig = preview_mod._figure_png

    def fig_fails_later(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("matplotlib broke")
        return real_fig(*a, **k)

    monkeypatch.setattr(preview_mod, "_figure_png", fig_fails_later)
    with pytest.raises(RuntimeError, match="matplotlib broke"):
        writers.write_outputs(res, tmp_path / "map.tif", fmt="cog")
    assert calls["n"] == 3
    assert listing(tmp_path) == []

    # a failed overwrite keeps the old output
    monkeypatch.undo()
    writers.write_previews(res, tmp_path / "prev")
    old = sorted(os.listdir(tmp_path / "prev"))
    calls["n"] = 0
    monkeypatch.setattr(preview_mod, "_figure_png", fig_fails_later)
    with pytest.raises(RuntimeError):
        writers.write_previews(res, tmp_path / "prev", overwrite=True)
    assert listing(tmp_path) == ["prev"] and sorted(os.listdir(tmp_path / "prev")) == old


def test_unwritable_output_folder(tmp_path):
    res = make_result()
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match="choose .*out"):
        writers.write_cog(res, blocker / "map.tif")
    with pytest.raises(OutputError, match="choose .*out"):
        writers.write_zarr(res, blocker / "sub" / "map.zarr")
    assert listing(tmp_path) == ["file.txt"]
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            with pytest.raises(OutputError, match="not writable"):
                writers.write_previews(res, ro / "prev")
        finally:
            ro.chmod(0o700)


def test_bad_results_are_refused(tmp_path):
    res = make_result()
    res.bands[1].data = res.bands[1].data[:-1]
    with pytest.raises(InputError, match="shape"):
        writers.write_cog(res, tmp_path / "a.tif")
    res = make_result()
    res.bands[1].name = res.bands[0].name
    with pytest.raises(InputError, match="unique"):
        writers.write_zarr(res, tmp_path / "a.zarr")
    with pytest.raises(InputError, match="deflate or zstd"):
        writers.write_cog(make_result(), tmp_path / "a.tif", compress="lzw")
    with pytest.raises(InputError, match="does not exist"):
        writers.read_info(tmp_path / "nothing.tif")
    assert listing(tmp_path) == []


def test_small_raster_single_pixel(tmp_path):
    from rio_cogeo.cogeo import cog_validate

    res = MapResult([MapBand("similarity:x:z5", np.array([[1.5]], np.float32), "similarity to 'x' at zoom 5",
                             "similarity", "x", 5)], UTM, T, {})
    out = writers.write_cog(res, tmp_path / "one.tif")
    assert cog_validate(str(out), quiet=True)[0]
    with rasterio.open(out) as src:
        assert src.read(1)[0, 0] == 1.5
    files = writers.write_previews(res, tmp_path / "p")
    assert all(f.exists() for f in files)
    assert writers.safe_name("2 birds/z1") == "b_2_birds_z1"
