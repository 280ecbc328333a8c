"""A full disk under any writer is one line on stderr: the problem and the fix, exit 2, nothing at
the final names. Through the real CLI in a subprocess (so that anything GDAL or libtiff prints on
the C-level stderr would show), on a small tmpfs filled up to a chosen number of free bytes."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_map_e2e import base_args, make_inputs

REPO = Path(__file__).resolve().parents[1]
PAGE = 4096


@pytest.fixture(scope="module")
def inp(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    return make_inputs(tmp_path_factory.mktemp("disk-inputs"), tiny_ckpt, tokenizer_dir)


@pytest.fixture
def disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path, leave: int) -> None:
    """Fill ``mnt`` so that ``leave`` bytes (rounded up to pages) stay free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    size = free - math.ceil(leave / PAGE) * PAGE
    with open(mnt / "filler", "wb") as fh:
        fh.write(b"\0" * size)
    assert os.statvfs(mnt).f_bavail * PAGE == math.ceil(leave / PAGE) * PAGE


def cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CPL_LOG", None)
    return subprocess.run([sys.executable, "-m", "psm_mapping.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)


def pages(path: Path) -> int:
    if path.is_dir():
        return sum(pages(p) for p in path.iterdir())
    return math.ceil(path.stat().st_size / PAGE)


def assert_one_line(p: subprocess.CompletedProcess, *words: str) -> str:
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
    line = lines[0]
    assert line.startswith("psm-map: error:") and "No space left on device" in line, line
    assert all(w in line for w in words), line
    return line


@pytest.mark.parametrize("what", ["cog", "zarr", "style", "stac", "previews"])
def test_full_disk_under_each_writer_is_one_line(inp, disk, tmp_path, what):
    name = "m.zarr" if what == "zarr" else "m.tif"
    args = lambda out: base_args(inp, out, "--store", str(tmp_path / "store"),  # noqa: E731
                                 "--query", "birds")
    leave = 0
    # the writers in their order: the map, its QGIS style, the STAC Item, the previews; room for
    # those before ``what``, not for ``what``
    before = {"style": [name], "stac": [name, "m.qml"], "previews": [name, "m.qml", f"{name}.stac.json"]}
    if what in before:
        ref = tmp_path / "ref"
        ref.mkdir()
        r = cli(args(ref / name), tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        leave = sum(pages(ref / f) for f in before[what]) * PAGE
    fill(disk, leave)
    p = cli(args(disk / name), tmp_path)
    target = {"style": "m.qml", "stac": f"{name}.stac.json", "previews": f"{name}.preview"}.get(what, name)
    line = assert_one_line(p, f"cannot write {disk / target}:", f"in {disk}:", "--out")
    print(what, "->", line)
    assert sorted(os.listdir(disk)) == ["filler"]  # nothing at the final names, no staged files


def test_store_on_a_full_disk_is_one_line(inp, disk, tmp_path):
    fill(disk, 0)
    p = cli(base_args(inp, tmp_path / "m.tif", "--store", str(disk / "store"), "--query", "birds"),
            tmp_path)
    line = assert_one_line(p, str(disk / "store"), "--store", "rerun")
    print("store ->", line)
    assert not (tmp_path / "m.tif").exists()


_TABLE = """
import sys
from psm_mapping.errors import PSMError
from psm_mapping.cli.base import error_line
from psm_mapping.gdal_log import route_gdal_messages
import geopandas as gpd, numpy as np
from psm_mapping.places.tables import write_table
route_gdal_messages()  # as the CLI does
n = 4000
rng = np.random.default_rng(0)
frame = gpd.GeoDataFrame({"v": rng.normal(size=n)}, crs=4326,
                         geometry=gpd.points_from_xy(rng.uniform(-10, 10, n), rng.uniform(40, 50, n)))
try:
    write_table(frame, sys.argv[1], {"run": 1})
except PSMError as exc:
    print(error_line(exc), file=sys.stderr)
    sys.exit(2)
"""


@pytest.mark.parametrize("suffix", ["csv", "gpkg", "geojson"])
def test_full_disk_under_the_table_writer_is_one_line(disk, tmp_path, suffix):
    """`psm-map points` / `zonal` tables (pandas CSV, GDAL's GeoPackage and GeoJSON via pyogrio)."""
    fill(disk, 0)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("CPL_LOG", None)
    out = disk / f"sites.{suffix}"
    p = subprocess.run([sys.executable, "-c", _TABLE, str(out)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert_one_line(p, f"cannot write table {out}:", f"in {disk}:", "--out")
    assert sorted(os.listdir(disk)) == ["filler"]


_UNREAD_FUTURE = """
import asyncio, gc, sys
from psm_mapping.gdal_log import route_gdal_messages
if sys.argv[1] != "raw":
    route_gdal_messages()  # as the CLI does
loop = asyncio.new_event_loop()
fut = loop.create_future()
if sys.argv[1] == "other":  # any other unread failure still reaches the console
    fut.set_exception(ValueError("a bug"))
else:
    fut.set_exception(OSError(28, "No space left on device"))  # as zarr's sibling chunk writes end
del fut
gc.collect()
loop.close()
"""


@pytest.mark.parametrize("case", ["raw", "routed", "other"])
def test_unread_async_failures_stay_off_the_terminal(case):
    """zarr's sibling chunk writes fail like the one the store reports; asyncio's 'never retrieved'
    traceback for them goes to the debug log, so the command's error stays one line. Other asyncio
    records (the explorer's server runs on asyncio) still reach the console."""
    p = subprocess.run([sys.executable, "-c", _UNREAD_FUTURE, case],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stderr
    if case == "routed":
        assert p.stderr == ""
    elif case == "raw":  # what a user saw before
        assert "Future exception was never retrieved" in p.stderr
    else:
        assert "Future exception was never retrieved" in p.stderr and "ValueError: a bug" in p.stderr
