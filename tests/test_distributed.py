"""The dask driver on a real 2-process LocalCluster: same map as the local driver, a worker killed
by its pid mid-run, an interrupted run resumed, a store on an S3 server (moto, 127.0.0.1),
block-wise queries and a COG written from dask arrays.

Inputs: a synthetic 4 km scene at 10 m (UTM 32N), a 480 m square region, stride 40 m at zoom 1
(a 12 x 12 px grid), blocks of 4 px (9 blocks), a tiny checkpoint (embed_dim 64, depth 1).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from psm_mapping.distributed import (BlockStats, connect, map_region_distributed, process_cache_info,
                                     query_store_dask)
from psm_mapping.embed import MetadataOptions
from psm_mapping.model.factory import tiny_clap_config
from psm_mapping.query import query_store
from psm_mapping.run import MapConfig, map_region
from psm_mapping.store import EmbeddingStore

from servers import write_scene

UTM = "EPSG:32632"
LEFT, TOP, RES, SIZE = 498000.0, 4986000.0, 10.0, 400
STRIDE, HALF, BLOCK = 40.0, 240.0, 4


def _region(path: Path) -> Path:
    cx, cy = LEFT + SIZE * RES / 2, TOP - SIZE * RES / 2
    tr = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    d = HALF - 0.01
    ring = [list(tr.transform(cx + dx * d, cy + dy * d)) for dx, dy in [(-1, -1), (1, -1), (1, 1), (-1, 0.2)]]
    ring.append(ring[0])
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "properties": {"name": "dtest"},
        "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, ckpt_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("dist_inputs")
    write_scene(d / "scene.tif", UTM, LEFT, TOP, RES, SIZE, SIZE, seed=5)
    clap = d / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    return {"scene": str(d / "scene.tif"), "region": str(_region(d / "region.geojson")), "clap": str(clap),
            "ckpt": str(ckpt_factory(sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource")),
            "tokenizer": str(tokenizer_dir)}


def _cfg(inputs, folder: Path, **kw) -> MapConfig:
    folder.mkdir(parents=True, exist_ok=True)
    base = dict(region=inputs["region"], imagery=inputs["scene"], queries=["birds singing", "traffic"],
                checkpoint=inputs["ckpt"], clap_config=inputs["clap"], tokenizer=inputs["tokenizer"],
                zoom_levels=(1,), stride=STRIDE, device="cpu", block_size=BLOCK, batch_size=16,
                out=str(folder / "map.tif"), store=str(folder / "store"), progress=False, previews=False)
    base.update(kw)
    return MapConfig(**base)


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """The single-process map (local driver)."""
    d = tmp_path_factory.mktemp("dist_ref")
    run = map_region(_cfg(inputs, d), log_fn=lambda *a: None)
    return {"run": run, "map": d / "map.tif", "store": run.store}


@pytest.fixture(scope="module")
def client():
    logs: list[str] = []
    with connect(workers=2, log_fn=logs.append) as c:
        c.logs = logs
        yield c


def _read(path):
    with rasterio.open(path) as src:
        return src.read(), src.descriptions, src.tags(), [src.tags(i) for i in range(1, src.count + 1)]


def _assert_same_map(path, ref_path):
    a, desc_a, tags_a, btags_a = _read(path)
    b, desc_b, tags_b, btags_b = _read(ref_path)
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.isfinite(a).any()
    assert float(np.nanmax(np.abs(a - b))) < 1e-4
    assert desc_a == desc_b
    for t in (tags_a, tags_b):
        t.pop("created", None)
    assert {k: v for k, v in tags_a.items() if not k.startswith("TIFFTAG")} == \
        {k: v for k, v in tags_b.items() if not k.startswith("TIFFTAG")}
    for x, y in zip(btags_a, btags_b):
        assert {k: x[k] for k in ("name", "kind", "zoom")} == {k: y[k] for k in ("name", "kind", "zoom")}


def _wait_idle(client, timeout=30.0):
    """Until no worker thread executes anything (cancelled tasks run to their end)."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        busy = client.run(lambda dask_worker: len(dask_worker.state.executing))
        if not any(busy.values()):
            return
        time.sleep(0.1)
    raise AssertionError("workers still busy")


def test_two_workers_equal_single_process(inputs, reference, client, tmp_path):
    assert any("dashboard" in line for line in client.logs)
    assert set(client.run(lambda: __import__("torch").get_num_threads()).values()) == {1}
    seen: list[BlockStats] = []
    run = map_region_distributed(_cfg(inputs, tmp_path), client=client, log_fn=lambda *a: None,
                                 on_block=seen.append)
    total = reference["run"].blocks_total
    assert run.blocks_total == total == 9
    assert run.blocks_computed == total and run.blocks_retried == 0
    assert run.chips == reference["run"].chips
    assert len({s.pid for s in seen}) == 2  # both worker processes did blocks
    _assert_same_map(tmp_path / "map.tif", reference["map"])
    from rio_cogeo.cogeo import cog_validate

    ok, errors, _ = cog_validate(str(tmp_path / "map.tif"))
    assert ok, errors
    # the model was loaded once per worker process, not per task
    assert {i["model_loads"] for i in client.run(process_cache_info).values()} == {1}
    # the two stores hold the same embeddings
    a = EmbeddingStore.open(run.store)
    b = EmbeddingStore.open(reference["store"])
    assert a.done_mask().sum() == b.done_mask().sum() == total
    ma, mb = a.group["mean"][:].astype(np.float32), b.group["mean"][:].astype(np.float32)
    assert np.array_equal(np.isnan(ma), np.isnan(mb)) and np.nanmax(np.abs(ma - mb)) < 1e-3
    assert "blocks retried 0" in run.summary()


def test_worker_killed_mid_run(inputs, reference, client, tmp_path):
    pids = client.run(os.getpid)
    killed: dict = {}

    def kill_after_first(st: BlockStats) -> None:
        if killed:
            return
        for _ in range(200):
            busy = {w: ks for w, ks in client.processing().items() if ks}
            if busy:
                break
            time.sleep(0.01)
        addr, keys = next(iter(busy.items()))
        killed.update(pid=pids[addr], blocks={tuple(int(v) for v in re.findall(r"-(\d+)-(\d+)-", k)[0])
                                               for k in keys})
        os.kill(pids[addr], signal.SIGKILL)

    seen: list[BlockStats] = []
    run = map_region_distributed(_cfg(inputs, tmp_path), client=client, log_fn=lambda *a: None,
                                 on_block=lambda st: (seen.append(st), kill_after_first(st)))
    assert killed and killed["blocks"]
    assert run.blocks_retried >= 1
    assert run.blocks_computed + sum(s.skipped for s in seen) == reference["run"].blocks_total
    by_block = {s.index: s for s in seen}
    # the killed worker's blocks ran again elsewhere (one that finished between the look at the
    # scheduler and the kill kept its first result)
    rerun = [b for b in killed["blocks"] if by_block[b].pid != killed["pid"]]
    assert rerun, (killed, [by_block[b] for b in killed["blocks"]])
    assert all(by_block[b].attempts >= 2 for b in rerun), [by_block[b] for b in rerun]
    assert all(by_block[b].attempts == 1 for b in set(killed["blocks"]) - set(rerun))
    _assert_same_map(tmp_path / "map.tif", reference["map"])
    client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed worker


def test_interrupt_then_resume(inputs, reference, client, tmp_path):
    cfg = _cfg(inputs, tmp_path)
    count = []

    def interrupt(st):
        count.append(st)
        if len(count) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        map_region_distributed(cfg, client=client, log_fn=lambda *a: None, on_block=interrupt)
    _wait_idle(client)
    store_url = next(Path(cfg.store).glob("*.zarr"))
    done = int(EmbeddingStore.open(str(store_url)).done_mask().sum())
    total = reference["run"].blocks_total
    assert 3 <= done < total
    assert not (tmp_path / "map.tif").exists()
    run = map_region_distributed(cfg, client=client, log_fn=lambda *a: None)
    assert run.blocks_computed == total - done
    _assert_same_map(tmp_path / "map.tif", reference["map"])


def test_store_on_s3(inputs, reference, client, tmp_path):
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": f"http://{host}:{port}",
                                                                          "region_name": "us-east-1"}}
        import boto3
        import s3fs

        boto3.client("s3", endpoint_url=opts["client_kwargs"]["endpoint_url"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="psm-bucket")
        fs = s3fs.S3FileSystem(**opts)
        cfg = _cfg(inputs, tmp_path, store="s3://psm-bucket/stores", store_options=opts, format="zarr",
                   out=str(tmp_path / "map.zarr"))
        run = map_region_distributed(cfg, client=client, log_fn=lambda *a: None)
        total = reference["run"].blocks_total
        assert run.store.startswith("s3://psm-bucket/stores/") and run.blocks_computed == total
        assert fs.exists(run.store.removeprefix("s3://") + "/status/zarr.json")
        st = EmbeddingStore.open(run.store, storage_options=opts)
        assert st.done_mask().sum() == total
        # a rerun on the same S3 store computes nothing
        again = map_region_distributed(dataclasses.replace(cfg, overwrite=True), client=client,
                                       log_fn=lambda *a: None)
        assert again.blocks_computed == 0
    finally:
        server.stop()
    import xarray as xr

    ds = xr.open_zarr(tmp_path / "map.zarr")
    ref, desc, _, _ = _read(reference["map"])
    names = json.loads(ds.attrs["band_variables"])
    assert [ds[n].attrs["description"] for n in names] == list(desc)
    got = np.stack([ds[n].values for n in names])
    assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.nanmax(np.abs(got - ref)) < 1e-4


def test_query_store_dask_matches_local(inputs, reference, client):
    from psm_mapping.distributed import BlockJob
    from psm_mapping.model import PSM
    from psm_mapping.model.checkpoint import file_sha256
    from psm_mapping.query import build_queries

    store = EmbeddingStore.open(reference["store"])
    model = PSM.from_checkpoint(inputs["ckpt"], clap_config=inputs["clap"])
    qs = build_queries(model, ["birds singing", "rain"], tokenizer=inputs["tokenizer"])
    job = BlockJob(store.url, {}, inputs["ckpt"], file_sha256(inputs["ckpt"]), inputs["clap"], "cpu", "float32",
                   inputs["scene"], {}, store.attrs["metadata_options"], (1,))
    for md in (None, MetadataOptions(month=7, hour=3)):  # stored metadata, then fusion re-run on workers
        local = query_store(store, qs, model=model, metadata=md)
        lazy = query_store_dask(store, qs, metadata=md, job=job)
        assert all(c % 4 == 0 for c in lazy.similarity[0].chunks[1][:-1])  # windows of whole store blocks
        for q in range(2):
            a, b = lazy.similarity[q].compute(), local.similarity[q]
            assert np.array_equal(np.isnan(a), np.isnan(b)) and np.nanmax(np.abs(a - b)) < 1e-4
        u = lazy.uncertainty.compute()
        assert np.nanmax(np.abs(u - local.uncertainty)) < 1e-4


def test_needs_exactly_one_cluster_choice(inputs, tmp_path):
    from psm_mapping.errors import InputError

    with pytest.raises(InputError, match="one of workers"):
        map_region_distributed(_cfg(inputs, tmp_path), log_fn=lambda *a: None)
    with pytest.raises(InputError, match="one of workers"):
        map_region_distributed(_cfg(inputs, tmp_path), workers=2, scheduler="tcp://127.0.0.1:1",
                               log_fn=lambda *a: None)
