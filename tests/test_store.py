"""The embedding store: resume after kill -9, identical to an uninterrupted run; refusal of
stores built with other settings and of corrupt stores (one-line errors, exit 2)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from psm_mapping.cli import main
from psm_mapping.errors import StoreError
from psm_mapping.store import ARRAYS, DONE, EmbeddingStore, StoreSpec

from test_map_e2e import base_args, grid_for, make_inputs

REPO = Path(__file__).resolve().parents[1]
# 480 m square at 40 m: 12 x 12 px; blocks of 4 px: 9 blocks of 16 chips each
BLOCKS = 9


@pytest.fixture(scope="module")
def inp(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    return make_inputs(tmp_path_factory.mktemp("store-inputs"), tiny_ckpt, tokenizer_dir)


def command(inp, out: Path) -> list[str]:
    args = base_args(inp, out, "--query", "birds", "--block-size", "4", "--batch-size", "8",
                     "--no-previews", region="square")
    args.remove("--quiet")  # the summary line is what we read back
    return [sys.executable, "-m", "psm_mapping.cli", *args]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "2"
    return e


def done_count(store_root: Path, bs: int = 4) -> int:
    """Blocks (of ``bs`` px) whose pixels are all DONE at every zoom."""
    for p in store_root.glob("*.zarr"):
        try:
            st = np.asarray(zarr.open_group(str(p), mode="r")["status"][:])
        except Exception:  # not created yet, or mid-creation
            return 0
        Z, H, W = st.shape
        return sum(bool((st[:, r:r + bs, c:c + bs] == DONE).all())
                   for r in range(0, H, bs) for c in range(0, W, bs))
    return 0


def computed_blocks(stderr: str) -> tuple[int, int]:
    m = re.search(r"blocks (\d+) computed / (\d+) total", stderr)
    assert m, stderr[-2000:]
    return int(m.group(1)), int(m.group(2))


def store_arrays(root: Path) -> dict[str, np.ndarray]:
    (path,) = root.glob("*.zarr")
    g = zarr.open_group(str(path), mode="r")
    return {n: np.asarray(g[n][:]) for n in (*ARRAYS, "status", "x", "y", "zoom")}


@pytest.fixture(scope="module")
def fast_inp(inp, ckpt_factory):
    """A checkpoint without the metadata fuser: chips are cheap, the subprocess runs stay short."""
    return {**inp, "ckpt": ckpt_factory(sat_type="sentinel", metadata_type="none")}


def test_kill9_resume_identical(fast_inp, tmp_path):
    inp = fast_inp
    out = tmp_path / "killed" / "map.tif"
    out.parent.mkdir()
    cmd = command(inp, out)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while done_count(out.parent / "psm-store") < 1:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "no block finished in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    done_after_kill = done_count(out.parent / "psm-store")
    assert 1 <= done_after_kill < BLOCKS
    assert not out.exists()

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    computed, total = computed_blocks(resumed.stderr)
    assert total == BLOCKS and computed == BLOCKS - done_after_kill

    ref_out = tmp_path / "ref" / "map.tif"
    ref_out.parent.mkdir()
    # the uninterrupted run, in this process (same torch thread count as the subprocesses)
    assert main(command(inp, ref_out)[3:] + ["--quiet"]) == 0

    a, b = store_arrays(out.parent / "psm-store"), store_arrays(ref_out.parent / "psm-store")
    assert (a["status"] == DONE).all()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert np.array_equal(a[name], b[name], equal_nan=a[name].dtype.kind == "f"), name
    assert np.isfinite(a["var_sum"]).all() and a["z_img"].shape == (1, 12, 12, 512)

    import rasterio

    with rasterio.open(out) as s1, rasterio.open(ref_out) as s2:
        assert np.array_equal(s1.read(), s2.read(), equal_nan=True)


@pytest.fixture(scope="module")
def built(inp, tmp_path_factory):
    out = tmp_path_factory.mktemp("store-built") / "map.tif"
    assert main(base_args(inp, out, "--query", "birds", "--no-previews")) == 0
    (store,) = (out.parent / "psm-store").glob("*.zarr")
    return store


def _spec(inp, **kw) -> StoreSpec:
    d = dict(block_size=64, zoom_levels=(1,), checkpoint_sha256="0" * 64, imagery="scene.tif",
             min_valid=0.5, fc_dim=512, probabilistic=True)
    d.update(kw)
    return StoreSpec.for_grid(grid_for(inp), **d)


def test_other_settings_same_path(inp, tmp_path):
    url = str(tmp_path / "s.zarr")
    st = EmbeddingStore.open_or_create(url, _spec(inp))
    assert EmbeddingStore.open_or_create(url, _spec(inp)).spec.key() == st.spec.key()
    for other in (dict(zoom_levels=(1, 3)), dict(checkpoint_sha256="1" * 64), dict(imagery="other.tif"),
                  dict(block_size=32)):
        with pytest.raises(StoreError, match="other settings"):
            EmbeddingStore.open_or_create(url, _spec(inp, **other))
    # and the refusal changed nothing
    assert EmbeddingStore.open(url).spec.key() == st.spec.key()


def test_folder_that_is_not_a_store(inp, tmp_path):
    url = tmp_path / "notastore.zarr"
    zarr.open_group(str(url), mode="w").create_array("foo", shape=(2,), dtype="f4")
    with pytest.raises(StoreError, match="not a psm-mapping store"):
        EmbeddingStore.open_or_create(str(url), _spec(inp))


def test_query_with_another_checkpoint(inp, built, ckpt_factory, tmp_path, capsys):
    other = ckpt_factory(sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource", seed=1)
    rc = main(["query", str(built), "--query", "birds", "--checkpoint", str(other), "--tokenizer",
               str(inp["tokenizer"]), "--device", "cpu", "--quiet", "--out", str(tmp_path / "q.tif")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error:")
    assert "not the checkpoint this store was built with" in err[0] and "--checkpoint" in err[0]
    assert list(tmp_path.iterdir()) == []


def _corrupt_metadata(p: Path):
    (p / "zarr.json").write_text("{ this is not json")


def _drop_array(p: Path):
    shutil.rmtree(p / "mean")


def _corrupt_chunk(p: Path):
    chunks = [c for c in (p / "mean").rglob("*") if c.is_file() and c.name != "zarr.json"]
    assert chunks
    for c in chunks:
        c.write_bytes(b"\x00garbage" * 7)


@pytest.mark.parametrize("damage, words", [
    (_corrupt_metadata, "cannot open the store"),
    (_drop_array, "incomplete"),
    (_corrupt_chunk, "corrupt"),
])
def test_corrupt_store_clear_error(inp, built, tmp_path, capsys, damage, words):
    store = tmp_path / built.name
    shutil.copytree(built, store)
    damage(store)
    out = tmp_path / "out"
    out.mkdir()
    rc = main(["query", str(store), "--query", "birds", "--checkpoint", str(inp["ckpt"]), "--tokenizer",
               str(inp["tokenizer"]), "--device", "cpu", "--quiet", "--out", str(out / "q.tif")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("psm-map: error:"), err
    assert words in err[0] and ("rerun" in err[0] or "remove" in err[0]), err[0]
    assert list(out.iterdir()) == []


def test_query_reads_only_done_blocks(tmp_path, monkeypatch):
    """The slab fast path of query_store equals the block-by-block path, and a block whose data
    were written but not marked done (a run killed between the two) stays NaN."""
    import torch
    from affine import Affine
    from pyproj import CRS

    from psm_mapping.model.heads import ProbEmbedding
    from psm_mapping.query import Query, query_store
    from psm_mapping.store import BlockEmbeddings

    spec = StoreSpec(crs_wkt=CRS.from_epsg(32632).to_wkt(), transform=tuple(Affine(40, 0, 0, 0, -40, 0))[:6],
                     width=20, height=19, stride=40.0, block_size=8, zoom_levels=(1, 3), sat_type="sentinel",
                     checkpoint_sha256="0" * 64, imagery="x", min_valid=0.5, fc_dim=16, probabilistic=True)
    st = EmbeddingStore.open_or_create(str(tmp_path / "s.zarr"), spec, attrs={"metadata_options": None})
    rng = np.random.default_rng(0)
    blocks = list(st.iter_blocks())
    assert len(blocks) == 9
    for k, b in enumerate(blocks):
        m = rng.standard_normal((2, b.height, b.width, 16)).astype(np.float32)
        m /= np.linalg.norm(m, axis=-1, keepdims=True)
        vs = rng.uniform(1, 2, (2, b.height, b.width)).astype(np.float32)
        res = BlockEmbeddings(b, m.astype(np.float16), m.astype(np.float16), vs, vs * 3, np.ones_like(vs))
        if k in (1, 5):  # written, never marked done
            ys, xs = b.slices
            st.group["mean"][:, ys, xs, :] = res.mean
            st.group["var_sum"][:, ys, xs] = vs
            continue
        st.write_block(res)
    emb = ProbEmbedding.from_heads(torch.randn(2, 16), torch.full((2, 16), -2.0))
    queries = [Query("a", "text", emb[0]), Query("b", "text", emb[1])]
    fast = query_store(st, queries)
    slow = query_store(st, queries, blocks=blocks)
    for f, s in zip(fast.similarity, slow.similarity):
        np.testing.assert_allclose(f, s, rtol=0, atol=1e-5)
        assert np.array_equal(np.isnan(f), np.isnan(s))
    np.testing.assert_array_equal(fast.uncertainty, slow.uncertainty)
    for k in (1, 5):
        ys, xs = blocks[k].slices
        assert np.isnan(fast.similarity[0][:, ys, xs]).all() and np.isnan(fast.uncertainty[:, ys, xs]).all()
    done = [b for k, b in enumerate(blocks) if k not in (1, 5)]
    assert all(np.isfinite(fast.similarity[1][:, b.slices[0], b.slices[1]]).all() for b in done)
    # and the values are the csd formula
    m = np.asarray(st.group["mean"][:], np.float64)
    want = -(2 - 2 * (m @ emb.mean[1].double().numpy()) + np.asarray(st.group["var_sum"][:], np.float64)
             + float(emb[1].var_sum()[0]))
    ok = np.isfinite(fast.similarity[1])
    np.testing.assert_allclose(fast.similarity[1][ok], want[ok], atol=1e-5)
