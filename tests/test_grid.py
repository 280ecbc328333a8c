import numpy as np
import pytest
import shapely
from pyproj import CRS, Geod
from shapely.geometry import Point

from psm_mapping import constants
from psm_mapping.errors import InputError
from psm_mapping.grid import Block, make_grid, utm_crs_for
from psm_mapping.region import Region, region_from_bbox

GEOD = Geod(ellps="WGS84")


def _geodesic_area(geom) -> float:
    return abs(GEOD.geometry_area_perimeter(geom)[0])


def _check_grid_matches_region(grid, region, rel=0.03):
    """Pixel area inside the mask ~= the region's geodesic area; every masked pixel centre
    lies inside the region (checked in lon/lat)."""
    area = grid.pixel_count * grid.stride**2
    # edges of a lon/lat region are parallels and meridians: densify before geodesic area
    assert area == pytest.approx(_geodesic_area(shapely.segmentize(region.geometry, 0.01)),
                                 rel=rel)
    lon, lat = grid.pixel_lonlat()
    pts = shapely.points(lon[grid.mask], lat[grid.mask])
    inside = shapely.covers(region.geometry.buffer(1e-6), pts)  # 0.1 m: densification
    assert inside.all()


def test_default_stride_and_utm_zone():
    r = region_from_bbox("14.40,50.05,14.46,50.09")  # Prague, UTM 33N
    g = make_grid(r)
    assert g.crs == CRS.from_epsg(32633)
    assert g.stride == constants.footprint_m("sentinel", 1) / 4 == 640.0
    g2 = make_grid(r, sat_type="bingmap")
    assert g2.stride == pytest.approx(45.0)
    assert g2.transform.a == pytest.approx(45.0) and g2.transform.e == pytest.approx(-45.0)
    _check_grid_matches_region(g2, r)


def test_pixel_edges_aligned_and_shared():
    a = make_grid(region_from_bbox("14.40,50.05,14.46,50.09"), stride=30)
    b = make_grid(region_from_bbox("14.43,50.07,14.50,50.12"), stride=30)
    for g in (a, b):
        assert g.transform.c / 30 == pytest.approx(round(g.transform.c / 30), abs=1e-9)
        assert g.transform.f / 30 == pytest.approx(round(g.transform.f / 30), abs=1e-9)
    # overlapping pixels have the same centres: a's pixel (r, c) is b's (r + dr, c + dc)
    dc = (a.transform.c - b.transform.c) / 30
    dr = (b.transform.f - a.transform.f) / 30
    assert dc == pytest.approx(round(dc)) and dr == pytest.approx(round(dr))
    xa, ya = a.pixel_centers()
    xb, yb = b.pixel_centers()
    from pyproj import Transformer

    x, y = Transformer.from_crs(4326, a.crs, always_xy=True).transform(14.45, 50.08)
    r, c = (~a.transform @ (x, y))[::-1]  # a pixel in the overlap
    r, c = int(r), int(c)
    rb, cb = r + round(dr), c + round(dc)
    assert 0 <= rb < b.height and 0 <= cb < b.width
    assert xb[rb, cb] == pytest.approx(xa[r, c], abs=1e-6)
    assert yb[rb, cb] == pytest.approx(ya[r, c], abs=1e-6)
    assert a.mask[r, c] and b.mask[rb, cb]


def test_mask_is_pixel_centre_inside():
    r = Region(Point(14.45, 50.07).buffer(0.01), "disc")
    g = make_grid(r, stride=50)
    _check_grid_matches_region(g, r, rel=0.02)
    # a pixel whose centre is outside is masked off even if the pixel touches the region
    assert not g.mask[0].any() or not g.mask[:, 0].all()


def test_blocks_cover_mask_and_skip_empty():
    g = make_grid(Region(Point(14.45, 50.07).buffer(0.05), "disc"), stride=100)
    blocks = list(g.blocks(16))
    covered = np.zeros(g.shape, dtype=bool)
    for b in blocks:
        assert isinstance(b, Block)
        assert b.height <= 16 and b.width <= 16
        assert b.row_off == b.index[0] * 16 and b.col_off == b.index[1] * 16
        assert g.mask[b.slices].any()
        covered[b.slices] = True
    assert covered[g.mask].all()
    all_blocks = list(g.blocks(16, skip_empty=False))
    assert len(all_blocks) == -(-g.height // 16) * -(-g.width // 16) >= len(blocks)
    b = blocks[len(blocks) // 2]
    x, y = g.pixel_centers(b)
    assert x.shape == (b.height, b.width)
    assert x[0, 0] == pytest.approx(g.transform.c + (b.col_off + 0.5) * 100)
    assert y[0, 0] == pytest.approx(g.transform.f - (b.row_off + 0.5) * 100)
    lon, lat = g.pixel_lonlat(b)
    assert 14.3 < lon.mean() < 14.6 and 49.9 < lat.mean() < 50.2


def test_estimate_and_limits():
    r = region_from_bbox("14.0,50.0,14.3,50.2")
    g = make_grid(r, stride=500, zoom_levels=(1, 3))
    est = g.estimate()
    assert est.pixels == g.pixel_count and est.chips == 2 * g.pixel_count
    assert "chips" in str(est) and "GPU" in str(est)
    with pytest.raises(InputError, match="max_pixels"):
        make_grid(r, stride=500, max_pixels=100)
    for bad in (0, -5):
        with pytest.raises(InputError, match="stride"):
            make_grid(r, stride=bad)
    with pytest.raises(InputError, match="projected"):
        make_grid(r, crs="EPSG:4326")
    with pytest.raises(InputError, match="sat type"):
        make_grid(r, sat_type="landsat")
    g3857 = make_grid(r, stride=500, crs="EPSG:3857")
    assert g3857.crs == CRS.from_epsg(3857)
    assert g3857.geobox.shape == g3857.shape


def test_antimeridian_grid():
    r = region_from_bbox("179.9,-17.0,-179.9,-16.9")  # Fiji, ~21 x 11 km
    g = make_grid(r, stride=200)
    assert g.crs.to_epsg() in (32701, 32760)
    # one connected grid, not two halves on opposite sides of the earth
    assert g.width * 200 < 30_000
    _check_grid_matches_region(g, r)
    lon, lat = g.pixel_lonlat()
    inside = lon[g.mask]
    assert (inside > 179).any() and (inside < -179).any()
    assert np.all(np.abs(inside) > 179.89)


def test_utm_zone_boundary_grid():
    r = region_from_bbox("11.8,48.0,12.3,48.3")  # straddles the 32/33 boundary at 12E
    g = make_grid(r, stride=250)
    assert g.crs.to_epsg() == 32633  # centroid 12.05E
    _check_grid_matches_region(g, r, rel=0.02)
    assert utm_crs_for(11.99, 48).to_epsg() == 32632


def test_high_latitudes():
    sval = region_from_bbox("15.0,78.0,16.0,78.3")  # Svalbard: UTM 33X (special zone)
    g = make_grid(sval, stride=500)
    assert g.crs.to_epsg() == 32633
    _check_grid_matches_region(g, sval, rel=0.02)
    north = region_from_bbox("-20,85.0,20,86.0")  # beyond 84N: UPS North
    gn = make_grid(north, stride=2000)
    assert gn.crs.to_epsg() == 32661
    _check_grid_matches_region(gn, north, rel=0.02)
    south = region_from_bbox("100,-86.0,140,-85.0")
    gs = make_grid(south, stride=2000)
    assert gs.crs.to_epsg() == 32761
    _check_grid_matches_region(gs, south, rel=0.02)
    assert utm_crs_for(5, 60).to_epsg() == 32632  # the Norway exception
