"""``psm-map build-shards``: a CSV of 6 recordings + a local GeoTIFF -> train/val/test shards that
the shard reader reads back; a rerun is a no-op; bad rows are named."""
from __future__ import annotations

import csv
import os

import numpy as np
import pytest
import soundfile as sf
from pyproj import Transformer

from psm_mapping.cli import main
from psm_mapping.errors import InputError
from psm_mapping.train.build import BuildConfig, build_shards, read_table
from psm_mapping.train.shards import iter_samples

from servers import write_scene

UTM = "EPSG:32632"
LEFT, TOP, RES, SIZE = 480000.0, 5020000.0, 100.0, 400  # 40 km at 100 m


def _points(n):
    tr = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
    for i in range(n):
        x = LEFT + 12000 + 3000 * i
        y = TOP - 12000 - 2000 * i
        lon, lat = tr.transform(x, y)
        yield lat, lon


def _table(tmp_path, rows=6, override=None):
    override = override or {}
    scene = tmp_path / "scene.tif"
    write_scene(scene, UTM, LEFT, TOP, RES, SIZE, SIZE, seed=1)
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    srcs = ["yfcc", "iNat", "aporee", "freesound", "yfcc", "aporee"]
    lines = []
    for i, (lat, lon) in enumerate(_points(rows)):
        t = np.arange(24000) / 16000
        sf.write(str(audio_dir / f"clip{i}.wav"), (0.2 * np.sin(2 * np.pi * (300 + 100 * i) * t)).astype(np.float32), 16000)
        row = {"audio": f"audio/clip{i}.wav", "latitude": f"{lat:.6f}", "longitude": f"{lon:.6f}",
               "date": f"2021-0{1 + i % 9}-05 1{i}:30", "audio_source": srcs[i % 6], "caption": f"sound number {i}"}
        row.update(override.get(i, {}))
        lines.append(row)
    table = tmp_path / "samples.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(lines[0]))
        w.writeheader()
        w.writerows(lines)
    return table, scene


def test_build_shards_roundtrip_and_resume(tmp_path, capsys):
    table, scene = _table(tmp_path)
    out = tmp_path / "shards"
    args = ["build-shards", str(table), "--imagery", str(scene), "--out", str(out), "--image-px", "64",
            "--shard-size", "3", "--seed", "1", "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "train 4, val 1, test 1" in printed
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == ["test_000.tar", "train_000.tar", "train_001.tar", "val_000.tar"]
    samples = list(iter_samples(str(out / "*.tar"), mel_versions=(1, 2, 3, 4, 5)))
    assert len(samples) == 6 and len({s.key for s in samples}) == 6
    s = samples[0]
    assert s.image.shape == (64, 64, 3) and s.image.std() > 5  # real imagery, not blank
    assert all(tuple(m.shape) == (4, 1001, 64) for m in s.mels.values())
    fs = [x for x in samples if x.source == "freesound"][0]
    assert fs.hour == -1 and fs.month >= 1
    yf = [x for x in samples if x.source == "yfcc"][0]
    assert yf.hour >= 10 and yf.caption.startswith("sound number")
    assert all(x.key.split("-")[0] == x.source for x in samples)

    # rerun: nothing rebuilt
    mtimes = {p: os.stat(p).st_mtime_ns for p in out.glob("*.tar")}
    assert main(args) == 0
    assert "shards written: 0, already complete: 4" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in out.glob("*.tar")} == mtimes
    # resume after a lost shard: only that one is rebuilt, with the same samples
    keys_before = [x.key for x in iter_samples(str(out / "train_001.tar"), mel_versions=())]
    (out / "train_001.tar").unlink()
    rep = build_shards(table, str(scene), out, BuildConfig(image_px=64, shard_size=3, seed=1, progress=False))
    assert [os.path.basename(p) for p in rep.written] == ["train_001.tar"]
    assert [x.key for x in iter_samples(str(out / "train_001.tar"), mel_versions=())] == keys_before
    # other settings into the same folder are refused
    with pytest.raises(InputError, match="other settings"):
        build_shards(table, str(scene), out, BuildConfig(image_px=64, shard_size=3, seed=2, progress=False))


@pytest.mark.parametrize("override,match", [
    ({2: {"latitude": "north"}}, "row 3 .*not numbers"),
    ({1: {"audio_source": "youtube"}}, "row 2 .*audio source 'youtube'"),
    ({4: {"audio": "audio/missing.wav"}}, "row 5 .*not found"),
    ({0: {"longitude": "200"}}, "row 1 .*out of range"),
])
def test_bad_rows(tmp_path, override, match):
    table, scene = _table(tmp_path, override=override)
    with pytest.raises(InputError, match=match):
        build_shards(table, str(scene), tmp_path / "out", BuildConfig(image_px=32, progress=False))
    assert main(["build-shards", str(table), "--imagery", str(scene), "--out", str(tmp_path / "o2"), "--quiet"]) == 2


def test_uncovered_location_names_row(tmp_path):
    from psm_mapping.errors import ImageryError

    table, scene = _table(tmp_path, rows=6, override={3: {"latitude": "10.0", "longitude": "10.0"}})
    assert len(read_table(table)) == 6
    with pytest.raises(ImageryError, match="row 4"):
        build_shards(table, str(scene), tmp_path / "out", BuildConfig(image_px=32, progress=False, split=(1, 0, 0)))
    rep = build_shards(table, str(scene), tmp_path / "out2",
                       BuildConfig(image_px=32, progress=False, split=(1, 0, 0), skip_bad=True))
    assert len(rep.bad_rows) == 1 and "row 4" in rep.bad_rows[0]
    assert len(list(iter_samples(str(tmp_path / "out2" / "*.tar"), mel_versions=()))) == 5
