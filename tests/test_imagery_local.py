import sys
from pathlib import Path

import numpy as np
import pytest
from pyproj import Transformer
from rasterio.enums import ColorInterp
from rasterio.transform import from_origin

sys.path.insert(0, str(Path(__file__).parent))
from geo_fixtures import texture, utm_scene, write_raster  # noqa: E402

from psm_mapping.errors import ImageryError  # noqa: E402
from psm_mapping.imagery import open_source  # noqa: E402
from psm_mapping.imagery.local import LocalRasterSource  # noqa: E402

LON, LAT = 15.0, 50.0


def _merc_scene(tmp_path, size=400, res=10.0):
    """Dark EPSG:3857 scene around (LON, LAT) with a bright 20x20 px square centred there."""
    x, y = Transformer.from_crs(4326, 3857, always_xy=True).transform(LON, LAT)
    data = np.full((3, size, size), 20, dtype=np.uint8)
    c = size // 2
    data[:, c - 10:c + 10, c - 10:c + 10] = 250
    data[1, c - 10:c + 10, c - 10:c + 10] = 200
    tr = from_origin(x - c * res, y + c * res, res, res)
    return write_raster(tmp_path / "merc.tif", data, "EPSG:3857", tr)


def test_read_in_another_crs_is_georeferenced(tmp_path):
    path = _merc_scene(tmp_path)
    with LocalRasterSource(path) as src:
        assert src.info.kind == "local" and src.info.name == "merc.tif"
        # Mercator metres at 50N are cos(50) ground metres
        assert src.info.native_resolution == pytest.approx(10 * np.cos(np.radians(LAT)),
                                                           rel=0.01)
        ex, ny = Transformer.from_crs(4326, 32633, always_xy=True).transform(LON, LAT)
        bounds = (ex - 1000, ny - 1000, ex + 1000, ny + 1000)
        win = src.read(bounds, "EPSG:32633", (200, 200))  # 10 m pixels in UTM
        assert win.data.shape == (3, 200, 200) and win.data.dtype == np.uint8
        assert win.mask.all()
        bright = win.data[0] > 135
        rows, cols = np.nonzero(bright)
        # centroid of the bright square = (LON, LAT) within half an output pixel
        cx = bounds[0] + (cols.mean() + 0.5) * 10
        cy = bounds[3] - (rows.mean() + 0.5) * 10
        assert cx == pytest.approx(ex, abs=5) and cy == pytest.approx(ny, abs=5)
        # 20 px of 10 Mercator m = 200 * cos(50) ground m ~ 12.9 UTM pixels a side (+-1)
        side = 200 * np.cos(np.radians(LAT)) / 10
        assert (side - 1) ** 2 <= bright.sum() <= (side + 1) ** 2
        assert abs(int(win.data[1][bright].mean()) - 200) < 10  # band order kept


def test_mask_outside_raster(tmp_path):
    path = utm_scene(tmp_path / "s.tif", texture(100, 100), res=10.0)
    with LocalRasterSource(path) as src:
        # the scene spans x 500000..501000; read 500500..501500: half outside
        win = src.read((500_500, 5_599_000, 501_500, 5_600_000), "EPSG:32633", (50, 50))
        assert win.valid_fraction == pytest.approx(0.5, abs=0.03)
        assert win.mask[:, :20].all() and not win.mask[:, 30:].any()
        assert (win.data[:, :, 30:] == 0).all()
        far = src.read((600_000, 5_000_000, 601_000, 5_001_000), "EPSG:32633", (8, 8))
        assert not far.mask.any()


def test_nodata_and_alpha_masks(tmp_path):
    data = texture(64, 64).copy()
    data[:, :, :32] = 0
    p = utm_scene(tmp_path / "nd.tif", data, res=10.0, nodata=0)
    with LocalRasterSource(p) as src:
        win = src.read((500_000, 5_599_360, 500_640, 5_600_000), "EPSG:32633", (64, 64))
        assert win.mask[:, :30].sum() == 0 and win.mask[:, 34:].all()
    rgba = np.concatenate([texture(64, 64), np.zeros((1, 64, 64), np.uint8)])
    rgba[3, 32:] = 255
    p = utm_scene(tmp_path / "a.tif", rgba, res=10.0,
                  colorinterp=[ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                               ColorInterp.alpha])
    with LocalRasterSource(p) as src:
        assert src.bands == (1, 2, 3)
        win = src.read((500_000, 5_599_360, 500_640, 5_600_000), "EPSG:32633", (64, 64))
        assert not win.mask[:30].any() and win.mask[34:].all()


def test_16bit_stretch(tmp_path):
    data = np.zeros((3, 32, 32), dtype=np.uint16)
    data[0] = 1500
    data[1] = 6000
    data[2, :, :16] = 300
    data[2, :, 16:] = 1200
    p = utm_scene(tmp_path / "s2.tif", data, res=10.0)
    box = (500_000, 5_599_680, 500_320, 5_600_000)
    with LocalRasterSource(p) as src:
        assert src.stretch == (0.0, 3000.0)
        win = src.read(box, "EPSG:32633", (32, 32))
        assert (win.data[0] == 128).all()  # 1500 / 3000 * 255 = 127.5
        assert (win.data[1] == 255).all()  # clipped
        assert (win.data[2, :, :10] == 26).all() and (win.data[2, :, 22:] == 102).all()
    with LocalRasterSource(p, stretch=(1000, 2000)) as src:
        win = src.read(box, "EPSG:32633", (32, 32))
        assert (win.data[0] == 128).all() and (win.data[2, :, :10] == 0).all()
    with pytest.raises(ImageryError, match="stretch"):
        LocalRasterSource(p, stretch=(5, 5))


def test_band_selection(tmp_path):
    data = np.stack([np.full((16, 16), v, np.uint8) for v in (10, 20, 30, 40)])
    bgr = [ColorInterp.blue, ColorInterp.green, ColorInterp.red, ColorInterp.undefined]
    p = utm_scene(tmp_path / "bgr.tif", data, res=10.0, colorinterp=bgr)
    box = (500_000, 5_599_840, 500_160, 5_600_000)
    with LocalRasterSource(p) as src:
        assert src.bands == (3, 2, 1)
        assert tuple(src.read(box, "EPSG:32633", (4, 4)).data[:, 0, 0]) == (30, 20, 10)
    with LocalRasterSource(p, bands=(4, 4, 4)) as src:
        assert tuple(src.read(box, "EPSG:32633", (4, 4)).data[:, 0, 0]) == (40, 40, 40)
    with pytest.raises(ImageryError, match="bands"):
        LocalRasterSource(p, bands=(1, 2, 9))


def test_errors(tmp_path):
    grey = utm_scene(tmp_path / "g.tif", np.zeros((1, 8, 8), np.uint8), res=10.0)
    with pytest.raises(ImageryError, match="not RGB.*bands"):
        LocalRasterSource(grey)
    junk = tmp_path / "junk.tif"
    junk.write_bytes(b"not a tiff")
    with pytest.raises(ImageryError, match="not a raster GDAL can read"):
        LocalRasterSource(junk)
    with pytest.raises(ImageryError, match="does not exist"):
        open_source(str(tmp_path / "missing.tif"))
    nocrs = write_raster(tmp_path / "nocrs.tif", np.zeros((3, 8, 8), np.uint8), None,
                         from_origin(0, 8, 1, 1))
    with pytest.raises(ImageryError, match="no CRS"):
        LocalRasterSource(nocrs)


def test_overviews_are_used_and_downsampling_is_antialiased(tmp_path):
    # 1-px checkerboard: any aliasing shows up as strong contrast after downsampling
    yy, xx = np.mgrid[0:512, 0:512]
    cb = (((yy + xx) % 2) * 255).astype(np.uint8)
    p = utm_scene(tmp_path / "cb.tif", np.stack([cb] * 3), res=1.0, overviews=(2, 4))
    box = (500_000, 5_599_488, 500_512, 5_600_000)
    with LocalRasterSource(p) as src:
        assert src._overview_level(box, src.crs, (64, 64)) == 1  # 4 m overview for 8 m
        assert src._overview_level(box, src.crs, (512, 512)) is None
        win = src.read(box, "EPSG:32633", (48, 48))  # 10.7 m px: no overview is exact
        inner = win.data[0, 2:-2, 2:-2].astype(float)
        assert inner.std() < 3 and abs(inner.mean() - 127.5) < 3


def test_direct_read_matches_warped_read(tmp_path):
    p = utm_scene(tmp_path / "t.tif", texture(300, 300, seed=5), res=10.0, overviews=(2,))
    box = (500_123.0, 5_597_456.0, 500_123.0 + 150 * 13.7, 5_597_456.0 + 120 * 13.7)
    with LocalRasterSource(p) as src:
        ds = src._dataset(None)
        assert src._is_same_grid_crs(ds, src.crs)
        direct, dmask = src._read_direct(ds, box, (120, 150))
        warped, wmask = src._read_warped(ds, src.crs, box, (120, 150))
        assert dmask.all() and wmask.all()
        diff = np.abs(direct.astype(int) - warped.astype(int))
        assert diff.mean() < 0.5 and diff.max() <= 3
