"""Never a silently wrong map: every fault is either computed right or loudly masked.

Through the real CLI, with a faulty tile server on 127.0.0.1 (deterministic per-tile 500, 429,
truncated PNGs, delays, a kill switch) and maps compared pixel for pixel, NaN-aware, with a
clean run: tile faults never become image content and heal on a rerun; a store serves every
region on its grid; replaced imagery makes a new store; pixels do not depend on the block size or
the region; full disks, corrupt chunks, leftovers and concurrent runs lose nothing.
"""
from __future__ import annotations

import os
import time
import re
import shutil
import subprocess
import sys
from pathlib import Path

import morecantile
import numpy as np
import pytest
import rasterio
from pyproj import Transformer

from psm_mapping.cli import main
from psm_mapping.grid import make_grid
from psm_mapping.imagery.local import LocalRasterSource
from psm_mapping.imagery.xyz import XYZSource
from psm_mapping.region import load_region
from psm_mapping.store import DONE, FAULT, EmbeddingStore
from psm_mapping.tiling import iter_chips

from servers import SceneTiles, TileServer, write_scene
from test_map_e2e import UTM, base_args, make_inputs, write_region

REPO = Path(__file__).resolve().parents[1]
_TMS = morecantile.tms.get("WebMercatorQuad")
# a 14 km scene at 20 m; the region is an 8 km square in its middle: 16 x 16 px of 500 m
BIG = dict(left=490_000.0, top=4_994_000.0, res=20.0, size=700)
CX, CY, HALF, STRIDE = 497_000.0, 4_987_000.0, 4_000.0, 500
#: the model's float32 sums depend in the last bits on how chips are batched: maps of the same
#: chips embedded in other batches agree to this (similarity spans ~0.2 on these maps)
TOL = 2e-5


@pytest.fixture(scope="module")
def inp(tmp_path_factory, ckpt_factory, tokenizer_dir):
    folder = tmp_path_factory.mktemp("faults")
    # no metadata fuser: chips are cheap
    d = make_inputs(folder, ckpt_factory(sat_type="sentinel", metadata_type="none"), tokenizer_dir)
    big = folder / "big.tif"
    write_scene(big, UTM, BIG["left"], BIG["top"], BIG["res"], BIG["size"], BIG["size"], seed=5)
    d["big"] = big
    d["big_region"] = write_region(folder / "big.geojson", half_m=HALF, shape="square", center=(CX, CY))
    d["sq160"] = write_region(folder / "sq160.geojson", half_m=160.0, shape="square")
    d["tiles"] = SceneTiles(big)
    return d


def run(args: list[str], capsys) -> tuple[int, list[str]]:
    rc = main(args)
    return rc, capsys.readouterr().err.strip().splitlines()


def xyz_args(inp, out: Path, template: str, *extra: str) -> list[str]:
    args = base_args(inp, out, "--query", "birds", "--stride", str(STRIDE), "--block-size", "4",
                     "--no-previews", "--imagery-option", "retries=1", "--imagery-option", "backoff=0.01",
                     *extra, region="big_region", imagery="xyz:" + template)
    args.remove("--quiet")  # the summary is what we read back
    return args


def band(path: Path) -> tuple[np.ndarray, dict]:
    with rasterio.open(path) as src:
        return src.read(1), src.tags()


def corner_tile(x: float, y: float):
    """A fault rule failing the tile (at any zoom) under a point of the grid CRS."""
    lon, lat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(x, y)
    return lambda z: tuple(_TMS.tile(lon, lat, z))[:2]


@pytest.fixture(scope="module")
def clean(inp, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "clean.tif"
    with TileServer(inp["tiles"]) as srv:
        assert main(xyz_args(inp, out, srv.template()) + ["--quiet"]) == 0
    data, _ = band(out)
    return data


def _fault_rule():
    tiles = {"500": corner_tile(CX - HALF + 300, CY + HALF - 300),
             "truncated": corner_tile(CX + HALF - 300, CY - HALF + 300),
             "429": corner_tile(CX + HALF - 300, CY + HALF - 300),
             "delay": corner_tile(CX - HALF + 300, CY - HALF + 300)}

    def rule(z, x, y):
        for kind, at in tiles.items():
            if at(z) == (x, y):
                return kind
        return None
    return rule


def test_flaky_server_masks_faults_and_rerun_heals_them(inp, clean, tmp_path, capsys):
    region = np.isfinite(clean)
    assert region.sum() == 256
    out = tmp_path / "flaky.tif"
    with TileServer(inp["tiles"], fault_rule=_fault_rule(), delay_s=0.2) as srv:
        rc, err = run(xyz_args(inp, out, srv.template()), capsys)
        assert rc == 0, err[-5:]
        data, tags = band(out)
        # the last line says how many pixels are masked and that a rerun retries them
        m = re.match(r"([\d,]+) pixel-zooms are masked \(NaN\).*rerun", err[-1])
        assert m, err[-3:]
        masked = int(m.group(1).replace(",", ""))
        holes = region & np.isnan(data)
        assert holes.sum() == masked and 0 < masked < region.sum() // 2
        assert "rerun" in tags["imagery_faults"]
        # no failed tile became image content: every value present is the clean run's (the chips
        # are bit-identical; the model's float sums may differ in the last bits with the batching)
        ok = region & np.isfinite(data)
        print("flaky vs clean max abs difference:", float(np.abs(data[ok] - clean[ok]).max()))
        np.testing.assert_allclose(data[ok], clean[ok], rtol=0, atol=TOL)
        (store_url,) = (tmp_path / "psm-store").glob("*.zarr")
        st = EmbeddingStore.open(str(store_url))
        assert int((st.status() == FAULT).sum()) == masked
        # the server heals: the rerun computes exactly the masked pixels and equals the clean map
        srv.fault_rule = None
        rc, err = run(xyz_args(inp, out, srv.template(), "--overwrite"), capsys)
        assert rc == 0, err[-5:]
    assert f"chips embedded {masked:,};" in "\n".join(err)
    assert not any("masked (NaN)" in line for line in err)
    healed, tags = band(out)
    assert np.array_equal(np.isnan(healed), np.isnan(clean)) and "imagery_faults" not in tags
    np.testing.assert_allclose(healed[region], clean[region], rtol=0, atol=TOL)
    assert (EmbeddingStore.open(str(store_url)).status()[:, region] == DONE).all()
    print(f"flaky run: {masked} of {int(region.sum())} pixels masked; healed rerun embedded {masked}")


def test_dying_server_fails_loudly_and_the_rerun_completes(inp, clean, tmp_path, capsys):
    out = tmp_path / "dying.tif"
    srv = TileServer(inp["tiles"], die_after=15).start()
    port = srv.port
    try:
        rc, err = run(xyz_args(inp, out, srv.template(), "--imagery-option", "dead_after=3"), capsys)
    finally:
        srv.stop()
    assert rc == 2 and err[-1].startswith("psm-map: error:") and "tile server" in err[-1], err[-5:]
    # a server that refuses at once may fail every tile before the 3 s window is over: then the
    # "most of the region failed" line ends the run (no map, finished pixels kept) instead
    assert ("stopped answering" in err[-1] and "3 s" in err[-1]) or \
        ("could not be read from xyz:127.0.0.1" in err[-1] and "finished pixels are kept" in err[-1]), err[-1]
    assert sum(line.startswith("psm-map: error:") for line in err) == 1
    assert not any("Traceback" in line for line in err) and not out.exists()
    (store_url,) = (tmp_path / "psm-store").glob("*.zarr")
    kept = int((EmbeddingStore.open(str(store_url)).status() == DONE).sum())
    with TileServer(inp["tiles"], port=port) as back:  # the server is back, at the same address
        rc, err = run(xyz_args(inp, out, back.template()), capsys)
    assert rc == 0, err[-5:]
    # what was finished before the server died is kept: the rerun embeds only the rest
    assert f"chips embedded {int(np.isfinite(clean).sum()) - kept:,};" in "\n".join(err)
    got = band(out)[0]
    assert np.array_equal(np.isnan(got), np.isnan(clean))
    np.testing.assert_allclose(got[np.isfinite(clean)], clean[np.isfinite(clean)], rtol=0, atol=TOL)


def test_server_failing_everywhere_writes_no_map(inp, tmp_path, capsys):
    out = tmp_path / "dead.tif"
    with TileServer(inp["tiles"], fault_rule=lambda z, x, y: "500") as srv:
        rc, err = run(xyz_args(inp, out, srv.template(), "--imagery-option", "retries=0", "--quiet"),
                      capsys)
    assert rc == 2 and len(err) == 1 and "could not be read" in err[0] and "rerun" in err[0], err
    assert not out.exists()


def test_one_store_serves_every_region_on_its_grid(inp, tmp_path, capsys):
    store = tmp_path / "shared-store"
    tri, sq = tmp_path / "tri.tif", tmp_path / "sq.tif"
    extra = ["--store", str(store), "--query", "birds", "--no-previews"]
    assert main(base_args(inp, tri, *extra, region="region")) == 0
    args = base_args(inp, sq, *extra, region="sq160")
    args.remove("--quiet")
    rc, err = run(args, capsys)
    assert rc == 0
    assert len(list(store.glob("*.zarr"))) == 1  # the same grid, the same store
    sq_map, _ = band(sq)
    tri_map, _ = band(tri)
    fresh = tmp_path / "fresh.tif"
    assert main(base_args(inp, fresh, "--store", str(tmp_path / "fresh-store"), "--query", "birds",
                          "--no-previews", region="sq160")) == 0
    # the square is computed wherever the triangle run left it out: no hole, the fresh values
    assert np.isfinite(sq_map).all() and np.array_equal(sq_map, band(fresh)[0])
    n_tri, n_sq = int(np.isfinite(tri_map).sum()), sq_map.size
    assert 0 < n_tri < n_sq and f"chips embedded {n_sq - n_tri:,};" in "\n".join(err)
    # and a region's pixels do not depend on its shape: the triangle's are the square's
    assert np.array_equal(tri_map[np.isfinite(tri_map)], sq_map[np.isfinite(tri_map)])


def test_replaced_imagery_makes_a_new_store(inp, tmp_path):
    scene = tmp_path / "scene.tif"
    shutil.copy(inp["scene"], scene)
    store = tmp_path / "store"
    args = lambda out: base_args(inp, out, "--store", str(store), "--query", "birds", "--no-previews",  # noqa: E731
                                 region="sq160", imagery=str(scene))
    assert main(args(tmp_path / "a.tif")) == 0
    with LocalRasterSource(scene) as src:
        before = src.identity()
    os.remove(scene)  # the same path, other content
    from test_map_e2e import LEFT, RES, SIZE, TOP
    write_scene(scene, UTM, LEFT, TOP, RES, SIZE, SIZE, seed=11)
    with LocalRasterSource(scene) as src:
        assert src.identity() != before
    assert main(args(tmp_path / "b.tif")) == 0
    assert len(list(store.glob("*.zarr"))) == 2
    a, b = band(tmp_path / "a.tif")[0], band(tmp_path / "b.tif")[0]
    assert np.isfinite(a).all() and np.isfinite(b).all() and np.abs(a - b).max() > 1e-4


def test_local_identity_reads_little_of_a_big_file(tmp_path):
    path = tmp_path / "big.tif"
    with rasterio.open(path, "w", driver="GTiff", width=8000, height=8000, count=3, dtype="uint8",
                       crs=UTM, transform=rasterio.transform.from_origin(500000, 5000000, 10, 10),
                       tiled=True) as dst:
        dst.write(np.full((3, 256, 256), 7, np.uint8), window=rasterio.windows.Window(0, 0, 256, 256))
    with LocalRasterSource(path) as src:
        ident = src.identity()
        assert src.identity() == ident
    with open(path, "r+b") as f:  # one byte in the middle of the file, size and time kept
        st = os.stat(path)
        f.seek(st.st_size * 3 // 7)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    with LocalRasterSource(path) as src:
        assert src.identity() != ident


def test_pixels_do_not_depend_on_block_size(inp, tmp_path):
    maps = []
    for bs in (2, 64):
        out = tmp_path / f"bs{bs}.tif"
        assert main(base_args(inp, out, "--store", str(tmp_path / f"s{bs}"), "--query", "birds",
                              "--no-previews", "--block-size", str(bs), "--zoom-level", "1,3",
                              region="sq160")) == 0
        with rasterio.open(out) as src:
            maps.append(src.read())
    assert np.isfinite(maps[0][0]).all()  # zoom 1; zoom-3 chips mostly leave the 4 km scene
    assert np.array_equal(np.isnan(maps[0]), np.isnan(maps[1]))
    ok = np.isfinite(maps[0])
    np.testing.assert_allclose(maps[0][ok], maps[1][ok], rtol=0, atol=TOL)


@pytest.mark.parametrize("kind", ["local", "xyz"])
def test_chips_bit_identical_across_blocks_and_regions(inp, kind):
    """The same pixel gets the same chip bytes whatever the block size or the region's extent."""
    region_a = load_region(str(inp["big_region"]))
    grid_a = make_grid(region_a, stride=STRIDE, sat_type="sentinel", zoom_levels=(1, 3))
    # a smaller region, shifted: another grid origin, sharing pixels with the first
    small = write_region(inp["big"].parent / "small.geojson", half_m=1500, shape="square",
                         center=(CX + 1000, CY - 1500))
    grid_b = make_grid(load_region(str(small)), stride=STRIDE, sat_type="sentinel", zoom_levels=(1, 3))

    def chips(src, grid, bs):
        out = {}
        x0, y0 = grid.transform.c, grid.transform.f
        for b in iter_chips(src, grid, batch_size=16, block_size=bs, progress=False, prefetch=bs > 4):
            for k in range(len(b)):
                key = (b.zoom, round(x0 / STRIDE) + int(b.cols[k]), round(-y0 / STRIDE) + int(b.rows[k]))
                out[key] = b.chips[k]
        return out

    srv = TileServer(inp["tiles"]).start() if kind == "xyz" else None
    try:
        make = (lambda: XYZSource(srv.template())) if srv else (lambda: LocalRasterSource(inp["big"]))
        with make() as s1, make() as s2:
            a3, a16, b5 = chips(s1, grid_a, 3), chips(s2, grid_a, 16), chips(s1, grid_b, 5)
    finally:
        if srv:
            srv.stop()
    assert set(a3) == set(a16) and len(a3) == 2 * grid_a.pixel_count
    shared = set(a3) & set(b5)
    assert len(shared) == 2 * grid_b.pixel_count > 0
    assert all(np.array_equal(a3[k], a16[k]) for k in a3)
    assert all(np.array_equal(a3[k], b5[k]) for k in shared)


# -- full disks and odd output places -------------------------------------------------------------
@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.strip() or 'not root'})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_store_on_a_full_disk_is_one_line(inp, tiny_fs, tmp_path, capsys):
    out = tmp_path / "map.tif"
    rc, err = run(base_args(inp, out, "--store", str(tiny_fs / "store"), "--query", "birds",
                            "--no-previews", region="sq160"), capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error:"), err[-5:]
    assert "No space left on device" in err[0] and "--store" in err[0], err[0]
    assert not out.exists()


def test_out_in_proc_is_one_line(inp, capsys):
    rc, err = run(base_args(inp, Path("/proc/psm-test-map.tif"), "--query", "birds", region="sq160"),
                  capsys)
    assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error:"), err


# -- corruption ----------------------------------------------------------------------------------------
def test_bit_flip_in_a_chunk_is_found_and_recomputed(inp, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "m.tif"
    args = base_args(inp, out, "--store", str(store), "--query", "birds", "--no-previews", region="sq160")
    assert main(args) == 0
    ref, _ = band(out)
    (zs,) = store.glob("*.zarr")
    chunk = max((c for c in (zs / "mean").rglob("*") if c.is_file() and c.name != "zarr.json"),
                key=lambda c: c.stat().st_size)
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0x10  # one bit, size unchanged
    chunk.write_bytes(bytes(raw))
    # the query alone cannot recompute: one line saying what to do
    rc, err = run(["query", str(zs), "--query", "birds", "--checkpoint", str(inp["ckpt"]), "--tokenizer",
                   str(inp["tokenizer"]), "--clap-config", str(inp["clap"]), "--device", "cpu", "--quiet",
                   "--out", str(tmp_path / "q.tif")], capsys)
    assert rc == 2 and len(err) == 1 and "corrupt chunk" in err[0] and "rerun" in err[0], err
    # the map run finds it by its checksum and computes that block again
    a = list(args)
    a.remove("--quiet")
    rc, err = run(a + ["--overwrite"], capsys)
    assert rc == 0 and any("corrupt" in line for line in err), err
    assert np.array_equal(band(out)[0], ref, equal_nan=True)


def test_old_store_format_is_refused_with_the_fix(inp, tmp_path, capsys):
    store, out = tmp_path / "store", tmp_path / "m.tif"
    args = base_args(inp, out, "--store", str(store), "--query", "birds", "--no-previews", region="sq160")
    assert main(args) == 0
    (zs,) = store.glob("*.zarr")
    import zarr

    g = zarr.open_group(str(zs), mode="r+")
    g.attrs["format"] = "psm-mapping-store/1"
    rc, err = run(args + ["--overwrite"], capsys)
    assert rc == 2 and len(err) == 1 and "older psm-mapping" in err[0] and "remove it" in err[0], err


# -- concurrency ---------------------------------------------------------------------------------------
def _env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "1"
    return e


def test_two_runs_on_one_store_compute_each_block_once(inp, tmp_path):
    store = tmp_path / "store"
    cmds = []
    for name in ("a", "b"):
        args = base_args(inp, tmp_path / f"{name}.tif", "--store", str(store), "--query", "birds",
                         "--no-previews", "--block-size", "2", region="sq160")
        args.remove("--quiet")
        cmds.append([sys.executable, "-m", "psm_mapping.cli", *args])
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                              cwd=tmp_path) for c in cmds]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for e in errs]
    chips = [int(re.search(r"chips embedded ([\d,]+);", e).group(1).replace(",", "")) for e in errs]
    assert sum(chips) == 8 * 8, chips  # every pixel embedded once, by one of the runs
    assert len(list(store.glob("*.zarr"))) == 1 and not list(store.glob(".*tmp*"))
    assert not list((store).glob("*.locks/*.lock"))  # locks released
    assert np.array_equal(band(tmp_path / "a.tif")[0], band(tmp_path / "b.tif")[0])


def test_stale_lock_of_a_dead_run_is_taken_over(inp, tmp_path):
    from psm_mapping.store import BlockLocks

    url = str(tmp_path / "s.zarr")
    locks = BlockLocks(url)
    locks.dir.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (locks.dir / "0_0.lock").write_text(f"{dead} {locks.host} 0\n")
    assert locks.holder((0, 0)) is None and locks.acquire((0, 0))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (locks.dir / "0_1.lock").write_text(f"{live.pid} {locks.host} 0\n")
        assert locks.holder((0, 1)) == f"pid {live.pid}" and not locks.acquire((0, 1))
    finally:
        live.kill()
        live.wait()
    locks.release_all()
    assert not (locks.dir / "0_0.lock").exists()
    # a lock file cut short (its holder killed while writing, by an older version) is respected
    # while fresh and taken over once old; locks are written whole, and no private file is left
    cut = locks.dir / "0_2.lock"
    cut.write_text("")
    assert locks.holder((0, 2)) is not None and not locks.acquire((0, 2))
    old = time.time() - 2 * locks.unreadable_stale_s
    os.utime(cut, (old, old))
    assert locks.holder((0, 2)) is None and locks.acquire((0, 2))
    assert cut.read_text().split()[0] == str(os.getpid())
    locks.release_all()
    assert sorted(p.name for p in locks.dir.iterdir()) == ["0_1.lock"]  # the live one, not ours


# -- smaller ones -----------------------------------------------------------------------------------
def test_info_into_a_closed_pipe_exits_quietly(inp, tmp_path):
    store = tmp_path / "store"
    assert main(base_args(inp, tmp_path / "m.tif", "--store", str(store), "--query", "birds",
                          "--no-previews", region="sq160")) == 0
    (zs,) = store.glob("*.zarr")
    p = subprocess.Popen([sys.executable, "-m", "psm_mapping.cli", "info", str(zs)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env())
    p.stdout.read(1)
    p.stdout.close()  # like `| head -c 1`
    err = p.stderr.read().decode()
    p.wait(60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_ring_jumping_the_antimeridian_says_so(tmp_path, capsys):
    import json

    ring = [[179.9, -17.0], [-179.9, -17.0], [-179.9, -16.8], [179.9, -16.8], [179.9, -17.0]]
    path = tmp_path / "fiji.geojson"
    path.write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    rc, err = run([str(path), "--imagery", "x.tif", "--query", "birds", "--out", str(tmp_path / "m.tif")], capsys)
    assert rc == 2 and len(err) == 1 and "antimeridian" in err[0] and "split" in err[0], err
    assert "pixels" not in err[0]


def test_dask_dashboard_binds_loopback():
    from psm_mapping.distributed import connect

    with connect(workers=1, log_fn=lambda *a: None) as client:
        link = client.dashboard_link
        assert "127.0.0.1" in link
        addr = client.cluster.scheduler.http_server.socket.getsockname() if hasattr(
            client.cluster.scheduler.http_server, "socket") else None
    if addr:
        assert addr[0] == "127.0.0.1"


# -- a server that dies ---------------------------------------------------------------------------
def test_dead_server_ends_the_run_soon_and_the_rerun_resumes(inp, clean, tmp_path):
    """The issue's case, through the real CLI with the default retries, backoff and window
    (30 s): the tile server dies after 60 of the 120 tiles; the run ends soon after, with one line naming
    the server, no map, the finished blocks kept; the rerun once it is back gives the clean map."""
    out = tmp_path / "dead.tif"
    srv = TileServer(inp["tiles"], die_after=60).start()
    port = srv.port
    args = base_args(inp, out, "--query", "birds", "--stride", str(STRIDE), "--block-size", "4",
                     "--no-previews", region="big_region", imagery="xyz:" + srv.template())
    cmd = [sys.executable, "-m", "psm_mapping.cli", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                         cwd=tmp_path)
    try:
        _, err = p.communicate(timeout=400)
        t_exit = time.monotonic()
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
        srv.stop()
    assert srv.killed_at is not None
    took = t_exit - srv.killed_at
    print(f"dead server: the run ended {took:.1f} s after the kill (window 30 s)")
    lines = err.strip().splitlines()
    assert p.returncode == 2 and lines[-1].startswith("psm-map: error:"), lines[-5:]
    assert sum(line.startswith("psm-map: error:") for line in lines) == 1
    assert not any("Traceback" in line for line in lines), err[-2000:]
    msg = lines[-1]
    assert "127.0.0.1" in msg and "kept" in msg and "rerun" in msg and "no map" in msg, msg
    assert not out.exists() and not list(tmp_path.glob("*.tif"))
    assert took < 45, took
    (store_url,) = (tmp_path / "psm-store").glob("*.zarr")
    kept = int((EmbeddingStore.open(str(store_url)).status() == DONE).sum())
    assert kept > 0
    with TileServer(inp["tiles"], port=port) as back:  # the server answers again: the rerun resumes
        p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=400)
    assert p.returncode == 0, p.stderr[-2000:]
    region = np.isfinite(clean)
    got = band(out)[0]
    assert np.array_equal(np.isnan(got), ~region)
    np.testing.assert_allclose(got[region], clean[region], rtol=0, atol=TOL)
