import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pyproj import Transformer
from shapely.geometry import Polygon

sys.path.insert(0, str(Path(__file__).parent))
from geo_fixtures import texture, utm_scene  # noqa: E402

from psm_mapping import constants  # noqa: E402
from psm_mapping.errors import InputError  # noqa: E402
from psm_mapping.grid import make_grid  # noqa: E402
from psm_mapping.imagery.local import LocalRasterSource  # noqa: E402
from psm_mapping.region import Region  # noqa: E402
from psm_mapping.tiling import (  # noqa: E402
    iter_block_chips, iter_chips, normalize_chips, read_chip_windows,
)

# scene: 16 x 16 km at 20 m in UTM 33N, top-left (500000, 5600000)
X0, Y0, RES, N = 500_000.0, 5_600_000.0, 20.0, 800
SQUARE = 320.0  # metres per stripe / checker square
TO_LL = Transformer.from_crs(32633, 4326, always_xy=True)


def utm_region(cx, cy, half, name="r"):
    """A lon/lat region around a UTM 33N point (half-size in metres)."""
    pts = [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half),
           (cx - half, cy + half)]
    return Region(Polygon([TO_LL.transform(x, y) for x, y in pts]), name)


def pattern_scene(path):
    """Band 0: stripes in x, band 1: stripes in y, band 2: their checkerboard; squares of
    SQUARE metres aligned on multiples of SQUARE from the scene origin."""
    g = (np.arange(N) + 0.5) * RES
    sx = (np.floor(g / SQUARE) % 2).astype(bool)
    data = np.empty((3, N, N), np.uint8)
    data[0] = np.where(sx[None, :], 230, 30)
    data[1] = np.where(sx[:, None], 230, 30)
    data[2] = np.where(sx[None, :] ^ sx[:, None], 230, 30)
    return utm_scene(path, data, RES, origin=(X0, Y0))


@pytest.fixture(scope="module")
def pattern_path(tmp_path_factory):
    return pattern_scene(tmp_path_factory.mktemp("tiling") / "pattern.tif")


@pytest.fixture(scope="module")
def texture_path(tmp_path_factory):
    return utm_scene(tmp_path_factory.mktemp("tiling") / "tex.tif", texture(N, N, seed=3, smooth_px=10),
                     RES, origin=(X0, Y0), overviews=(2, 4))


def _crossings(profile):
    """Sub-pixel positions (pixel-centre coordinates) where a profile crosses its midpoint."""
    mid = (profile.max() + profile.min()) / 2.0
    d = profile - mid
    idx = np.nonzero(np.sign(d[:-1]) != np.sign(d[1:]))[0]
    return idx + d[idx] / (d[idx] - d[idx + 1]) + 0.5


def _fit_scale(positions_px, ground_left, res_nominal):
    """Fit chip px -> ground metres from stripe edges (edges at multiples of SQUARE)."""
    approx = ground_left + positions_px * res_nominal
    k = np.rint((approx - X0) / SQUARE)
    ground = X0 + k * SQUARE
    slope, icpt = np.polyfit(positions_px, ground, 1)
    return slope, icpt


@pytest.mark.parametrize("zoom", [1, 3, 5])
def test_chip_footprint_matches_zoom(pattern_path, zoom):
    cx, cy = X0 + 8000, Y0 - 8000
    grid = make_grid(utm_region(cx, cy, 700), sat_type="sentinel", zoom_levels=(zoom,))
    foot = constants.footprint_m("sentinel", zoom)
    res = foot / 224
    with LocalRasterSource(pattern_path) as src:
        batches = list(iter_chips(src, grid, progress=False))
    chips = np.concatenate([b.chips for b in batches])
    rows = np.concatenate([b.rows for b in batches])
    cols = np.concatenate([b.cols for b in batches])
    assert len(chips) == grid.pixel_count
    xs, ys = grid.pixel_centers()
    for k in range(len(chips)):
        chip = chips[k].astype(float)
        px_x, px_y = xs[rows[k], cols[k]], ys[rows[k], cols[k]]
        # x: band 0 stripes, columns; y: band 1 stripes, rows (ground y decreases downwards)
        slope_x, icpt_x = _fit_scale(_crossings(chip[0].mean(axis=0)), px_x - foot / 2, res)
        assert slope_x * 224 == pytest.approx(foot, rel=0.01)
        # chip centre (pixel coordinate 112) = grid pixel centre within half a chip pixel
        assert abs(icpt_x + 112 * slope_x - px_x) <= 0.5 * res + 0.05 * res
        pos_y = _crossings(chip[1].mean(axis=1))
        approx = (px_y + foot / 2) - pos_y * res
        ground = Y0 - np.rint((Y0 - approx) / SQUARE) * SQUARE
        slope_y, icpt_y = np.polyfit(pos_y, ground, 1)
        assert -slope_y * 224 == pytest.approx(foot, rel=0.01)
        assert abs(icpt_y + 112 * slope_y - px_y) <= 0.55 * res
        # the checkerboard period, by autocorrelation of the band-2 row profile of one row
        row = chip[2, 112] - chip[2, 112].mean()
        ac = np.correlate(row, row, mode="full")[223:]
        period_px = 2 * SQUARE / res
        lag = int(np.argmax(ac[int(period_px * 0.7):int(period_px * 1.3)])) + int(period_px * 0.7)
        assert lag == pytest.approx(period_px, abs=1.5)


def test_chips_equal_brute_force_reads(texture_path):
    cx, cy = X0 + 8000, Y0 - 8000
    grid = make_grid(utm_region(cx, cy, 1500), zoom_levels=(1, 3, 5))
    block = next(grid.blocks())
    xs, ys = grid.pixel_centers()
    with LocalRasterSource(texture_path) as src:
        for zoom in (1, 3, 5):
            foot = constants.footprint_m("sentinel", zoom)
            res = foot / 224
            wins = read_chip_windows(src, grid, block, zoom)
            assert len(wins) == 1
            w = wins[0]
            assert w.resolution == pytest.approx(res)
            for i, j in [(0, 0), (1, 2), (len(w.rows) - 1, len(w.cols) - 1)]:
                r, c = w.rows[i], w.cols[j]
                # a brute-force read of exactly this chip (its snapped centre) is identical
                left = w.bounds[0] + w.col_offsets[j] * res
                top = w.bounds[3] - w.row_offsets[i] * res
                ref = src.read((left, top - foot, left + foot, top), grid.crs, (224, 224))
                chip = w.chip(i, j).astype(int)
                assert np.abs(chip - ref.data).max() <= 2
                # and the snapped centre is the grid pixel centre within half a chip pixel
                assert abs(left + foot / 2 - xs[r, c]) <= res / 2 + 1e-6
                assert abs(top - foot / 2 - ys[r, c]) <= res / 2 + 1e-6
                if zoom == 1:  # default stride / chip res = 56: centres are exact
                    assert abs(left + foot / 2 - xs[r, c]) < 1e-6
                # against a read centred exactly on the pixel: strongly correlated
                exact = src.read((xs[r, c] - foot / 2, ys[r, c] - foot / 2,
                                  xs[r, c] + foot / 2, ys[r, c] + foot / 2), grid.crs,
                                 (224, 224)).data.astype(float)
                assert np.corrcoef(chip.ravel(), exact.ravel())[0, 1] > 0.95


def test_valid_fraction_near_scene_edge(texture_path):
    # region straddling the scene's right edge (x = X0 + 16000)
    grid = make_grid(utm_region(X0 + 16000, Y0 - 8000, 1000), zoom_levels=(1,))
    valid = {}
    with LocalRasterSource(texture_path) as src:
        block = next(grid.blocks())
        all_chips = list(iter_block_chips(src, grid, block, min_valid=0.0, valid_out=valid))
        kept = list(iter_block_chips(src, grid, block, min_valid=0.5))
    vf_map = valid[1]
    assert np.isnan(vf_map[~grid.mask[block.slices]]).all()
    xs, _ = grid.pixel_centers(block)
    foot = constants.footprint_m("sentinel", 1)
    expect = np.clip((X0 + 16000 - (xs - foot / 2)) / foot, 0, 1)
    m = grid.mask[block.slices]
    assert np.allclose(vf_map[m], expect[m], atol=0.01)
    n_all = sum(len(b) for b in all_chips)
    n_kept = sum(len(b) for b in kept)
    assert n_all == int(m.sum())
    assert n_kept == int((vf_map[m] >= 0.5).sum()) < n_all
    for b in kept:
        assert (b.valid_fraction >= 0.5).all()
        # pixels past the imagery edge are black (masked) in the chip
        assert b.chips.dtype == np.uint8 and b.chips.shape[1:] == (3, 224, 224)


def test_iter_chips_covers_every_region_pixel_once(texture_path):
    grid = make_grid(utm_region(X0 + 8000, Y0 - 8000, 2500), stride=400, zoom_levels=(1, 3))
    with LocalRasterSource(texture_path) as src:
        batches = list(iter_chips(src, grid, batch_size=7, block_size=8, progress=False))
        split = list(iter_chips(src, grid, batch_size=7, block_size=8, progress=False,
                                prefetch=False, max_window_px=600))
    seen = {(b.zoom, r, c) for b in batches for r, c in zip(b.rows, b.cols)}
    assert len(seen) == sum(len(b) for b in batches) == 2 * grid.pixel_count
    lon, lat = grid.pixel_lonlat()
    for b in batches:
        assert len(b) <= 7
        assert np.allclose(b.lon, lon[b.rows, b.cols]) and np.allclose(b.lat, lat[b.rows, b.cols])
        assert grid.mask[b.rows, b.cols].all()
        assert b.block is not None and (b.rows // 8 == b.block.index[0]).all()
    # splitting blocks into smaller windows gives the same chips
    key = {(b.zoom, r, c): b.chips[k] for b in batches for k, (r, c) in
           enumerate(zip(b.rows, b.cols))}
    for b in split:
        for k, (r, c) in enumerate(zip(b.rows, b.cols)):
            assert np.abs(key[(b.zoom, r, c)].astype(int) - b.chips[k]).max() <= 2


def test_normalize_chips():
    x = torch.zeros((2, 3, 4, 4), dtype=torch.uint8)
    x[1] = 255
    y = normalize_chips(x)
    assert y.dtype == torch.float32 and y.shape == x.shape
    mean = torch.tensor(constants.IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(constants.IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(y[0], (-mean / std).expand(3, 4, 4))
    assert torch.allclose(y[1], ((1 - mean) / std).expand(3, 4, 4))
    yb = normalize_chips(x.numpy(), device="cpu", dtype=torch.bfloat16)
    assert yb.dtype == torch.bfloat16
    with pytest.raises(InputError, match="uint8"):
        normalize_chips(x.float())
