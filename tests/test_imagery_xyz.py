"""XYZ/TMS/WMTS tile sources against a real tile server on 127.0.0.1."""
from __future__ import annotations

import math
import re
import socket

import numpy as np
import pytest
import rasterio
from pyproj import Transformer
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.vrt import WarpedVRT

from psm_mapping.errors import ImageryError
from psm_mapping.imagery import open_source
from psm_mapping.imagery.cache import template_key
from psm_mapping.imagery.presets import PRESETS, list_presets, open_preset
from psm_mapping.imagery.xyz import (
    WORLD, XYZSource, parse_template, tile_resolution, zoom_for_resolution)

from servers import SceneTiles, TileServer, scene_pattern, write_scene

pytestmark = pytest.mark.network

UTM = "EPSG:32632"
# a 4 km x 4 km scene at 10 m near (9.0 E, 45.0 N)
LEFT, TOP, RES, SIZE = 498000.0, 4986000.0, 10.0, 400
# read window: the inner 3 km
WIN = (LEFT + 500, TOP - 3500, LEFT + 3500, TOP - 500)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    # features of ~8 px (80 m): sharp enough that a one-pixel misregistration shows
    write_scene(path, UTM, LEFT, TOP, RES, SIZE, SIZE, data=scene_pattern(SIZE, SIZE, 1, cell=8))
    return path


@pytest.fixture(scope="module")
def tiles(scene):
    return SceneTiles(scene)


@pytest.fixture()
def server(tiles):
    with TileServer(tiles) as srv:
        yield srv


def fast(template, **kw):
    kw.setdefault("retries", 2)
    kw.setdefault("backoff", 0.01)
    return XYZSource(template, **kw)


def local_read(path, bounds, crs, shape):
    h, w = shape
    with rasterio.open(path) as src, WarpedVRT(
            src, crs=crs, transform=from_bounds(*bounds, w, h), width=w, height=h,
            resampling=Resampling.average) as vrt:
        return vrt.read()


def corr(a, b, m):
    return min(float(np.corrcoef(a[i][m].astype(float), b[i][m].astype(float))[0, 1])
               for i in range(3))


# -- georeferencing ---------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(300, 300), (120, 120)])
def test_tiles_match_local_geotiff(scene, server, shape):
    with fast(server.template()) as src:
        win = src.read(WIN, UTM, shape)
    ref = local_read(scene, WIN, UTM, shape)
    assert win.data.shape == (3, *shape) and win.data.dtype == np.uint8
    assert win.mask.all() and win.faults == 0
    assert corr(win.data, ref, win.mask) > 0.95
    # a one-pixel shift must be visibly worse: the match is about position, not just colour
    shifted = corr(win.data[:, :, 1:], ref[:, :, :-1], win.mask[:, 1:])
    assert shifted < corr(win.data, ref, win.mask) - 0.01


def test_tiles_match_local_raster_source(scene, server):
    local = pytest.importorskip("psm_mapping.imagery.local")
    with local.LocalRasterSource(scene) as loc, fast(server.template()) as xyz:
        a = loc.read(WIN, UTM, (150, 150))
        b = xyz.read(WIN, UTM, (150, 150))
    both = a.mask & b.mask
    assert both.mean() > 0.99
    assert corr(a.data, b.data, both) > 0.95


def test_antimeridian_window(tmp_path):
    crs = "EPSG:32760"  # UTM 60 S, Fiji; 180 E is ~318 km east of the central meridian
    e, n = Transformer.from_crs(4326, crs, always_xy=True).transform(180.0, -17.0)
    left, top = math.floor(e / 10) * 10 - 2000, math.floor(n / 10) * 10 + 2000
    path = tmp_path / "fiji.tif"
    write_scene(path, crs, left, top, 10.0, 400, 400, seed=3)
    bounds = (left + 500, top - 3500, left + 3500, top - 500)
    with TileServer(SceneTiles(path)) as srv, fast(srv.template()) as src:
        plan = src.plan(bounds, crs, (150, 150))
        assert plan.crosses_antimeridian
        win = src.read(bounds, crs, (150, 150))
        cols = {int(p.split("/")[3]) for p in srv.requests}
    assert 0 in cols and 2**plan.zoom - 1 in cols  # tiles on both sides of 180
    ref = local_read(path, bounds, crs, (150, 150))
    assert win.mask.all()
    assert corr(win.data, ref, win.mask) > 0.95


# -- zoom choice ------------------------------------------------------------------------
def test_zoom_not_coarser_than_asked(server):
    with fast(server.template()) as src:
        plan = src.plan(WIN, UTM, (300, 300))  # 10 m ground at 45 N = ~14.1 m in 3857
        assert tile_resolution(plan.zoom, 256) <= plan.requested_res
        assert tile_resolution(plan.zoom - 1, 256) > plan.requested_res
        assert plan.requested_res == pytest.approx(10 / math.cos(math.radians(45)), rel=0.02)
        assert plan.zoom == 14
    with fast(server.template(), max_zoom=12) as src:
        assert src.plan(WIN, UTM, (300, 300)).zoom == 12
    with fast(server.template(), tile_size=512) as src:
        assert src.plan(WIN, UTM, (300, 300)).zoom == 13
    assert zoom_for_resolution(WORLD / 256 / 2**5, 256, 0, 19) == 5  # exact match stays


def test_downsampled_read_is_antialiased(scene, server):
    # 60 m pixels from tiles: the result must be close to an area average, not aliased
    with fast(server.template()) as src:
        win = src.read(WIN, UTM, (50, 50))
    ref = local_read(scene, WIN, UTM, (50, 50))
    assert corr(win.data, ref, win.mask) > 0.95


# -- templates --------------------------------------------------------------------------
def test_template_kinds_give_same_pixels(server):
    reads = {}
    for kind in ("xyz", "tms", "wmts"):
        with fast(server.template(kind)) as src:
            reads[kind] = src.read(WIN, UTM, (300, 300)).data
    with fast(server.template("xyz", subdomain=True), subdomains="abc") as src:
        reads["s"] = src.read(WIN, UTM, (300, 300)).data
        assert src.tile_url(3, 1, 2) == server.url + "/a/xyz/3/1/2.png"
    for kind, data in reads.items():
        np.testing.assert_array_equal(data, reads["xyz"], err_msg=kind)
    assert len(server.subdomains_seen) >= 2
    assert server.count("/tms/") and server.count("/wmts/WebMercatorQuad/")


def test_template_validation():
    with pytest.raises(ImageryError, match="placeholders"):
        parse_template("https://example.org/tiles/{z}/{x}.png")
    with pytest.raises(ImageryError, match="unknown placeholder"):
        parse_template("https://example.org/{z}/{x}/{y}/{apikey}.png")
    with pytest.raises(ImageryError, match="http"):
        parse_template("ftp://example.org/{z}/{x}/{y}.png")
    assert parse_template("https://h/{q}.jpeg") == {"q"}
    src = XYZSource("https://h/{q}.jpeg")
    assert src.tile_url(3, 3, 5) == "https://h/213.jpeg" and src.info.kind == "xyz"
    src.close()


# -- faults, retries, cache -------------------------------------------------------------
def test_faulty_tiles_are_masked_and_counted(tiles, caplog):
    probe = fast("http://127.0.0.1:9/xyz/{z}/{x}/{y}.png")
    plan = probe.plan(WIN, UTM, (600, 600))
    probe.close()
    z = plan.zoom
    assert len(plan.cols) >= 3 and len(plan.rows) >= 3
    c, r = plan.cols, plan.rows
    bad = {(z, c[0], r[0]): "404", (z, c[1], r[1]): "500", (z, c[2], r[2]): "corrupt"}
    flaky = {(z, c[0], r[2]): "429-once", (z, c[2], r[0]): "500-once"}
    # render tiles now: rasterio's warp uses warnings.catch_warnings, which is not thread-safe
    # and would race with pytest.warns if the server threads rendered during the read
    for col, row in plan.tiles:
        tiles(z, col, row)
    with TileServer(tiles, {**bad, **flaky}) as srv, fast(srv.template(), retries=2) as src:
        with caplog.at_level("WARNING", logger="psm_mapping.imagery.xyz"):
            win = src.read(WIN, UTM, (600, 600))
        hits, times = dict(srv.hits), dict(srv.times)
    # one message per read (no second copy through the warnings module); a 404 is nodata
    msgs = [r.getMessage() for r in caplog.records if "tiles from" in r.getMessage()]
    assert len(msgs) == 1 and re.search(r"2 of \d+ tiles.*HTTP 500: 1.*corrupt image: 1", msgs[0])
    assert win.faults == 2 and src.stats.faults == 2
    assert hits[(z, c[0], r[0])] == 1  # 404 is not retried
    assert hits[(z, c[1], r[1])] == 3  # 500: first try + 2 retries
    assert hits[(z, c[2], r[2])] == 1  # corrupt bytes: HTTP was fine
    assert hits[(z, c[0], r[2])] == 2 and hits[(z, c[2], r[0])] == 2
    t429 = times[(z, c[0], r[2])]
    assert t429[1] - t429[0] >= 0.9  # Retry-After: 1 honoured

    # which tile each output pixel centre falls in, and how far from the tile edges
    h, w = win.mask.shape
    xs = WIN[0] + (np.arange(w) + 0.5) * (WIN[2] - WIN[0]) / w
    ys = WIN[3] - (np.arange(h) + 0.5) * (WIN[3] - WIN[1]) / h
    X, Y = np.meshgrid(xs, ys)
    mx, my = Transformer.from_crs(UTM, 3857, always_xy=True).transform(X, Y)
    span = WORLD / 2**z
    fx, fy = (mx + WORLD / 2) / span, (WORLD / 2 - my) / span
    col, row = np.floor(fx).astype(int), np.floor(fy).astype(int)
    inner = (np.abs(fx - np.round(fx)) > 0.05) & (np.abs(fy - np.round(fy)) > 0.05)
    failed = np.zeros_like(inner)
    for (_, tc, tr) in bad:
        failed |= (col == tc) & (row == tr)
    assert failed.sum() > 100
    assert not win.mask[failed & inner].any()
    assert win.mask[~failed & inner].all()
    assert 0.5 < win.valid_fraction < 1.0
    # the failed (500, corrupt) tiles are faults, the 404 tile is plain nodata
    transient = np.zeros_like(inner)
    for (_, tc, tr), why in bad.items():
        if why != "404":
            transient |= (col == tc) & (row == tr)
    assert win.fault_mask is not None
    assert win.fault_mask[transient & inner].all()
    assert not win.fault_mask[~transient & inner].any()


def test_disk_cache_second_read_makes_no_requests(tmp_path, server):
    cache = tmp_path / "tilecache"
    with fast(server.template(), cache_dir=str(cache)) as src:
        first = src.read(WIN, UTM, (100, 100))
        plan = src.plan(WIN, UTM, (100, 100))
    n_first = server.count()
    assert n_first == len(plan.tiles)
    tile = cache / template_key(server.template()) / str(plan.zoom) / str(plan.cols[0]) / \
        f"{plan.rows[0]}.png"
    assert tile.is_file() and tile.read_bytes()[:4] == b"\x89PNG"
    assert not list(cache.rglob(".tmp-*"))  # atomic writes leave no temporaries
    server.reset()
    with fast(server.template(), cache_dir=str(cache)) as src:
        second = src.read(WIN, UTM, (100, 100))
        assert src.stats.disk_hits == len(plan.tiles)
    assert server.count() == 0
    np.testing.assert_array_equal(first.data, second.data)
    np.testing.assert_array_equal(first.mask, second.mask)


def test_memory_cache_reuses_tiles_between_reads(server):
    with fast(server.template()) as src:
        src.read(WIN, UTM, (100, 100))
        n = server.count()
        src.read(WIN, UTM, (100, 100))
    assert server.count() == n


def test_user_agent_is_sent(server):
    with fast(server.template(), user_agent="psm-test/1.0") as src:
        src.read(WIN, UTM, (20, 20))
    assert set(server.user_agents) == {"psm-test/1.0"}
    with fast(server.template()) as src:
        assert src.http.config.user_agent.startswith("psm-mapping/")


def test_unreachable_server_is_a_clear_error():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with fast(f"http://127.0.0.1:{port}/{{z}}/{{x}}/{{y}}.png", retries=1) as src:
        with pytest.raises(ImageryError, match=r"cannot reach tile server 127\.0\.0\.1.*local raster"):
            src.read(WIN, UTM, (50, 50))


def test_window_outside_web_mercator_is_masked(server):
    polar = "EPSG:3413"  # north polar stereographic, window around the pole
    with fast(server.template()) as src:
        win = src.read((-50_000, -50_000, 50_000, 50_000), polar, (10, 10))
    assert not win.mask.any() and server.count() == 0


# -- presets ----------------------------------------------------------------------------
def test_presets():
    assert {"s2cloudless-2016", "s2cloudless-2020", "s2cloudless-2024",
            "esri-world-imagery"} <= set(PRESETS)
    assert PRESETS["s2cloudless-2016"].license.startswith("CC BY 4.0")
    assert PRESETS["s2cloudless-2020"].license.startswith("CC BY-NC-SA 4.0")
    assert "s2cloudless-2020_3857" in PRESETS["s2cloudless-2020"].url
    assert PRESETS["s2cloudless-2016"].url.count("s2cloudless_3857") == 1
    assert PRESETS["esri-world-imagery"].sat_type == "bingmap"
    rows = list_presets()
    assert len(rows) == len(PRESETS) + 1 and "esri-world-imagery" in "".join(rows)
    src = open_source("s2cloudless-2020", cache_dir=None)
    assert isinstance(src, XYZSource)
    assert src.info.kind == "wmts" or src.info.kind == "xyz"
    assert "Copernicus Sentinel data 2020" in src.info.attribution
    assert src.info.tags()["imagery_license"].startswith("CC BY-NC-SA")
    assert src.tile_url(2, 1, 3).endswith("s2cloudless-2020_3857/default/g/2/3/1.jpg")
    assert src.info.extra["sat_type"] == "sentinel"
    src.close()
    with open_preset("esri-world-imagery", max_zoom=17) as esri:
        assert esri.max_zoom == 17
    with pytest.raises(ImageryError, match="unknown imagery preset"):
        open_preset("nope")
