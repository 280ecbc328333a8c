"""Store levels (overviews of embeddings): the float bound of "a level cell's similarity equals the
average of the full-resolution similarities over its DONE pixels", written with blocks equal to
rebuilt, old stores built on open, scale-true zooms on their own grids, corrupt level chunks."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from psm_mapping import engine as E
from psm_mapping import levels as L
from psm_mapping.store import DONE, EmbeddingStore

from store_fixtures import synthetic_store

U = 2.0 ** -24


def _queries(dim: int, seed: int = 1) -> E.QueryMatrix:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, dim, generator=g, dtype=torch.float64)
    q /= q.norm(dim=1, keepdim=True)
    return E.QueryMatrix(q.float(), torch.tensor([18.0, 22.5, 0.25], dtype=torch.float64))


def _cell_reference(full: E.Plane, sim0: np.ndarray, cell: int, shape) -> tuple[np.ndarray, np.ndarray]:
    """float64 average of full-resolution similarities over each cell's counted pixels."""
    ref = np.full((sim0.shape[0],) + tuple(shape), np.nan)
    cnt = np.zeros(shape, np.int64)
    for i in range(shape[0]):
        for j in range(shape[1]):
            c = full.count[i * cell:(i + 1) * cell, j * cell:(j + 1) * cell] > 0
            cnt[i, j] = c.sum()
            if c.any():
                ref[:, i, j] = sim0[:, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell][:, c].mean(1)
    return ref, cnt


def test_done_code_is_the_stores():
    assert L.DONE == DONE


@pytest.mark.parametrize("block", [8, 16])
def test_level_similarity_is_the_average_of_pixel_similarities(tmp_path, block):
    st = synthetic_store(tmp_path / "s.zarr", 37, 45, block=block, dim=32)
    assert L.has_levels(st) and L.stored_levels(st.spec) == {8: 3, 16: 4}[block]
    qm = _queries(32)
    full = E.read_plane(st, 1)
    sim0 = E.similarity(full.mean.astype(np.float64), full.var_sum.astype(np.float64), qm)
    assert E.max_level(st, 1) == 6
    for k in range(1, E.max_level(st, 1) + 1):
        p = E.read_plane(st, 1, None, k)
        ref, cnt = _cell_reference(full, sim0, 1 << k, p.shape)
        np.testing.assert_array_equal(p.count, cnt)  # counts: DONE pixels with an embedding
        assert np.array_equal(np.isnan(ref[0]), ~p.ok)
        vmax = float(np.nanmax(np.abs(full.var_sum)))
        # the level sums alone (float64 kernel): 2 (2k+1) u + (2k+1) u max|var_sum| (+ the float32 average)
        s64 = E.similarity(p.mean.astype(np.float64), p.var_sum.astype(np.float64), qm)
        bound = 2 * (2 * k + 1) * U + (2 * k + 2) * U * vmax + 2 * U
        assert np.nanmax(np.abs(s64 - ref)) <= bound, (k, np.nanmax(np.abs(s64 - ref)), bound)
        # the float32 kernel adds its own dot rounding (<= D u) and the csd's additions (~4 u |csd|)
        s32 = E.similarity(p.mean, p.var_sum, qm)
        bound32 = bound + 32 * U + 4 * U * float(np.nanmax(np.abs(ref)))
        assert np.nanmax(np.abs(s32 - ref)) <= bound32
        assert np.nanmax(np.abs(s32 - ref)) < 1e-5


def test_cosine_levels_average_the_dot_product(tmp_path):
    st = synthetic_store(tmp_path / "c.zarr", 20, 19, dim=16, probabilistic=False)
    qm = E.QueryMatrix(_queries(16).mean, None)
    full = E.read_plane(st, 0)
    sim0 = E.similarity(full.mean.astype(np.float64), full.var_sum, qm)
    p = E.read_plane(st, 0, None, 2)
    ref, _ = _cell_reference(full, sim0, 4, p.shape)
    assert np.nanmax(np.abs(E.similarity(p.mean.astype(np.float64), p.var_sum, qm) - ref)) <= 2 * 5 * U + 2 * U


def _level_arrays(st) -> dict:
    return {f"{k}/{n}": np.asarray(st.group[L.GROUP][str(k)][n][:])
            for k in range(1, L.stored_levels(st.spec) + 1) for n in ("mean_sum", "stats", "z_img")}


def test_levels_written_with_blocks_equal_a_rebuild_and_old_stores_get_them(tmp_path):
    st = synthetic_store(tmp_path / "s.zarr", 21, 27, block=8)
    written = _level_arrays(st)
    # an old store: no levels; reading a level sums full resolution (exact, the same tree)
    shutil.rmtree(tmp_path / "s.zarr" / L.GROUP)
    old = EmbeddingStore.open(str(tmp_path / "s.zarr"))
    assert not L.has_levels(old)
    on_the_fly = E.read_plane(old, 0, None, 2)
    # first use for writing builds them: equal bit for bit to those written with the blocks
    again = EmbeddingStore.open_or_create(str(tmp_path / "s.zarr"), old.spec)
    assert L.has_levels(again)
    for name, a in _level_arrays(again).items():
        np.testing.assert_array_equal(a, written[name], err_msg=name)
    stored = E.read_plane(again, 0, None, 2)
    np.testing.assert_array_equal(stored.mean, on_the_fly.mean)
    np.testing.assert_array_equal(stored.count, on_the_fly.count)


def test_resumed_block_writes_the_same_cells(tmp_path):
    """A block written in two runs (part PENDING first) ends with the levels of a one-run block."""
    from psm_mapping.store import PENDING, BlockEmbeddings

    one = synthetic_store(tmp_path / "one.zarr", 16, 16, block=8, holes=False)
    two = synthetic_store(tmp_path / "two.zarr", 16, 16, block=8, holes=False, seed=5)
    b = next(two.iter_blocks())
    d = one.read_block(b)
    st = np.full(d["valid"].shape, DONE, np.uint8)
    half = st.copy()
    half[:, :4] = PENDING
    for status in (half, st):  # first half the block, then the rest
        two.write_block(BlockEmbeddings(b, d["z_img"], d["mean"], d["var_sum"], d["uncertainty"], d["valid"], status))
    for k in (1, 2, 3):
        a = np.asarray(one.group[L.GROUP][str(k)]["mean_sum"][:, :8 >> k, :8 >> k])
        c = np.asarray(two.group[L.GROUP][str(k)]["mean_sum"][:, :8 >> k, :8 >> k])
        np.testing.assert_array_equal(a, c)
    two.reset_blocks([b])  # pixels PENDING again: their cells are empty
    assert (np.asarray(two.group[L.GROUP]["1"]["stats"][:, :4, :4, L.COUNT]) == 0).all()


def test_scale_true_levels_are_on_each_zoom_grid(tmp_path):
    st = synthetic_store(tmp_path / "s.zarr", 30, 22, block=8, zooms=(1, 5), factors=(1, 3), dim=16)
    g = st.zoom_group(1)
    assert (g.height, g.width) == (10, 8)
    full = E.read_plane(st, 1)
    assert full.shape == (10, 8) and full.cell == 3
    p = E.read_plane(st, 1, None, 1)
    assert p.shape == (5, 4) and p.cell == 6
    assert p.transform.a == 6 * st.spec.stride
    qm = _queries(16)
    sim0 = E.similarity(full.mean.astype(np.float64), full.var_sum.astype(np.float64), qm)
    ref, cnt = _cell_reference(full, sim0, 2, p.shape)
    np.testing.assert_array_equal(p.count, cnt)
    assert np.nanmax(np.abs(E.similarity(p.mean, p.var_sum, qm) - ref)) < 1e-5
    # a window in output pixels reads the cells covering it
    w = E.read_plane(st, 1, E.Window(12, 6, 6, 6), 1)
    assert (w.row_off, w.col_off, w.shape) == (2, 1, (1, 1))


def test_a_corrupt_level_chunk_is_answered_from_full_resolution(tmp_path):
    st = synthetic_store(tmp_path / "s.zarr", 16, 16, block=8)
    want = E.read_plane(st, 0, None, 1)
    chunk = next((tmp_path / "s.zarr" / L.GROUP / "1" / "mean_sum").rglob("c/0/0/0/0"))
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    got = E.read_plane(EmbeddingStore.open(str(tmp_path / "s.zarr")), 0, None, 1)
    np.testing.assert_array_equal(got.mean, want.mean)


def test_level_for_pixel_size(tmp_path):
    st = synthetic_store(tmp_path / "s.zarr", 40, 40, block=8, zooms=(1, 5), factors=(1, 4), holes=False)
    assert E.level_for_pixel_size(st, 0, 50.0) == 0
    assert E.level_for_pixel_size(st, 0, 100.0) == 0
    assert E.level_for_pixel_size(st, 0, 399.0) == 1
    assert E.level_for_pixel_size(st, 0, 400.0) == 2
    assert E.level_for_pixel_size(st, 0, 1e9) == E.max_level(st, 0) == 6
    assert E.level_for_pixel_size(st, 1, 800.0) == 1  # zoom grid of 400 m cells
    assert E.max_level(st, 1) == 4


def test_levels_command_builds_an_old_stores_levels(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    synthetic_store(tmp_path / "s.zarr", 20, 20)
    shutil.rmtree(tmp_path / "s.zarr" / L.GROUP)
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "levels", str(tmp_path / "s.zarr"), "--quiet"],
                       capture_output=True, text=True, env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert p.returncode == 0, p.stderr
    assert "levels 1..3 stored for 9 blocks" in p.stdout
    assert L.has_levels(EmbeddingStore.open(str(tmp_path / "s.zarr")))
