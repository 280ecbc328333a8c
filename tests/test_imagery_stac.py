"""STAC Sentinel-2 source against a static catalog with COGs served over HTTP on 127.0.0.1."""
from __future__ import annotations

import datetime as dt

import numpy as np
import pystac
import pytest
import rasterio
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds

from psm_mapping.errors import ImageryError
from psm_mapping.imagery import open_source
from psm_mapping.imagery.stac import STACSource, bbox_intersects, _parse_datetime_range

from servers import StaticServer, scene_pattern, write_scene

pytestmark = pytest.mark.network

UTM = "EPSG:32632"
LEFT, TOP, RES = 500000.0, 5000000.0, 10.0
# scene A: least cloudy, covers the western 3 km; scene B: cloudier, covers all 5 km
SCENES = {  # id: (width px, seed, cloud %, date, file)
    "S2A_clear": (300, 1, 5.0, dt.datetime(2023, 6, 1, 10, 30), "A.tif"),
    "S2B_hazy": (500, 2, 15.0, dt.datetime(2023, 7, 1, 10, 30), "B.tif"),
    "S2A_cloudy": (500, 3, 60.0, dt.datetime(2023, 8, 1, 10, 30), "B.tif"),
    "S2B_2022": (500, 4, 1.0, dt.datetime(2022, 6, 1, 10, 30), "B.tif"),
}
WIN = (LEFT + 500, TOP - 3500, LEFT + 4500, TOP - 500)  # 4 km x 3 km, straddles A's edge
SHAPE = (150, 200)  # 20 m pixels


@pytest.fixture(scope="module")
def catalog_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("stac")
    (root / "cogs").mkdir()
    written = {}
    for sid, (width, seed, cloud, when, fname) in SCENES.items():
        path = root / "cogs" / fname
        if fname not in written:
            data = np.maximum(scene_pattern(400, width, seed), 1)  # 0 is nodata
            write_scene(path, UTM, LEFT, TOP, RES, 400, width, data=data, nodata=0,
                        driver="COG")
            written[fname] = path
    cat = pystac.Catalog("root", "test catalog")
    coll = pystac.Collection(
        "sentinel-2-l2a", "synthetic L2A", pystac.Extent(
            pystac.SpatialExtent([[-180, -90, 180, 90]]),
            pystac.TemporalExtent([[dt.datetime(2015, 1, 1, tzinfo=dt.timezone.utc), None]])))
    cat.add_child(coll)
    for sid, (width, seed, cloud, when, fname) in SCENES.items():
        bbox = transform_bounds(UTM, "EPSG:4326", LEFT, TOP - 4000, LEFT + width * RES, TOP)
        w, s, e, n = bbox
        geom = {"type": "Polygon", "coordinates": [[[w, s], [e, s], [e, n], [w, n], [w, s]]]}
        item = pystac.Item(sid, geom, list(bbox), when.replace(tzinfo=dt.timezone.utc),
                           {"eo:cloud_cover": cloud})
        item.add_asset("visual", pystac.Asset(str(root / "cogs" / fname),
                                              media_type=pystac.MediaType.COG, roles=["visual"]))
        coll.add_item(item)
    cat.normalize_hrefs(str(root))
    cat.make_all_asset_hrefs_relative()
    cat.save(pystac.CatalogType.SELF_CONTAINED)
    return root


@pytest.fixture()
def server(catalog_dir):
    with StaticServer(catalog_dir) as srv:
        yield srv


def local_read(path, bounds, shape):
    h, w = shape
    with rasterio.open(path) as src, WarpedVRT(
            src, crs=UTM, transform=from_bounds(*bounds, w, h), width=w, height=h,
            resampling=Resampling.average) as vrt:
        return vrt.read(), vrt.dataset_mask() > 0


def corr(a, b, m):
    return min(float(np.corrcoef(a[i][m].astype(float), b[i][m].astype(float))[0, 1])
               for i in range(3))


def test_search_filters_and_sorts(server):
    src = STACSource(server.url + "/catalog.json", datetime="2023-01-01/2023-12-31",
                     max_cloud=20)
    lonlat = transform_bounds(UTM, "EPSG:4326", *WIN)
    scenes = src.prepare(lonlat)
    assert [s.id for s in scenes] == ["S2A_clear", "S2B_hazy"]  # cloudy + 2022 dropped
    assert scenes[0].href == server.url + "/cogs/A.tif"
    assert "2023" in src.info.attribution and src.info.kind == "stac"
    # a bbox far away finds nothing: a clear error with the fix
    src2 = STACSource(server.url + "/catalog.json", max_cloud=20)
    with pytest.raises(ImageryError, match="widen the date range"):
        src2.prepare((100.0, 10.0, 100.1, 10.1))
    src3 = STACSource(server.url + "/catalog.json", max_cloud=80)
    assert [s.id for s in src3.prepare(lonlat)] == ["S2A_clear", "S2B_hazy", "S2A_cloudy"]


def test_mosaic_least_cloudy_first_fills_gaps_over_http(server, catalog_dir):
    with open_source("stac:" + server.url + "/catalog.json", max_cloud=20) as src:
        win = src.read(WIN, UTM, SHAPE)
    assert win.mask.all() and win.faults == 0
    a, am = local_read(catalog_dir / "cogs" / "A.tif", WIN, SHAPE)
    b, bm = local_read(catalog_dir / "cogs" / "B.tif", WIN, SHAPE)
    from_a = am.copy()
    from_a[:, -3:] = False
    inner_a = am & np.roll(am, 2, axis=1) & np.roll(am, -2, axis=1)
    inner_b = ~am & np.roll(~am, 2, axis=1) & np.roll(~am, -2, axis=1)
    assert 0.3 < inner_a.mean() < 0.7 and inner_b.mean() > 0.3
    assert corr(win.data, a, inner_a) > 0.98  # the clear scene wins where it has data
    assert corr(win.data, b, inner_b) > 0.98  # the hazy scene fills the rest
    assert corr(win.data, b, inner_a) < 0.5  # and does not overwrite the clear one
    # the COGs were read with range requests, never downloaded whole
    assert server.range_requests > 0
    assert server.count("GET /cogs/A.tif bytes=") > 0
    assert not [r for r in server.requests if r.startswith("GET /cogs/") and "bytes=" not in r]


def test_overview_is_used_for_coarse_reads(server):
    with STACSource(server.url + "/catalog.json") as src:
        win = src.read(WIN, UTM, (30, 40))  # 100 m pixels: the 2x overview is the right one
        with rasterio.Env(**src.gdal_env), rasterio.open(src.scenes[0].href) as ds:
            level, ratio = src._overview_level(ds, rasterio.crs.CRS.from_user_input(UTM),
                                               from_bounds(*WIN, 40, 30), (30, 40))
            assert ds.overviews(1) and level == len(ds.overviews(1)) - 1 and ratio >= 1
    assert win.mask.all()


def test_sign_hook_is_called(server):
    calls = []

    def sign(href):
        calls.append(href)
        return href + "?token=secret"

    with STACSource(server.url + "/catalog.json", sign=sign) as src:
        win = src.read(WIN, UTM, SHAPE)
    assert win.mask.all()
    assert server.url + "/cogs/A.tif" in calls and server.url + "/cogs/B.tif" in calls
    assert server.count("/cogs/A.tif?token=secret") > 0


def test_sign_by_name_needs_the_package():
    try:
        import planetary_computer  # noqa: F401
    except ImportError:
        with pytest.raises(ImageryError, match="pip install planetary-computer"):
            STACSource("https://example.org/stac", sign="planetary-computer")
    with pytest.raises(ImageryError, match="unknown sign hook"):
        STACSource("https://example.org/stac", sign="nope")


def test_local_catalog_path_and_unreadable_asset(catalog_dir, tmp_path, caplog):
    with STACSource(str(catalog_dir / "catalog.json")) as src:
        win = src.read(WIN, UTM, SHAPE)
    assert win.mask.all()

    def broken(href):
        return href.replace("A.tif", "missing.tif")

    with STACSource(str(catalog_dir / "catalog.json"), sign=broken) as src:
        with caplog.at_level("WARNING", logger="psm_mapping.imagery.stac"):
            win = src.read(WIN, UTM, SHAPE)
    assert sum("1 of 2 scenes could not be read" in r.getMessage() for r in caplog.records) == 1
    # the hazy scene could fill everything, but the clear scene's footprint is a fault (masked,
    # retried next run), never silently another scene's pixels
    assert win.faults == 1 and win.fault_mask is not None and win.fault_mask.any()
    assert not win.mask[win.fault_mask].any() and (win.data[:, win.fault_mask] == 0).all()


def test_helpers():
    s, e = _parse_datetime_range("2023-01-01/2023-12-31")
    assert s.isoformat() == "2023-01-01T00:00:00+00:00" and e.date() == dt.date(2023, 12, 31)
    assert e.hour == 23
    assert _parse_datetime_range("../2020-01-01")[0] is None
    with pytest.raises(ImageryError, match="ISO dates"):
        _parse_datetime_range("yesterday/today")
    assert bbox_intersects((179, 0, -179, 1), (-179.5, 0.5, -179.2, 0.6))  # antimeridian
    assert not bbox_intersects((0, 0, 1, 1), (2, 2, 3, 3))
    with pytest.raises(ImageryError, match="cannot open STAC catalog"):
        STACSource("/nonexistent/catalog.json").prepare((0, 0, 1, 1))


def test_stac_api_search(server, catalog_dir):
    from servers import StacApiServer

    items = []
    for item in pystac.read_file(str(catalog_dir / "catalog.json")).get_items(recursive=True):
        d = item.to_dict()
        d["assets"]["visual"]["href"] = server.url + "/cogs/" + \
            item.assets["visual"].href.rsplit("/", 1)[-1]
        d["collection"] = "sentinel-2-l2a"
        d["links"] = []
        items.append(d)
    with StacApiServer(items) as api:
        with open_source("stac:" + api.url + "/", max_cloud=20) as src:
            win = src.read(WIN, UTM, SHAPE)
            assert [s.id for s in src.scenes] == ["S2A_clear", "S2B_hazy"]
        body = api.searches[0]
        assert body["query"] == {"eo:cloud_cover": {"lt": 20.0}}
        assert body["collections"] == ["sentinel-2-l2a"]
        assert body["datetime"].startswith("2023-01-01T00:00:00")
        assert "sortby" not in body  # the API does not declare the sort extension
    assert win.mask.all() and server.count("GET /cogs/A.tif bytes=") > 0
    with StacApiServer(items) as api:
        with pytest.raises(ImageryError, match="raise the cloud limit"):
            STACSource(api.url + "/", max_cloud=0.5).read(WIN, UTM, SHAPE)
