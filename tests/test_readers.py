"""``--readers N``: reader threads in front of the model give the same store whatever N (local raster
and XYZ tiles on 127.0.0.1), concurrent local reads equal serial ones, and the pipeline keeps its
order and hands reader errors to the model's thread."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import zarr

from psm_mapping.errors import ImageryError
from psm_mapping.imagery import open_source
from psm_mapping.model.factory import tiny_clap_config
from psm_mapping.pipeline import PipelineStats, default_readers, stream_units
from psm_mapping.run import MapConfig, map_region

from servers import SceneTiles, TileServer, write_scene
from test_zoom_sampling import STRIDE, inputs  # noqa: F401  (the zoom-sampling scene)


def _store_arrays(root: Path) -> dict:
    (p,) = Path(root).glob("*.zarr")
    g = zarr.open_group(str(p), mode="r")
    return {n: np.asarray(g[n][:]) for n in ("z_img", "mean", "var_sum", "uncertainty", "valid", "status")}


def _cfg(inputs, folder: Path, **kw) -> MapConfig:  # noqa: F811
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(region=inputs["region"], imagery=inputs["scene"], queries=["birds"], checkpoint=inputs["fast_ckpt"],
                clap_config=inputs["clap"], tokenizer=inputs["tokenizer"], zoom_levels=(1, 3, 5), stride=STRIDE,
                device="cpu", block_size=4, batch_size=5, out=str(folder / "map.tif"), store=str(folder / "store"),
                progress=False, previews=False, zoom_sampling="scale")
    base.update(kw)
    return MapConfig(**base)


def test_stores_identical_for_any_reader_count(inputs, tmp_path):  # noqa: F811
    ref = None
    for n in (0, 1, 3):
        run = map_region(_cfg(inputs, tmp_path / f"r{n}", readers=n), log_fn=lambda *a: None)
        arrays = _store_arrays(tmp_path / f"r{n}" / "store")
        assert run.blocks_computed > 5
        if ref is None:
            ref = arrays
            continue
        for name in ref:
            assert np.array_equal(ref[name], arrays[name], equal_nan=ref[name].dtype.kind == "f"), (n, name)


def test_xyz_two_readers_identical_to_one_prefetch_thread(tmp_path, ckpt_factory, tokenizer_dir):
    utm, left, top, res, size = "EPSG:32632", 498000.0, 4986000.0, 10.0, 700
    scene = tmp_path / "scene.tif"
    write_scene(scene, utm, left, top, res, size, size, seed=9)
    clap = tmp_path / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    from pyproj import Transformer
    import json

    tr = Transformer.from_crs(utm, "EPSG:4326", always_xy=True)
    cx, cy, h = left + size * res / 2, top - size * res / 2, 600.0
    ring = [list(tr.transform(cx + dx * h, cy + dy * h)) for dx, dy in [(-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1)]]
    region = tmp_path / "r.geojson"
    region.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    stores = {}
    with TileServer(SceneTiles(scene)) as srv:
        for n in (0, 2):
            d = tmp_path / f"x{n}"
            cfg = MapConfig(region=str(region), imagery="xyz:" + srv.template(), queries=["birds"],
                            checkpoint=str(ckpt_factory(sat_type="sentinel", metadata_type="none")),
                            clap_config=str(clap), tokenizer=str(tokenizer_dir), zoom_levels=(1,), stride=40.0,
                            device="cpu", block_size=6, readers=n, out=str(d / "m.tif"), store=str(d / "store"),
                            progress=False, previews=False)
            d.mkdir()
            run = map_region(cfg, log_fn=lambda *a: None)
            assert run.blocks_computed >= 4 and run.faults == 0
            stores[n] = _store_arrays(d / "store")
    for name in stores[0]:
        assert np.array_equal(stores[0][name], stores[2][name], equal_nan=True), name


def test_local_reads_from_threads_equal_serial_reads(inputs):  # noqa: F811
    src = open_source(inputs["scene"])
    from pyproj import CRS

    crs = CRS.from_user_input("EPSG:32633")
    x0, y0 = 500_000.0 + 3000, 5_600_000.0 - 3000
    reqs = [((x0 + i * 700, y0 - 9000 + j * 500, x0 + i * 700 + 9000, y0 + j * 500), crs, (300, 300))
            for i in range(4) for j in range(3)]
    serial = [src.read(*r) for r in reqs]
    barrier = threading.Barrier(4)

    def read(r):
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return src.read(*r)

    with ThreadPoolExecutor(4) as pool:
        par = list(pool.map(read, reqs))
    for a, b in zip(serial, par):
        assert np.array_equal(a.data, b.data) and np.array_equal(a.mask, b.mask)
    src.close()


def test_stream_units_order_bounds_and_errors():
    items = list(range(12))
    it = iter(items)
    live, peak, lock = [0], [0], threading.Lock()

    def read(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        threading.Event().wait(0.01 * (i % 3))
        with lock:
            live[0] -= 1
        return i * 10

    def cut(i, r):
        for k in range(5):
            yield (i, k, r)

    st = PipelineStats()
    got = []
    for u in stream_units(lambda: next(it, None), read, cut, readers=3, depth=2, stats=st):
        got.append((u.item, u.result, list(u.iter_batches())))
    assert [g[0] for g in got] == items and all(g[1] == g[0] * 10 for g in got)
    assert all(g[2] == [(g[0], k, g[1]) for k in range(5)] for g in got)
    assert peak[0] <= 3 and st.units == 12

    def bad_read(i):
        if i == 4:
            raise ImageryError("tile server gone")
        return i

    it2 = iter(items)
    seen = []
    with pytest.raises(ImageryError, match="gone"):
        for u in stream_units(lambda: next(it2, None), bad_read, None, readers=2):
            seen.append(u.item)
    assert seen == [0, 1, 2, 3]
    assert default_readers() >= 2


def test_parallel_readers_read_a_shared_tile_once(inputs):  # noqa: F811
    """Neighbouring blocks on two readers share halo tiles: one read, the other waits for it."""
    from pyproj import CRS

    from psm_mapping.tiling import ChipReader

    src = open_source(inputs["scene"])
    calls = []
    orig = src.read

    def slow_read(*a, **kw):
        calls.append(a[0])
        threading.Event().wait(0.3)
        return orig(*a, **kw)

    src.read = slow_read
    reader = ChipReader(src, CRS.from_user_input("EPSG:32633"), "sentinel")
    lat = reader.lattice(1)
    ti, tj = int(-5_600_000.0 / lat.res / 1024) + 2, int(500_000.0 / lat.res / 1024) + 2
    with ThreadPoolExecutor(4) as pool:
        tiles = list(pool.map(lambda _: lat.tile(ti, tj), range(4)))
    assert len(calls) == 1 and all(t is tiles[0] for t in tiles)
    src.close()
