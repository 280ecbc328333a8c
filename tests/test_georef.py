"""The same scene as a local GeoTIFF and as XYZ tiles served on 127.0.0.1 gives the same grid and
chips whose pixels correlate > 0.95 at every zoom level (issue: regions, imagery, tiler)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from shapely.geometry import box

sys.path.insert(0, str(Path(__file__).parent))
from geo_fixtures import texture, utm_scene  # noqa: E402
from servers import SceneTiles, TileServer  # noqa: E402

from psm_mapping.grid import make_grid  # noqa: E402
from psm_mapping.imagery.local import LocalRasterSource  # noqa: E402
from psm_mapping.imagery.xyz import XYZSource  # noqa: E402
from psm_mapping.region import Region  # noqa: E402
from psm_mapping.tiling import iter_chips  # noqa: E402


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    # 1800 x 1800 px at 10 m (18 km) of smooth texture, in UTM 33N
    data = texture(1800, 1800, seed=1, smooth_px=12)
    return utm_scene(tmp_path_factory.mktemp("georef") / "scene.tif", data, 10.0)


def _chips(source, grid, zooms):
    out = {}
    for b in iter_chips(source, grid, zooms, batch_size=64, progress=False, prefetch=False):
        for k in range(len(b)):
            out[(b.zoom, int(b.rows[k]), int(b.cols[k]))] = b.chips[k].astype(np.float64)
    return out


def test_local_and_xyz_chips_agree(scene):
    from pyproj import Transformer

    tr = Transformer.from_crs("EPSG:32633", "EPSG:4326", always_xy=True)
    lon0, lat0 = tr.transform(509_000, 5_591_000)
    lon1, lat1 = tr.transform(510_500, 5_592_500)
    region = Region(box(lon0, lat0, lon1, lat1), "georef")
    grid = make_grid(region, stride=640, sat_type="sentinel", zoom_levels=(1, 3))
    local = _chips(LocalRasterSource(scene), grid, (1, 3))
    with TileServer(SceneTiles(scene)) as srv:
        xyz_src = XYZSource(srv.template(), max_zoom=16)
        xyz_grid = make_grid(region, stride=640, sat_type="sentinel", zoom_levels=(1, 3))
        tiles = _chips(xyz_src, xyz_grid, (1, 3))
    # the same grid, the same chips
    assert xyz_grid.crs == grid.crs and xyz_grid.transform == grid.transform
    assert np.array_equal(xyz_grid.mask, grid.mask)
    assert set(local) == set(tiles) and len(local) >= 2 * grid.pixel_count
    corr = {k: np.corrcoef(local[k].ravel(), tiles[k].ravel())[0, 1] for k in local}
    print({z: min(v for k, v in corr.items() if k[0] == z) for z in (1, 3)})
    assert min(corr.values()) > 0.95
    # and a chip of a neighbouring pixel correlates clearly less: the match is the georeferencing
    k = next(iter(local))
    other = next(j for j in local if j[0] == k[0] and j != k)
    assert np.corrcoef(local[k].ravel(), tiles[other].ravel())[0, 1] < corr[k] - 0.05
