import sys
from pathlib import Path

import pytest
import shapely
from shapely.geometry import LineString, Polygon, box

sys.path.insert(0, str(Path(__file__).parent))
from geo_fixtures import write_vector  # noqa: E402

from psm_mapping.errors import InputError, RegionError  # noqa: E402
from psm_mapping.region import load_region, parse_bbox, region_from_bbox  # noqa: E402


def test_geojson_union_of_features(tmp_path):
    p = write_vector(tmp_path / "r.geojson", [box(10, 50, 10.1, 50.1), box(10.2, 50, 10.3, 50.1)],
                     names=["a", "b"])
    r = load_region(p)
    assert r.name == "r"
    assert r.geometry.area == pytest.approx(0.02, rel=1e-9)
    assert r.bounds == pytest.approx((10, 50, 10.3, 50.1))


def test_feature_by_name_and_index(tmp_path):
    p = write_vector(tmp_path / "r.gpkg", [box(10, 50, 10.1, 50.1), box(10.2, 50, 10.3, 50.2)],
                     names=["park", "lake"])
    by_name = load_region(p, feature="lake")
    assert by_name.name == "lake"
    assert by_name.bounds == pytest.approx((10.2, 50, 10.3, 50.2))
    by_index = load_region(p, feature=0)
    assert by_index.bounds == pytest.approx((10, 50, 10.1, 50.1))
    assert load_region(p, feature="1").name == "lake"
    with pytest.raises(RegionError, match="no feature 'river'.*lake, park"):
        load_region(p, feature="river")


def test_projected_crs_is_reprojected(tmp_path):
    # 2 km square in UTM 33N around 15E 50N
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:4326", "EPSG:32633", always_xy=True)
    x, y = tr.transform(15.0, 50.0)
    p = write_vector(tmp_path / "utm.gpkg", [box(x - 1000, y - 1000, x + 1000, y + 1000)],
                     crs="EPSG:32633")
    r = load_region(p)
    lon, lat = r.centroid_lonlat()
    assert lon == pytest.approx(15.0, abs=1e-4) and lat == pytest.approx(50.0, abs=1e-4)
    w, s, e, n = r.bounds
    assert (n - s) * 111_200 == pytest.approx(2000, rel=0.01)


def test_shapefile_and_flatgeobuf(tmp_path):
    for name in ("r.shp", "r.fgb"):
        p = write_vector(tmp_path / name, [box(1, 2, 1.5, 2.5)])
        assert load_region(p).geometry.area == pytest.approx(0.25)


def test_invalid_geometry_is_repaired(tmp_path):
    bowtie = Polygon([(0, 0), (1, 1), (1, 0), (0, 1), (0, 0)])
    assert not bowtie.is_valid
    p = write_vector(tmp_path / "bow.geojson", [bowtie])
    r = load_region(p)
    assert r.geometry.is_valid
    assert r.geometry.area == pytest.approx(0.5)


def test_error_cases(tmp_path):
    with pytest.raises(RegionError, match="does not exist"):
        load_region(tmp_path / "nope.geojson")
    bad = tmp_path / "bad.geojson"
    bad.write_text("this is not json")
    with pytest.raises(RegionError, match="not|cannot read"):
        load_region(bad)
    txt = tmp_path / "notes.txt"
    txt.write_bytes(b"\x00\x01binary")
    with pytest.raises(RegionError, match="vector"):
        load_region(txt)
    empty = tmp_path / "empty.geojson"
    empty.write_text('{"type": "FeatureCollection", "features": []}')
    with pytest.raises(RegionError, match="no features"):
        load_region(empty)
    lines = write_vector(tmp_path / "lines.geojson", [LineString([(0, 0), (1, 1)])])
    with pytest.raises(RegionError, match="no area"):
        load_region(lines)
    # a shapefile without .prj whose coordinates are metres
    shp = write_vector(tmp_path / "m.shp", [box(500000, 5500000, 501000, 5501000)],
                       crs="EPSG:32633")
    shp.with_suffix(".prj").unlink()
    with pytest.raises(RegionError, match="no CRS.*not degrees"):
        load_region(shp)
    with pytest.raises(RegionError, match="exactly one"):
        load_region()
    # RegionError is an InputError (exit code 2 via the CLI)
    assert issubclass(RegionError, InputError)


def test_crs_less_degrees_is_accepted(tmp_path):
    shp = write_vector(tmp_path / "d.shp", [box(5, 45, 5.1, 45.1)])
    shp.with_suffix(".prj").unlink()
    assert load_region(shp).bounds == pytest.approx((5, 45, 5.1, 45.1))


def test_bbox_parse_and_errors():
    assert parse_bbox("2.29,48.85,2.31,48.87") == (2.29, 48.85, 2.31, 48.87)
    assert parse_bbox([1, 2, 3, 4]) == (1.0, 2.0, 3.0, 4.0)
    for bad in ("1,2,3", "a,b,c,d", "0,10,1,5", "0,0,200,1", "1,0,1,1"):
        with pytest.raises(RegionError, match="bbox"):
            parse_bbox(bad)
    r = load_region(bbox="2.29,48.85,2.31,48.87")
    assert r.geometry.area == pytest.approx(0.02 * 0.02)


def test_bbox_across_antimeridian():
    r = region_from_bbox("179.5,-17,-179.5,-16")
    assert r.crosses_antimeridian
    assert r.geometry.area == pytest.approx(1.0)
    lon, lat = r.centroid_lonlat()
    assert abs(abs(lon) - 180) < 1e-9 and lat == pytest.approx(-16.5)
    assert r.bounds == pytest.approx((179.5, -17, -179.5, -16))
    assert shapely.get_num_geometries(r.unwrapped()) == 1
    assert not region_from_bbox("10,0,11,1").crosses_antimeridian
