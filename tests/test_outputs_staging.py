"""Staging (issue 10/11): stale staged files of a killed run are removed by the next run of the
same output; a full disk or an unwritable target is one OutputError line with nothing at the
final names. The STAC Item beside every output. ``import psm_mapping.cli`` stays light."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import rasterio

from psm_mapping import outputs
from psm_mapping.errors import OutputError
from psm_mapping.outputs import staging

from test_writers import listing, make_result

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_staged_files_of_a_killed_run_are_removed(tmp_path):
    dead = _dead_pid()
    stale_file = tmp_path / f".map.tif.tmp-{dead}-{uuid.uuid4().hex[:8]}"
    stale_file.write_bytes(b"half a COG")
    stale_dir = tmp_path / f".map.tif.preview.tmp-{dead}-{uuid.uuid4().hex[:8]}"
    stale_dir.mkdir()
    (stale_dir / "a.png").write_bytes(b"x")
    # a live writer's staged file (this process's parent: alive) is left alone while young
    live = tmp_path / f".map.tif.tmp-{os.getppid()}-{uuid.uuid4().hex[:8]}"
    live.write_bytes(b"being written")
    # ... but not when older than STALE_HOURS (a reused pid)
    old_live = tmp_path / f".map.tif.stac.json.tmp-{os.getppid()}-{uuid.uuid4().hex[:8]}"
    old_live.write_text("{}")
    t = time.time() - (staging.STALE_HOURS + 1) * 3600
    os.utime(old_live, (t, t))
    other = tmp_path / f".other.tif.tmp-{dead}-{uuid.uuid4().hex[:8]}"  # another output's: kept
    other.write_bytes(b"x")
    outputs.write_outputs(make_result(), tmp_path / "map.tif")
    left = listing(tmp_path)
    assert stale_file.name not in left and stale_dir.name not in left and old_live.name not in left
    assert live.name in left and other.name in left
    assert {"map.tif", "map.tif.preview", "map.tif.stac.json"} <= set(left)


def test_a_swap_killed_half_way_gets_the_old_output_back(tmp_path):
    dead = _dead_pid()
    old = tmp_path / f".map.zarr.old-{dead}-{uuid.uuid4().hex[:8]}"
    outputs.write_zarr(make_result(), old)  # the previous output, moved aside; then the run died
    staging.clean_stale(tmp_path / "map.zarr")
    assert listing(tmp_path) == ["map.zarr"]


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root and CAP_SYS_ADMIN")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fmt", ["cog", "zarr"])
def test_full_disk_is_one_line_and_leaves_nothing(tiny_disk, fmt):
    rng = np.random.default_rng(0)
    res = make_result(400, 400)  # ~4 MB of incompressible float32 bands: more than the 1 MB disk
    for b in res.bands:
        b.data = rng.normal(size=b.data.shape).astype(np.float32)
    out = tiny_disk / ("map.tif" if fmt == "cog" else "map.zarr")
    with pytest.raises(OutputError) as e:
        outputs.write_outputs(res, out, fmt=fmt)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(out) in msg and "free space" in msg
    assert os.listdir(tiny_disk) == []  # nothing half-written, no staged files


def test_full_disk_through_the_cli(tiny_disk, capsys):
    """The library's OutputError is the CLI's one line, exit 2."""
    from psm_mapping.cli.base import error_line

    rng = np.random.default_rng(1)
    res = make_result(400, 400)
    for b in res.bands:
        b.data = rng.normal(size=b.data.shape).astype(np.float32)
    with pytest.raises(OutputError) as e:
        outputs.write_cog(res, tiny_disk / "m.tif")
    line = error_line(e.value)
    assert line.startswith("psm-map: error: cannot write") and "--out" in line
    assert os.listdir(tiny_disk) == []


def test_out_under_proc_is_one_line(tmp_path, capsys, tiny_ckpt, tokenizer_dir):
    with pytest.raises(OutputError) as e:
        outputs.write_outputs(make_result(), "/proc/x.tif")
    assert "/proc" in str(e.value) and "\n" not in str(e.value)
    from psm_mapping.cli import main
    from test_map_e2e import base_args, make_inputs

    inp = make_inputs(tmp_path / "inputs", tiny_ckpt, tokenizer_dir)
    assert main(base_args(inp, Path("/proc/x.tif"), "--query", "birds")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psm-map: error:") and "/proc" in err[0] and "--out" in err[0]
    assert not os.path.exists("/proc/x.tif")


# ------------------------------------------------------------------------------- STAC
@pytest.mark.parametrize("fmt", ["cog", "zarr"])
def test_stac_item_beside_the_output(tmp_path, fmt):
    import pystac
    from pyproj import Transformer

    res = make_result()
    out = tmp_path / ("birds.tif" if fmt == "cog" else "birds.zarr")
    got = outputs.write_outputs(res, out, fmt=fmt, previews=False)
    path = got["stac"]
    assert path == tmp_path / f"{out.name}.stac.json" == outputs.stac_path(out)
    item = pystac.Item.from_file(str(path))
    item.validate() if _has_jsonschema() else None
    asset = item.assets["data"]
    assert Path(asset.get_absolute_href()) == out and asset.href == f"./{out.name}"
    assert asset.media_type == (pystac.MediaType.COG if fmt == "cog" else "application/vnd+zarr")
    # the valid area (the disc), in lon/lat
    tr = Transformer.from_crs(32633, 4326, always_xy=True)
    w, s, e, n = item.bbox
    valid = np.isfinite(res.bands[0].data)
    rows, cols = np.nonzero(valid)
    x0, y0 = res.transform @ (cols.min(), rows.max() + 1)
    x1, y1 = res.transform @ (cols.max() + 1, rows.min())
    (lw, le), (ls, ln) = tr.transform([x0, x1], [y0, y1])
    assert w == pytest.approx(lw, abs=2e-4) and e == pytest.approx(le, abs=2e-4)
    assert s == pytest.approx(ls, abs=2e-4) and n == pytest.approx(ln, abs=2e-4)
    assert item.geometry["type"] in ("Polygon", "MultiPolygon")
    # proj and raster extensions
    d = item.to_dict()
    assert d["properties"]["proj:code"] == "EPSG:32633" or d["properties"].get("proj:epsg") == 32633
    assert d["properties"]["proj:shape"] == [37, 53]
    assert d["properties"]["proj:transform"][:6] == list(res.transform)[:6]
    bands = d["assets"]["data"]["raster:bands"]
    assert len(bands) == len(res.bands)
    for rb, b in zip(bands, res.bands):
        f = b.data[np.isfinite(b.data)].astype(np.float64)
        assert rb["data_type"] == "float32" and rb["nodata"] == "nan" and rb["name"] == b.name
        st = rb["statistics"]
        assert st["minimum"] == pytest.approx(f.min()) and st["maximum"] == pytest.approx(f.max())
        assert st["mean"] == pytest.approx(f.mean()) and st["valid_percent"] == pytest.approx(100 * f.size / b.data.size)
    # provenance
    p = item.properties
    assert p["psm:checkpoint_sha256"] == "ab" * 32 and p["psm:zoom_levels"] == [1]
    assert p["psm:imagery_license"] == "CC0" and p["psm:imagery_attribution"] == "Test imagery (c) nobody"
    assert set(p["psm:queries"]) == {"birds chirping", "rain & <wind>"}
    assert item.common_metadata.created is not None
    if fmt == "cog":
        with rasterio.open(out) as src:
            assert src.tags()["created"].startswith(str(item.datetime.date()))


def _has_jsonschema() -> bool:
    try:
        import jsonschema  # noqa: F401
    except ImportError:
        return False
    return False  # schema validation fetches the schemas over the network: not here


def test_stac_item_is_replaced_with_its_output(tmp_path):
    res = make_result()
    out = tmp_path / "m.tif"
    outputs.write_outputs(res, out, previews=False)
    first = json.loads(outputs.stac_path(out).read_text())
    with pytest.raises(OutputError, match="exists"):
        outputs.write_outputs(res, out, previews=False)
    res.bands[0].data[18, 26] = 99.0
    outputs.write_outputs(res, out, previews=False, overwrite=True)
    second = json.loads(outputs.stac_path(out).read_text())
    assert second["assets"]["data"]["raster:bands"][0]["statistics"]["maximum"] == 99.0
    assert first["assets"]["data"]["raster:bands"][0]["statistics"]["maximum"] != 99.0
    assert listing(tmp_path) == ["m.qml", "m.tif", "m.tif.stac.json"]  # with QGIS's style (test_qgis.py)


# ------------------------------------------------------------------------------- light CLI
def test_importing_the_cli_imports_no_torch_nor_training_stack():
    code = ("import sys, time; t = time.perf_counter(); import psm_mapping.cli; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'lightning', 'pytorch_lightning', 'transformers', 'webdataset') "
            "if m in sys.modules]; print(dt, heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    dt, heavy = r.stdout.split(" ", 1)
    assert heavy.strip() == "[]", heavy
    assert float(dt) < 2.0
