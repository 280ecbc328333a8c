"""The explorer's tiles over a real ``psm-map serve`` subprocess on 127.0.0.1, against a synthetic
store (200 x 160 px at 40 m, zoom levels 1 and 3, smooth random unit means, a few PENDING and
FAULT pixels) written with :class:`psm_mapping.store.EmbeddingStore`.

* float tiles (TiTiler's convention): ``.tif`` is a float32 GeoTIFF with the tile's Web Mercator
  georeferencing and NaN nodata (read with rasterio), ``.npy`` a float32 ``[2, 256, 256]`` array
  (values, mask) read with numpy; both hold the data the ``.png`` colours
* a fine tile's values are the store's similarity (``psm-map query``'s COG) at each tile pixel's
  centre (nearest resampling)
"""
from __future__ import annotations

import io

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from pyproj import CRS, Transformer
from rasterio.io import MemoryFile

from psm_mapping.cli import main
from psm_mapping.levels import build_levels  # noqa: E402
from psm_mapping.store import DONE, FAULT, PENDING, EmbeddingStore, StoreSpec

from test_serve import Server

TMS = morecantile.tms.get("WebMercatorQuad")
EPSG, PX, W, H, D = 32633, 40.0, 200, 160, 512
LEFT, TOP = 500_000.0, 5_600_000.0
ZOOMS = (1, 3)
HOLES = {(0, 10, 12): PENDING, (0, 100, 150): FAULT, (1, 50, 60): FAULT}


def build_store(path, ckpt_sha: str, block: int = 32) -> EmbeddingStore:
    spec = StoreSpec(crs_wkt=CRS.from_epsg(EPSG).to_wkt(), transform=tuple(Affine(PX, 0, LEFT, 0, -PX, TOP))[:6],
                     width=W, height=H, stride=PX, block_size=block, zoom_levels=ZOOMS, sat_type="sentinel",
                     checkpoint_sha256=ckpt_sha, imagery="synthetic", min_valid=0.5, fc_dim=D,
                     probabilistic=True)
    st = EmbeddingStore.open_or_create(str(path), spec, attrs={"metadata_options": None,
                                                               "provenance": {"imagery": "synthetic"}})
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:H, 0:W] / 50.0
    basis = rng.standard_normal((8, D)).astype(np.float32)
    g = st.group
    for zi in range(len(ZOOMS)):
        coef = np.stack([np.sin(xx * (k + 1) / 3 + zi + k) * np.cos(yy * (k + 2) / 4 - k) for k in range(8)], -1)
        m = coef.astype(np.float32) @ basis + 0.2 * rng.standard_normal((H, W, D)).astype(np.float32)
        m /= np.linalg.norm(m, axis=-1, keepdims=True)
        g["mean"][zi] = m.astype(np.float16)
        g["z_img"][zi] = m.astype(np.float16)  # a real store holds z_img wherever it holds a mean
        vs = rng.uniform(15, 25, (H, W)).astype(np.float32)
        status = np.full((H, W), DONE, np.uint8)
        for (z, r, c), s in HOLES.items():
            if z == zi:
                status[r, c] = s
                vs[r, c] = np.nan
        g["var_sum"][zi] = vs
        g["uncertainty"][zi] = np.sqrt(vs) * 15
        g["valid"][zi] = np.where(np.isfinite(vs), 1.0, np.nan).astype(np.float32)
        g["status"][zi] = status
    build_levels(st)  # the overviews a run writes with each block
    return st


@pytest.fixture(scope="module")
def synth(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    from psm_mapping.model.checkpoint import file_sha256
    from psm_mapping.model.factory import tiny_clap_config

    root = tmp_path_factory.mktemp("serve_tiles")
    store = root / "store.zarr"
    build_store(store, file_sha256(tiny_ckpt))
    clap = root / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    common = ["--checkpoint", str(tiny_ckpt), "--clap-config", str(clap), "--tokenizer", str(tokenizer_dir)]
    ref = root / "birds.tif"
    assert main(["query", str(store), "--query", "birds", "--out", str(ref), *common, "--device", "cpu",
                 "--quiet", "--no-previews"]) == 0
    with rasterio.open(ref) as src:
        sims = {d: src.read(i + 1) for i, d in enumerate(src.descriptions)}
    s = Server([str(store), *common, "--basemap", "none"], root)
    yield {"root": root, "store": store, "server": s, "ref": sims}
    assert s.stop() == 0, s.log.read_text()[-2000:]


def lonlat(col: float, row: float) -> tuple[float, float]:
    tr = Transformer.from_crs(EPSG, 4326, always_xy=True)
    return tr.transform(LEFT + col * PX, TOP - row * PX)


def ref_band(synth, zoom: int) -> np.ndarray:
    return next(v for k, v in synth["ref"].items() if k.startswith("similarity") and k.endswith(f"zoom {zoom}"))


def read_tif(content: bytes):
    with MemoryFile(content) as mem, mem.open() as src:
        return src.read(1), src.crs, src.bounds, src.nodata, src.dtypes[0], src.count


def test_float_tiles_hold_the_data_the_png_colours(synth):
    s = synth["server"]
    t = TMS.tile(*lonlat(W / 2, H / 2), 14)
    params = {"text": "birds", "zoom_level": "1"}
    rt = s.get(f"/tiles/14/{t.x}/{t.y}.tif", params=params)
    assert rt.status_code == 200 and rt.headers["content-type"].startswith("image/tiff")
    vals, crs, bounds, nodata, dtype, count = read_tif(rt.content)
    assert crs.to_epsg() == 3857 and dtype == "float32" and count == 1 and np.isnan(nodata)
    b = TMS.xy_bounds(t)
    np.testing.assert_allclose(tuple(bounds), (b.left, b.bottom, b.right, b.top), rtol=0, atol=1e-6)
    assert vals.shape == (256, 256) and np.isfinite(vals).sum() > 1000
    rn = s.get(f"/tiles/14/{t.x}/{t.y}.npy", params=params)
    assert rn.status_code == 200
    arr = np.load(io.BytesIO(rn.content))
    assert arr.shape == (2, 256, 256) and arr.dtype == np.float32
    np.testing.assert_array_equal(arr[0], vals)  # NaN at the same places (array_equal treats NaN as equal)
    np.testing.assert_array_equal(arr[1], np.where(np.isfinite(vals), 255, 0))
    # the PNG is those values coloured over vmin..vmax (alpha 0 exactly where there is no data)
    from psm_mapping.serve.tiles import lut

    lo, hi = float(np.nanmin(vals)), float(np.nanmax(vals))
    rp = s.get(f"/tiles/14/{t.x}/{t.y}.png", params={**params, "vmin": lo, "vmax": hi})
    img = np.asarray(Image.open(io.BytesIO(rp.content)).convert("RGBA"))
    np.testing.assert_array_equal(img[..., 3] > 0, np.isfinite(vals))
    idx = (np.clip((np.nan_to_num(vals, nan=lo) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    want = lut("viridis")[idx][..., :3]
    fin = np.isfinite(vals)
    assert np.abs(img[..., :3][fin].astype(int) - want[fin].astype(int)).max() <= 1
    # the score band: the same values rescaled 0..1 over the query's colour range (a coarse level:
    # full-resolution values may fall a little outside it)
    sc = np.load(io.BytesIO(s.get(f"/tiles/14/{t.x}/{t.y}.npy", params={**params, "band": "score"}).content))[0]
    rng = s.get("/api/query", params={"text": "birds"}).json()["zoom_levels"][0]["similarity"]
    want_sc = (vals - np.float32(rng["min"])) / (np.float32(rng["max"]) - np.float32(rng["min"]))
    np.testing.assert_allclose(sc, want_sc, rtol=0, atol=1e-5)
    assert 0.2 < np.nanmean((sc >= 0) & (sc <= 1)) and np.nanmax(sc) > 0.5
    # outside the store: an all-NaN tile, never an error
    far = TMS.tile(*lonlat(W * 40, H * 40), 14)
    v_far, *_ = read_tif(s.get(f"/tiles/14/{far.x}/{far.y}.tif", params=params).content)
    assert np.isnan(v_far).all()
    assert np.load(io.BytesIO(s.get(f"/tiles/14/{far.x}/{far.y}.npy", params=params).content))[1].max() == 0
    # an unknown format is a JSON 4xx naming the ones there are
    r = s.get(f"/tiles/14/{t.x}/{t.y}.jpg", params=params)
    assert r.status_code == 404 and ".tif" in r.json()["error"]


@pytest.mark.parametrize("zoom_level", [1, 3])
def test_fine_tile_values_are_the_store_similarity(synth, zoom_level):
    """At web zoom 16 (a tile pixel ~1.5 m, the store's 40 m pixels): each tile pixel's value is
    the similarity of the store pixel under its centre, as `psm-map query` computes it."""
    s = synth["server"]
    ref = ref_band(synth, zoom_level)
    to_store = Transformer.from_crs(3857, EPSG, always_xy=True)
    checked = 0
    for col, row in ((W / 2, H / 2), (12.5, 10.5), (150.5, 100.5), (60.5, 50.5)):
        t = TMS.tile(*lonlat(col, row), 16)
        r = s.get(f"/tiles/16/{t.x}/{t.y}.tif", params={"text": "birds", "zoom_level": str(zoom_level)})
        vals, *_ = read_tif(r.content)
        b = TMS.xy_bounds(t)
        step = (b.right - b.left) / 256
        jj, ii = np.meshgrid(np.arange(256), np.arange(256))
        x, y = to_store.transform(b.left + (jj + 0.5) * step, b.top - (ii + 0.5) * step)
        c = np.floor((x - LEFT) / PX).astype(int)
        rr = np.floor((TOP - y) / PX).astype(int)
        # pixels near a store pixel's edge may fall either side (the tiler's reprojection grid)
        fx, fy = (x - LEFT) / PX % 1, (TOP - y) / PX % 1
        inner = (fx > 0.02) & (fx < 0.98) & (fy > 0.02) & (fy < 0.98) & (c >= 0) & (c < W) & (rr >= 0) & (rr < H)
        want = ref[rr[inner], c[inner]]
        np.testing.assert_allclose(vals[inner], want, rtol=0, atol=1e-5)
        checked += int(inner.sum())
    assert checked > 100_000


def cell_means(a: np.ndarray, k: int) -> np.ndarray:
    """The mean of ``a``'s finite values over cells of ``2**k`` x ``2**k`` pixels (NaN: none)."""
    n = 1 << k
    h, w = -(-a.shape[0] // n) * n, -(-a.shape[1] // n) * n
    p = np.full((h, w), np.nan)
    p[:a.shape[0], :a.shape[1]] = a
    cells = p.reshape(h // n, n, w // n, n)
    fin = np.isfinite(cells)
    with np.errstate(invalid="ignore"):
        return np.where(fin, cells, 0).sum((1, 3)) / fin.sum((1, 3))


def test_coarse_tile_reads_the_level_of_its_pixel(synth):
    """Web zoom 9 (a tile pixel ~195 m on the ground, store pixels 40 m): the tile shows level 2
    (160 m cells, the largest not coarser than its pixel), each value the average of the
    full-resolution similarities of the cell's DONE pixels."""
    s = synth["server"]
    ref = ref_band(synth, 1)
    want = cell_means(ref, 2)
    t = TMS.tile(*lonlat(W / 2, H / 2), 9)
    vals, *_ = read_tif(s.get(f"/tiles/9/{t.x}/{t.y}.tif", params={"text": "birds", "zoom_level": "1"}).content)
    b = TMS.xy_bounds(t)
    step = (b.right - b.left) / 256
    jj, ii = np.meshgrid(np.arange(256), np.arange(256))
    x, y = Transformer.from_crs(3857, EPSG, always_xy=True).transform(b.left + (jj + 0.5) * step,
                                                                       b.top - (ii + 0.5) * step)
    fx, fy = (x - LEFT) / (4 * PX), (TOP - y) / (4 * PX)
    c, r = np.floor(fx).astype(int), np.floor(fy).astype(int)
    inside = (c >= 0) & (c < want.shape[1]) & (r >= 0) & (r < want.shape[0])
    assert np.isfinite(vals).sum() == pytest.approx(inside.sum(), rel=0.05)
    inner = inside & (fx % 1 > 0.05) & (fx % 1 < 0.95) & (fy % 1 > 0.05) & (fy % 1 < 0.95)
    assert inner.sum() > 200
    np.testing.assert_allclose(vals[inner], want[r[inner], c[inner]], rtol=0, atol=2e-5)


def test_a_new_query_computes_only_the_tiles_window(synth):
    """A fine tile of a query never asked: the similarity of the chunk of full-resolution cells
    under the tile (one of the store's 3 x 4 level-0 chunks of 64 x 64 cells) and of the colour
    range's coarse level (level 1: 80 x 100 cells, 2 x 2 chunks); nothing else, and each once."""
    s = synth["server"]
    t = TMS.tile(*lonlat(30.5, 30.5), 16)
    r = s.get(f"/tiles/16/{t.x}/{t.y}.png", params={"text": "a lonely owl", "zoom_level": "3"})
    assert r.status_code == 200 and len(r.content) > 500
    computed = {c["key"]: c["times"] for c in s.get("/api/stats").json()["computed"]
                if "'a lonely owl'" in c["key"] and c["key"].startswith("('similarity'")}
    # key: (kind, query, month/hour, zoom index, level, chunk row, chunk column)
    want = {(1, 0, 0, 0)} | {(1, 1, i, j) for i in (0, 1) for j in (0, 1)}  # the tile's, the range's
    assert computed == {repr(("similarity", ("a lonely owl", None), (None, None), *k)): 1 for k in want}, computed


def test_colour_range_comes_from_a_coarse_level(synth):
    """The 200 x 160 px store's range level is 1 (100 x 80 cells, at most 128 a side): the query's
    range is the min/max of those cells' averages, the same for every tile."""
    s = synth["server"]
    d = s.get("/api/query", params={"text": "birds"}).json()
    for entry, z in zip(d["zoom_levels"], ZOOMS):
        cells = cell_means(ref_band(synth, z), 1)
        assert entry["range_level"] == 1
        assert entry["similarity"]["min"] == pytest.approx(float(np.nanmin(cells)), abs=2e-5)
        assert entry["similarity"]["max"] == pytest.approx(float(np.nanmax(cells)), abs=2e-5)
        assert entry["valid_pixels"] == W * H - sum(1 for (zi, _, _) in HOLES if ZOOMS[zi] == z)
    assert d["approximate"] is False


def test_download_larger_than_the_memory_limit_is_refused_with_the_fix(synth, tiny_ckpt, tokenizer_dir, tmp_path):
    """The download builds the map in memory: over half the memory limit it is a 413 naming the
    streamed command, never an out-of-memory server."""
    from psm_mapping.serve.engine import Explorer, RequestError

    ex = Explorer(str(synth["store"]), checkpoint=str(tiny_ckpt), clap_config=str(synth["root"] / "clap.json"),
                  tokenizer=str(tokenizer_dir), memory_limit=1e6)
    try:
        with pytest.raises(RequestError) as e:
            ex.export_cog(ex.query_spec("birds"), tmp_path / "x.tif")
        assert e.value.status == 413 and "psm-map query" in str(e.value) and "memory" in str(e.value)
        assert not (tmp_path / "x.tif").exists()
    finally:
        ex.close()
