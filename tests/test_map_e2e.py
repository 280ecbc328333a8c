"""The main job end to end: ``psm-map REGION --imagery ... --query ...`` on real files.

A synthetic 4 km scene at 10 m in UTM 32N, a small non-rectangular region in its middle, a tiny
checkpoint (embed_dim 64, depth 1) and tokenizer; stride 40 m at zoom 1 (sentinel chips cover
2.56 km, so the scene holds every chip's footprint): an 8 x 8 px grid.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import soundfile as sf
from pyproj import Transformer

from psm_mapping.cli import main
from psm_mapping.model.checkpoint import file_sha256
from psm_mapping.model.factory import tiny_clap_config

from servers import SceneTiles, TileServer, write_scene

UTM = "EPSG:32632"
LEFT, TOP, RES, SIZE = 498000.0, 4986000.0, 10.0, 400
STRIDE = 40.0


# -- inputs (also used by test_store.py and test_bad_inputs.py) -------------------------------
def write_region(path: Path, half_m: float = 160.0, shape: str = "triangle",
                 center: tuple[float, float] | None = None, crs: str = UTM) -> Path:
    """A GeoJSON polygon (lon/lat) around ``center`` (grid CRS metres; default: scene centre)."""
    cx, cy = center or (LEFT + SIZE * RES / 2, TOP - SIZE * RES / 2)
    if shape == "triangle":  # pixels outside it stay NaN in the 2*half/stride square grid
        pts = [(-1, -1), (1, -1), (-1, 1)]
    else:
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    tr = Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    # a hair inside the pixel edges so the bounding box maps to exactly 2*half/stride pixels
    ring = [list(tr.transform(cx + dx * (half_m - 0.01), cy + dy * (half_m - 0.01))) for dx, dy in pts]
    ring.append(ring[0])
    gj = {"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": "testregion"},
        "geometry": {"type": "Polygon", "coordinates": [ring]}}]}
    path.write_text(json.dumps(gj))
    return path


def write_chirp(path: Path, seconds: float = 2.0, sr: int = 32000, amp: float = 0.3) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    y = amp * np.sin(2 * np.pi * (1500 + 1500 * (t % 0.25) / 0.25) * t)
    sf.write(str(path), y.astype(np.float32), sr)
    return path


def make_inputs(folder: Path, ckpt: Path, tokenizer: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    scene = folder / "scene.tif"
    if not scene.exists():
        write_scene(scene, UTM, LEFT, TOP, RES, SIZE, SIZE, seed=3)
    clap = folder / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    return {"scene": scene, "region": write_region(folder / "region.geojson"),
            "square": write_region(folder / "square.geojson", half_m=240.0, shape="square"),
            "clap": clap, "ckpt": ckpt, "tokenizer": tokenizer,
            "audio": write_chirp(folder / "chirp.wav")}


def base_args(inp: dict, out: Path, *extra: str, region: str = "region", imagery: str | None = None) -> list[str]:
    """The acceptance form."""
    return [str(inp[region]), "--imagery", imagery or str(inp["scene"]), "--checkpoint", str(inp["ckpt"]),
            "--clap-config", str(inp["clap"]), "--tokenizer", str(inp["tokenizer"]), "--zoom-level", "1",
            "--stride", f"{STRIDE:g}", "--device", "cpu", "--quiet", "--out", str(out), *extra]


def read_cog(path) -> tuple[np.ndarray, dict, tuple, dict]:
    with rasterio.open(path) as src:
        return src.read(), src.tags(), src.descriptions, {"crs": src.crs, "transform": src.transform,
                                                          "nodata": src.nodata}


def band(path, name_part: str) -> np.ndarray:
    with rasterio.open(path) as src:
        for i, d in enumerate(src.descriptions, 1):
            if name_part in d:
                return src.read(i)
    raise AssertionError(f"no band with {name_part!r} in {path}")


def grid_for(inp: dict, region: str = "region"):
    from psm_mapping.grid import make_grid
    from psm_mapping.region import load_region

    return make_grid(load_region(str(inp[region])), stride=STRIDE, sat_type="sentinel", zoom_levels=(1,))


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inp(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    return make_inputs(tmp_path_factory.mktemp("e2e-inputs"), tiny_ckpt, tokenizer_dir)


@pytest.fixture(scope="module")
def first(inp, tmp_path_factory):
    """The acceptance run: COG with one text query; its store is reused by the tests below."""
    out = tmp_path_factory.mktemp("e2e-out") / "map.tif"
    assert main(base_args(inp, out, "--query", "birds")) == 0
    stores = list((out.parent / "psm-store").glob("*.zarr"))
    assert len(stores) == 1
    return {"out": out, "store": stores[0]}


# -- tests -----------------------------------------------------------------------------------
def test_cog_acceptance(inp, first):
    from rio_cogeo.cogeo import cog_validate

    out = first["out"]
    valid, errors, _ = cog_validate(str(out))
    assert valid, errors
    data, tags, desc, meta = read_cog(out)
    assert data.shape == (2, 8, 8) and data.dtype == np.float32
    assert "birds" in desc[0] and "zoom 1" in desc[0] and "similarity" in desc[0]
    assert "uncertainty" in desc[1] and "zoom 1" in desc[1]
    assert tags["checkpoint_sha256"] == file_sha256(inp["ckpt"])
    assert tags["sat_type"] == "sentinel"
    assert tags["imagery_source"] == "scene.tif" and tags["imagery_kind"] == "local"
    assert tags["zoom_levels"] == "1" and tags["stride_m"] == "40"
    assert "text:birds" in tags["queries"]
    assert tags["model"].startswith("PSM") and "imagery_attribution" in tags
    assert "fuse=True" in tags["metadata"] and tags["fusion"] in ("on", "off")
    grid = grid_for(inp)
    assert meta["crs"].to_epsg() == 32632
    assert tuple(meta["transform"])[:6] == tuple(grid.transform)[:6]
    assert np.isnan(meta["nodata"])
    # NaN exactly outside the region (the triangle leaves about half of the square empty)
    assert 0 < grid.mask.sum() < grid.mask.size
    for b in data:
        assert np.array_equal(np.isfinite(b), grid.mask)
    # similarity is a negative csd: below 0, above -(2 + 2 + sum of variances)
    assert np.all(data[0][grid.mask] < 0)
    assert np.all(data[1][grid.mask] > 0)
    # previews and the HTML page next to the map
    prev = out.parent / "map.tif.preview"
    assert (prev / "index.html").is_file() and len(list(prev.glob("*.png"))) >= 2


def test_zarr_output(inp, first):
    import rioxarray  # noqa: F401
    import xarray as xr

    out = first["out"].parent / "map.zarr"
    assert main(base_args(inp, out, "--query", "birds", "--format", "zarr", "--no-previews")) == 0
    ds = xr.open_zarr(out)
    assert ds.rio.crs.to_epsg() == 32632
    assert ds.sizes["x"] == 8 and ds.sizes["y"] == 8
    cog = band(first["out"], "birds")
    # the one variable holding the similarity band, whatever the layout
    arrays = [np.asarray(ds[v].values, dtype=np.float32) for v in ds.data_vars]
    flat = [a.reshape(-1, 8, 8) for a in arrays if a.size % 64 == 0 and a.ndim >= 2]
    assert any(np.allclose(c, cog, equal_nan=True) for a in flat for c in a)
    assert "checkpoint_sha256" in json.dumps(dict(ds.attrs), default=str)


def test_second_query_reuses_store(inp, first, tmp_path):
    from psm_mapping.run import MapConfig, map_region

    cfg = MapConfig(region=str(inp["region"]), imagery=str(inp["scene"]), queries=["rain on a roof"],
                    checkpoint=str(inp["ckpt"]), clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]),
                    zoom_levels=(1,), stride=STRIDE, device="cpu", out=str(tmp_path / "rain.tif"),
                    store=str(first["store"].parent), progress=False, previews=False)
    run = map_region(cfg, log_fn=lambda *a: None)
    assert run.image_model_calls == 0 and run.blocks_computed == 0 and run.chips == 0
    assert Path(run.store) == first["store"]
    assert np.isfinite(band(tmp_path / "rain.tif", "rain")).sum() == grid_for(inp).mask.sum()


def test_query_subcommand_equals_fresh_run(inp, first, tmp_path):
    q = tmp_path / "q.tif"
    assert main(["query", str(first["store"]), "--query", "waves on the beach", "--checkpoint", str(inp["ckpt"]),
                 "--clap-config", str(inp["clap"]), "--tokenizer", str(inp["tokenizer"]), "--device", "cpu",
                 "--quiet", "--no-previews", "--out", str(q)]) == 0
    fresh = tmp_path / "fresh" / "f.tif"
    fresh.parent.mkdir()
    assert main(base_args(inp, fresh, "--query", "waves on the beach", "--no-previews")) == 0
    a, b = band(q, "waves"), band(fresh, "waves")
    assert np.isfinite(b).sum() == grid_for(inp).mask.sum()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(band(q, "uncertainty"), band(fresh, "uncertainty"))


def test_query_metadata_refuses_from_z_img(inp, first, tmp_path):
    """--month/--hour re-run fusion from the stored z_img: different from the default metadata,
    and equal (to float16 storage) to a store computed with those metadata from the start."""
    common = ["--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]), "--tokenizer",
              str(inp["tokenizer"]), "--device", "cpu", "--quiet", "--no-previews", "--query", "birds"]
    meta = tmp_path / "meta.tif"
    assert main(["query", str(first["store"]), *common, "--month", "3", "--hour", "7", "--out", str(meta)]) == 0
    unfused = tmp_path / "unfused.tif"
    assert main(["query", str(first["store"]), *common, "--no-fusion", "--out", str(unfused)]) == 0
    base = band(first["out"], "birds")
    m, u = band(meta, "birds"), band(unfused, "birds")
    mask = grid_for(inp).mask
    assert np.abs(m - base)[mask].min() > 1e-5
    assert np.abs(u - base)[mask].min() > 1e-5
    with rasterio.open(meta) as src:
        assert "month=3" in src.tags()["metadata"] and "hour=7" in src.tags()["metadata"]
    with rasterio.open(unfused) as src:
        assert src.tags()["fusion"] == "off"
    # the same metadata given at embedding time (a new store): the stored mean is computed directly
    direct = tmp_path / "direct" / "d.tif"
    direct.parent.mkdir()
    assert main(base_args(inp, direct, "--query", "birds", "--month", "3", "--hour", "7", "--no-previews")) == 0
    d = band(direct, "birds")
    assert np.nanmax(np.abs(d - m)) < 2e-3
    # differences between the settings dwarf the storage error
    assert np.nanmax(np.abs(d - m)) < 0.2 * np.nanmax(np.abs(m - base))


def test_audio_and_combined_queries(inp, first, tmp_path):
    out = tmp_path / "audio.tif"
    assert main(base_args(inp, out, "--store", str(first["store"].parent), "--audio", str(inp["audio"]),
                          "--query", "birds", "--combine", "--no-previews")) == 0
    _, tags, desc, _ = read_cog(out)
    assert len(desc) == 2 and "birds + chirp.wav" in desc[0]
    assert "text+audio:birds + chirp.wav" in tags["queries"]
    out2 = tmp_path / "audio2.tif"
    assert main(base_args(inp, out2, "--store", str(first["store"].parent), "--audio", str(inp["audio"]),
                          "--query", "birds", "--no-previews")) == 0
    _, _, desc2, _ = read_cog(out2)
    assert len(desc2) == 3 and "chirp.wav" in desc2[1] and "audio" in desc2[1]
    mask = grid_for(inp).mask
    comb, txt, aud = band(out, "birds + chirp"), band(out2, "'birds'"), band(out2, "chirp.wav")
    for a in (comb, txt, aud):
        assert np.array_equal(np.isfinite(a), mask)
    # the same text query as the first run (the product with 2 queries may round differently)
    np.testing.assert_allclose(txt, band(first["out"], "birds"), rtol=0, atol=1e-5)
    assert np.abs(comb - txt)[mask].min() > 1e-4 and np.abs(comb - aud)[mask].min() > 1e-4


def test_similarity_equals_direct_csd(inp, first):
    """A map value equals csd(image, text) computed with the model on the chip the tiler cuts
    for that pixel; the stored z_img matches the direct one (float16 storage)."""
    import torch

    from psm_mapping.embed import MetadataOptions
    from psm_mapping.imagery import open_source
    from psm_mapping.model import PSM
    from psm_mapping.model.heads import csd
    from psm_mapping.store import EmbeddingStore
    from psm_mapping.tiling import normalize_chips, read_chip_windows

    grid = grid_for(inp)
    model = PSM.from_checkpoint(inp["ckpt"])
    text = model.embed_text_queries(["birds"], tokenizer=str(inp["tokenizer"]))
    (block,) = list(grid.blocks(64))
    with open_source(str(inp["scene"])) as src:
        (win,) = read_chip_windows(src, grid, block, 1)
    store = EmbeddingStore.open(str(first["store"]))
    z_store = np.asarray(store.group["z_img"][0], dtype=np.float32)
    sim = band(first["out"], "birds")
    rows, cols = np.nonzero(grid.mask)
    for r, c in [(rows[0], cols[0]), (rows[-1], cols[-1]), (rows[len(rows) // 2], cols[len(rows) // 2])]:
        i, j = r - win.rows[0], c - win.cols[0]
        chip = np.ascontiguousarray(win.chip(i, j))[None]
        x = normalize_chips(chip)
        md = MetadataOptions().for_pixels(np.array([win.lon[i, j]]), np.array([win.lat[i, j]]))
        z = model.image_features(x, torch.tensor([1]))
        emb = model.embed_image_features(z, md)
        want = float(csd(emb, text)[0, 0])
        assert abs(sim[r, c] - want) < 1e-2
        assert abs(sim[r, c] - want) < 5e-4
        zd = z[0].numpy()
        err = np.abs(z_store[r, c] - zd).max()
        assert err < 2e-3 * np.abs(zd).max()
        # and it is this pixel's chip, not a neighbour's
        others = [np.abs(z_store[rr, cc] - zd).max() for rr, cc in zip(rows, cols) if (rr, cc) != (r, c)]
        assert err < min(others)


@pytest.mark.network
def test_xyz_source(inp, first, tmp_path):
    with TileServer(SceneTiles(inp["scene"])) as srv:
        out = tmp_path / "xyz.tif"
        assert main(base_args(inp, out, "--query", "birds", "--no-previews",
                              imagery="xyz:" + srv.template())) == 0
        assert srv.count("/xyz/") > 0
    data, tags, desc, meta = read_cog(out)
    mask = grid_for(inp).mask
    assert tags["imagery_kind"] == "xyz"
    assert np.array_equal(np.isfinite(data[0]), mask)
    # the same ground seen through Web Mercator tiles: image embeddings close to the local run's
    from psm_mapping.store import EmbeddingStore

    (xyz_store,) = (tmp_path / "psm-store").glob("*.zarr")
    za = np.asarray(EmbeddingStore.open(str(xyz_store)).group["z_img"][0], np.float32)[mask]
    zb = np.asarray(EmbeddingStore.open(str(first["store"])).group["z_img"][0], np.float32)[mask]
    cos = (za * zb).sum(1) / np.linalg.norm(za, axis=1) / np.linalg.norm(zb, axis=1)
    assert cos.min() > 0.99
    # georeferenced to the pixel: each pixel's z_img is nearest to the local run's same pixel
    dist = np.abs(za[:, None, :] - zb[None, :, :]).max(-1)
    assert np.array_equal(dist.argmin(1), np.arange(len(za)))


def test_pipeline_presets_and_regions(monkeypatch, tmp_path):
    """The shipped presets parse into known options; named imagery presets and checkpoints
    exist; a checkpoint name resolves to the cache (or says how to fetch it); the example
    regions load."""
    from psm_mapping.errors import CheckpointError
    from psm_mapping.imagery.presets import PRESETS
    from psm_mapping.cli.map import load_preset
    from psm_mapping.region import load_region
    from psm_mapping.run import MapConfig
    from psm_mapping.weights import resolve_checkpoint
    from psm_mapping.weights import EXPERIMENTS

    repo = Path(__file__).resolve().parents[1]
    known = set(MapConfig.__dataclass_fields__) | {"zoom_level", "query", "no_fusion", "no_previews"}
    files = sorted((repo / "pipelines").glob("*.yaml"))
    assert {f.stem for f in files} >= {"sentinel2-city", "aerial-neighbourhood", "demo"}
    for f in files:
        p = load_preset(str(f))
        assert set(p) <= known, (f.name, set(p) - known)
        assert p["stride"] > 0 and p["zoom_level"]
        if f.stem != "demo":
            assert p["imagery"] in PRESETS and p["checkpoint"] in EXPERIMENTS
            assert PRESETS[p["imagery"]].sat_type == EXPERIMENTS[p["checkpoint"]].sat_type
    monkeypatch.setenv("PSM_CACHE", str(tmp_path))
    with pytest.raises(CheckpointError, match="weights download GeoSound_pcmepp_metadata_sentinel"):
        resolve_checkpoint("GeoSound_pcmepp_metadata_sentinel")
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "GeoSound_pcmepp_metadata_sentinel.ckpt").write_bytes(b"x")
    assert resolve_checkpoint("GeoSound_pcmepp_metadata_sentinel").parent == tmp_path / "checkpoints"
    for r in sorted((repo / "regions").glob("*.geojson")):
        w, s, e, n = load_region(str(r)).bounds
        assert e > w and n > s, r.name
    for name in ("lausanne", "central-park"):  # small enough for their presets' pixel limits
        w, s, e, n = load_region(str(repo / "regions" / f"{name}.geojson")).bounds
        assert e - w < 0.15 and n - s < 0.1
