"""Scale-true zoom sampling (each zoom on its own grid, resampled at query time) against dense
sampling: chip counts, exact chips where the grids coincide, the resampling checked against an
independent bilinear interpolation, kill -9 resume, dask, the explorer, old stores refused."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import zarr
from pyproj import Transformer

from psm_mapping.errors import StoreError
from psm_mapping.model.factory import tiny_clap_config
from psm_mapping.query import build_queries, prepare_query, query_store
from psm_mapping.run import MapConfig, map_region
from psm_mapping.store import DONE, EmbeddingStore
from psm_mapping.zoomgrid import (ZoomGroup, axis_weights, cell_need, chips_needed, resample, zoom_factors,
                                  zoom_groups)

from geo_fixtures import texture, utm_scene

REPO = Path(__file__).resolve().parents[1]
UTM = "EPSG:32633"
X0, Y0, RES, N = 500_000.0, 5_600_000.0, 20.0, 1300  # a 26 km scene: every zoom-5 chip of the region fits
STRIDE = 640.0


# -- the resampler and the cell masks ------------------------------------------------------------
def test_default_factors():
    assert zoom_factors("sentinel", 640.0, (1, 3, 5)) == (1, 3, 5)
    assert zoom_factors("sentinel", 640.0, (1, 3, 5), "dense") == (1, 1, 1)
    assert zoom_factors("sentinel", 40.0, (1, 3, 5)) == (1, 48, 80)  # zoom 1 stays at the output stride
    assert zoom_factors("sentinel", 5000.0, (1, 3, 5)) == (1, 1, 1)  # coarse pixels: nothing to save
    assert zoom_factors("bingmap", 45.0, (1, 3, 5)) == (1, 3, 5)
    assert [g.zooms for g in zoom_groups(10, 10, (1, 1, 5))] == [(0, 2), (2, 3)]


def test_dense_is_the_default_and_bad_values_are_one_line():
    from psm_mapping.errors import InputError

    assert MapConfig().zoom_sampling == "dense"
    with pytest.raises(InputError, match="zoom sampling 'fine' is not known"):
        MapConfig(zoom_sampling="fine").validate()


def test_resample_factor_one_is_the_values():
    v = np.random.default_rng(0).random((2, 5, 6)).astype(np.float32)
    ok = np.ones((5, 6), bool)
    ok[1, 2] = False
    out = resample(v, ok, 1, (5, 6))
    assert np.isnan(out[:, 1, 2]).all()
    ok[1, 2] = True
    assert np.array_equal(resample(v, ok, 1, (5, 6)), v)


@pytest.mark.parametrize("f", [2, 3, 5])
def test_resample_reproduces_a_linear_field(f):
    H, W = 23, 17
    g = ZoomGroup((0, 1), f, -(-H // f), -(-W // f))
    ci = np.arange(g.height) * f + (f - 1) / 2  # cell centres in output pixel coordinates
    cj = np.arange(g.width) * f + (f - 1) / 2
    cells = (0.3 * ci[:, None] - 0.7 * cj[None, :]).astype(np.float32)
    out = resample(cells, np.ones(cells.shape, bool), f, (H, W))
    r, c = np.arange(H)[:, None], np.arange(W)[None, :]
    inside = (r >= ci[0]) & (r <= ci[-1]) & (c >= cj[0]) & (c <= cj[-1])
    assert np.allclose(out[inside], (0.3 * r - 0.7 * c + 0 * inside)[inside], atol=1e-4)
    # beyond the outer cell centres the outer cells are used alone (no extrapolation)
    assert np.allclose(out[0, 0], cells[0, 0]) if (f - 1) / 2 > 0 else True


def test_resample_nan_aware_and_not_done_cells():
    f = 3
    cells = np.arange(16, dtype=np.float32).reshape(4, 4)
    ok = np.ones((4, 4), bool)
    cells[1, 1] = np.nan  # computed, too little valid imagery: drops out, weights renormalised
    out = resample(cells, ok, f, (12, 12))
    assert np.isnan(out[4, 4])  # the cell's own centre has only that cell
    assert out[4, 5] == pytest.approx(cells[1, 2])  # 1/3 on the NaN cell, 2/3 on its neighbour
    ok[2, 2] = False  # never computed (or a read fault): every pixel it reaches is NaN
    out = resample(cells, ok, f, (12, 12))
    bad = np.isnan(out)
    assert bad[5:10, 5:10].all() and not bad[10:, :5].any()


def test_cell_need_is_what_the_interpolation_reads():
    H, W, f = 20, 14, 5
    g = ZoomGroup((0, 1), f, 4, 3)
    rng = np.random.default_rng(1)
    mask = rng.random((H, W)) < 0.2
    need = cell_need(mask, g)
    i0, i1, wy = axis_weights(H, g.height, f)
    j0, j1, wx = axis_weights(W, g.width, f)
    ref = np.zeros_like(need)
    for r, c in zip(*np.nonzero(mask)):
        for i, a in ((i0[r], 1 - wy[r]), (i1[r], wy[r])):
            for j, b in ((j0[c], 1 - wx[c]), (j1[c], wx[c])):
                if a * b > 0:
                    ref[i, j] = True
    assert np.array_equal(need, ref)
    # values on cells outside ``need`` never reach the mask's pixels
    cells = rng.random(need.shape).astype(np.float32)
    noisy = cells.copy()
    noisy[~need] = 1e6
    ok = np.ones(need.shape, bool)
    assert np.array_equal(resample(cells, ok, f, (H, W))[mask], resample(noisy, ok, f, (H, W))[mask])


# -- maps ----------------------------------------------------------------------------------------
def _region(path: Path, half_m: float) -> Path:
    to_ll = Transformer.from_crs(UTM, 4326, always_xy=True)
    cx, cy = X0 + N * RES / 2, Y0 - N * RES / 2
    pts = [(-1, -1), (1, -1), (1, 0.6), (-0.2, 1), (-1, 1)]
    ring = [list(to_ll.transform(cx + dx * half_m, cy + dy * half_m)) for dx, dy in pts]
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring + ring[:1]]}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpt_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("zoom_sampling")
    scene = utm_scene(d / "scene.tif", texture(N, N, seed=4, smooth_px=25), RES, origin=(X0, Y0), crs=UTM,
                      overviews=(2, 4))
    clap = d / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    return {"scene": str(scene), "region": str(_region(d / "region.geojson", 3400.0)), "clap": str(clap),
            "ckpt": str(ckpt_factory(sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource")),
            "fast_ckpt": str(ckpt_factory(sat_type="sentinel", metadata_type="none")),
            "tokenizer": str(tokenizer_dir)}


def _cfg(inputs, folder: Path, **kw) -> MapConfig:
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(region=inputs["region"], imagery=inputs["scene"], queries=["birds singing", "traffic"],
                checkpoint=inputs["ckpt"], clap_config=inputs["clap"], tokenizer=inputs["tokenizer"],
                zoom_levels=(1, 3, 5), stride=STRIDE, device="cpu", block_size=4, batch_size=16, month=5,
                out=str(folder / "map.tif"), store=str(folder / "store"), progress=False, previews=False)
    base.update(kw)
    return MapConfig(**base)


def _read(path):
    with rasterio.open(path) as src:
        return src.read(), list(src.descriptions)


@pytest.fixture(scope="module")
def maps(inputs, tmp_path_factory):
    out = {}
    for mode in ("dense", "scale"):
        d = tmp_path_factory.mktemp(f"map_{mode}")
        lines: list[str] = []
        run = map_region(_cfg(inputs, d, zoom_sampling=mode), log_fn=lines.append)
        out[mode] = {"run": run, "map": d / "map.tif", "store": run.store, "log": lines, "dir": d}
    return out


def test_scale_embeds_fewer_chips_and_says_so(maps, inputs):
    dense, scale = maps["dense"], maps["scale"]
    store = EmbeddingStore.open(scale["store"])
    assert store.spec.factors == (1, 3, 5) and not store.spec.dense
    assert EmbeddingStore.open(dense["store"]).spec.dense
    from psm_mapping.grid import make_grid
    from psm_mapping.region import load_region

    grid = make_grid(load_region(inputs["region"]), stride=STRIDE, zoom_levels=(1, 3, 5))
    need = chips_needed(grid.mask, (1, 3, 5))
    assert dense["run"].chips == 3 * grid.pixel_count
    assert scale["run"].chips == sum(need) < 1.6 * grid.pixel_count
    assert need[0] == grid.pixel_count
    est = [line for line in scale["log"] if line.startswith("grid:")][0]
    assert f"{sum(need):,} chips" in est and "own grids" in est
    assert f"{3 * grid.pixel_count:,} chips" in [line for line in dense["log"] if line.startswith("grid:")][0]


def test_zoom_one_and_coinciding_pixels_equal_dense(maps):
    a, da = _read(maps["dense"]["map"])
    b, db = _read(maps["scale"]["map"])
    assert da == db and a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))  # the region mask is applied after resampling
    assert np.isfinite(a).any()
    for k, desc in enumerate(da):
        f = {"1": 1, "3": 3, "5": 5}[_zoom_of(desc)]
        o = (f - 1) // 2
        x, y = a[k][o::f, o::f], b[k][o::f, o::f]  # cell centres = these output pixel centres: same chips
        assert np.nanmax(np.abs(x - y)) < 2e-5, desc


def _zoom_of(desc: str) -> str:
    import re

    return re.search(r"at zoom (\d)", desc).group(1)


def test_scale_map_is_the_bilinear_resampling_of_the_zoom_grid(maps, inputs):
    """Independent check: similarity of the stored cells, interpolated by torch's ``grid_sample``
    (bilinear, border clamp), equals the map (the region's pixels need only computed cells)."""
    import torch.nn.functional as F

    from psm_mapping.model import PSM

    store = EmbeddingStore.open(maps["scale"]["store"])
    model = PSM.from_checkpoint(inputs["ckpt"], clap_config=inputs["clap"])
    qs = build_queries(model, ["birds singing"], tokenizer=inputs["tokenizer"])
    qm, qvs, _ = prepare_query(store, qs, None)
    got = query_store(store, qs)  # the stored metadata: no fusion re-run
    H, W = store.spec.height, store.spec.width
    for k, f in enumerate(store.spec.factors):
        g = store.zoom_group(k)
        mean = store.read("mean", slice(0, g.height), slice(0, g.width), k).astype(np.float64)
        vs = store.read("var_sum", slice(0, g.height), slice(0, g.width), k).astype(np.float64)
        cells = 2 * mean @ qm[0].double().numpy() - 2 - vs - float(qvs[0])
        u = (np.arange(H) - (f - 1) / 2) / f  # cell coordinates of the output pixel centres
        v = (np.arange(W) - (f - 1) / 2) / f
        uu, vv = np.meshgrid(2 * u / max(1, g.height - 1) - 1, 2 * v / max(1, g.width - 1) - 1, indexing="ij")
        src = torch.from_numpy(np.nan_to_num(cells, nan=0.0))[None, None]
        pos = torch.from_numpy(np.stack([vv, uu], -1))[None]
        ref = F.grid_sample(src, pos, mode="bilinear", padding_mode="border", align_corners=True)[0, 0].numpy()
        m = np.isfinite(got.similarity[0][k])
        assert m.sum() > 20
        assert np.abs(got.similarity[0][k][m] - ref[m]).max() < 1e-3, k


def test_fusion_rerun_on_the_zoom_grids(maps, inputs):
    """A query with other metadata re-runs fusion from z_img on each zoom's grid."""
    from psm_mapping.embed import MetadataOptions
    from psm_mapping.model import PSM

    store = EmbeddingStore.open(maps["scale"]["store"])
    model = PSM.from_checkpoint(inputs["ckpt"], clap_config=inputs["clap"])
    qs = build_queries(model, ["birds singing"], tokenizer=inputs["tokenizer"])
    stored = MetadataOptions(**store.attrs["metadata_options"])
    same = query_store(store, qs, model=model, metadata=MetadataOptions(**{**stored.as_dict(), "hour": None}))
    base = query_store(store, qs)
    for k in range(3):
        m = np.isfinite(base.similarity[0][k])
        assert np.array_equal(m, np.isfinite(same.similarity[0][k]))
        if stored.hour is None:
            assert np.abs(base.similarity[0][k][m] - same.similarity[0][k][m]).max() < 1e-3
    other = query_store(store, qs, model=model, metadata=MetadataOptions(**{**stored.as_dict(), "month": 11}))
    assert np.nanmax(np.abs(other.similarity[0][2] - base.similarity[0][2])) > 1e-6


def test_zoom_one_only_is_identical_in_both_modes(inputs, tmp_path):
    runs = {m: map_region(_cfg(inputs, tmp_path / m, zoom_levels=(1,), zoom_sampling=m, checkpoint=inputs["fast_ckpt"]),
                          log_fn=lambda *a: None) for m in ("dense", "scale")}
    a, _ = _read(tmp_path / "dense" / "map.tif")
    b, _ = _read(tmp_path / "scale" / "map.tif")
    assert np.array_equal(a, b, equal_nan=True)
    assert runs["dense"].chips == runs["scale"].chips


def test_explorer_resamples_each_zoom(maps, inputs):
    """The explorer's points on a scale-true store equal ``query_store`` (each zoom resampled to
    the output grid), at the store's metadata and re-fused for another month."""
    from psm_mapping.serve.engine import Explorer, QuerySpec

    ex = Explorer(maps["scale"]["store"], checkpoint=inputs["ckpt"], clap_config=inputs["clap"],
                  tokenizer=inputs["tokenizer"])
    store = EmbeddingStore.open(maps["scale"]["store"])
    H, W = store.spec.height, store.spec.width
    q = QuerySpec(text="birds singing", month=5)  # the store's metadata: no fusion re-run
    q11 = QuerySpec(text="birds singing", month=11)  # fusion re-runs on the zoom grids
    assert not ex.needs_refusion(q) and ex.needs_refusion(q11)
    refs = {q: query_store(store, [ex.embedding(q)[0]]),
            q11: query_store(store, [ex.embedding(q11)[0]], model=ex.model, metadata=ex.metadata(q11))}
    compared = 0
    try:
        for spec, ref in refs.items():
            for row in np.linspace(0, H - 1, 5).astype(int):
                for col in np.linspace(0, W - 1, 5).astype(int):
                    x, y = ex.transform @ (col + 0.5, row + 0.5)
                    lon, lat = ex.to_lonlat.transform(x, y)
                    got = ex.point(spec, lon, lat)
                    assert (got["row"], got["col"]) == (row, col)
                    for k, z in enumerate(store.spec.zoom_levels):
                        want, have = ref.similarity[0][k][row, col], got["similarity"][str(z)]
                        if np.isnan(want):
                            assert have is None
                            continue
                        assert abs(have - want) < 1e-4
                        assert abs(got["uncertainty"][str(z)] - ref.uncertainty[k][row, col]) < 1e-4
                        compared += 1
    finally:
        ex.close()
    assert compared > 60


def test_previous_store_format_is_refused(maps, tmp_path):
    import shutil

    p = tmp_path / "old.zarr"
    shutil.copytree(maps["scale"]["store"], p)
    g = zarr.open_group(str(p), mode="r+")
    g.attrs["format"] = "psm-mapping-store/2"
    with pytest.raises(StoreError, match="older psm-mapping.*remove it"):
        EmbeddingStore.open(str(p))


def test_dask_workers_equal_local_scale_map(maps, inputs, tmp_path):
    from psm_mapping.distributed import connect, map_region_distributed

    with connect(workers=2, log_fn=lambda *a: None) as client:
        run = map_region_distributed(_cfg(inputs, tmp_path, zoom_sampling="scale"), client=client,
                                     log_fn=lambda *a: None)
    assert run.chips == maps["scale"]["run"].chips
    assert run.blocks_total == maps["scale"]["run"].blocks_total
    a, _ = _read(tmp_path / "map.tif")
    b, _ = _read(maps["scale"]["map"])
    assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(np.abs(a - b)) < 1e-4


# -- kill -9 and resume ----------------------------------------------------------------------------
def _env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    return e


def _command(inputs, out: Path) -> list[str]:
    return [sys.executable, "-m", "psm_mapping.cli", inputs["region"], "--imagery", inputs["scene"],
            "--checkpoint", inputs["fast_ckpt"], "--clap-config", inputs["clap"], "--tokenizer",
            inputs["tokenizer"], "--zoom-level", "1,3,5", "--zoom-sampling", "scale", "--stride", f"{STRIDE:g}",
            "--block-size", "4", "--batch-size", "4", "--device", "cpu", "--no-previews", "--query", "birds",
            "--out", str(out)]


def _done_pixels(root: Path) -> int:
    for p in root.glob("*.zarr"):
        try:
            return int((np.asarray(zarr.open_group(str(p), mode="r")["status"][:]) == DONE).sum())
        except Exception:
            return 0
    return 0


def _arrays(root: Path) -> dict:
    (p,) = root.glob("*.zarr")
    g = zarr.open_group(str(p), mode="r")
    return {n: np.asarray(g[n][:]) for n in ("z_img", "mean", "var_sum", "uncertainty", "valid", "status")}


def test_kill9_resume_with_scale_zooms(inputs, tmp_path):
    ref = tmp_path / "ref" / "map.tif"
    ref.parent.mkdir()
    r = subprocess.run(_command(inputs, ref), capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    total = _done_pixels(ref.parent / "psm-store")

    out = tmp_path / "killed" / "map.tif"
    out.parent.mkdir()
    proc = subprocess.Popen(_command(inputs, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        deadline = time.monotonic() + 300
        while _done_pixels(out.parent / "psm-store") < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert 0 < _done_pixels(out.parent / "psm-store") < total
    r = subprocess.run(_command(inputs, out), capture_output=True, text=True, env=_env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _arrays(out.parent / "psm-store"), _arrays(ref.parent / "psm-store")
    for n in a:
        assert np.array_equal(a[n], b[n], equal_nan=a[n].dtype.kind == "f"), n
    with rasterio.open(out) as s1, rasterio.open(ref) as s2:
        assert np.array_equal(s1.read(), s2.read(), equal_nan=True)
