"""Shard reader/writer in the official webdataset format (PSM_SPEC.md section 9)."""
from __future__ import annotations

import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from psm_mapping.errors import InputError, OutputError
from psm_mapping.train.shards import (
    Sample,
    caption_of,
    expand_shards,
    iter_samples,
    parse_date,
    write_shards,
)

MEL = (4, 11, 8)  # small stand-in for [4, 1001, 64]


def make_samples(n: int, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    sources = ["yfcc", "iNat", "aporee", "freesound"]
    out = []
    for i in range(n):
        src = sources[i % 4]
        meta = {
            "sample_id": f"{src}-{1000 + i}",
            "date": f"2013-{1 + i % 12:02d}-15 {i % 24:02d}:32:00",
            "latitude": float(rng.uniform(-80, 80)),
            "longitude": float(rng.uniform(-170, 170)),
            "text": f"sound number {i} ünïcode",
        }
        yy, xx = np.mgrid[0:24, 0:32]
        img = np.stack([yy * 10, xx * 8, (yy + xx + 20 * i) % 256], -1).astype(np.uint8)
        mels = {v: torch.from_numpy(rng.standard_normal(MEL).astype(np.float32)) for v in range(1, 6)}
        out.append(Sample.create(f"{src}-{1000 + i}", meta, image=img, mels=mels))
    return out


def test_write_read_roundtrip(tmp_path):
    samples = make_samples(7)
    paths = write_shards(samples, tmp_path, prefix="test", max_count=3)
    assert [p.name for p in paths] == ["test_000.tar", "test_001.tar", "test_002.tar"]
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]
    back = list(iter_samples(str(tmp_path / "test_{000..002}.tar"), mel_versions=(1, 2, 3, 4, 5)))
    assert [s.key for s in back] == [s.key for s in samples]
    for a, b in zip(samples, back):
        assert b.meta == a.meta and b.caption == a.caption
        assert (b.latitude, b.longitude, b.month, b.hour, b.source) == (a.latitude, a.longitude, a.month, a.hour, a.source)
        assert set(b.mels) == {1, 2, 3, 4, 5}
        for v in range(1, 6):
            assert b.mels[v].dtype == torch.float32 and torch.equal(b.mels[v], a.mels[v])
        assert b.image.dtype == np.uint8 and b.image.shape == (24, 32, 3)
        # JPEG is lossy: close, and the stored bytes decode to what the reader returns
        assert np.abs(b.image.astype(int) - a.image.astype(int)).mean() < 4
    # writing the read samples again keeps the JPEG bytes and every member identical
    again = write_shards(back, tmp_path / "again", prefix="test", max_count=3)
    for p, q in zip(paths, again):
        assert p.read_bytes() == q.read_bytes()
    # glob pattern, mel selection, no image decoding
    s1 = list(iter_samples(str(tmp_path / "test_*.tar"), mel_versions=(2,), decode_image=False))
    assert len(s1) == 7 and set(s1[0].mels) == {2} and s1[0].image is None


def test_parsed_fields():
    s = make_samples(8)
    assert [x.source for x in s[:4]] == ["yfcc", "iNat", "aporee", "freesound"]
    assert [x.audio_source for x in s[:4]] == [0, 1, 2, 3]
    assert [x.month for x in s] == list(range(1, 9))
    assert [x.hour for x in s] == [0, 1, 2, -1, 4, 5, 6, -1]  # freesound: never a valid hour
    assert s[0].caption == "sound number 0 ünïcode"


@pytest.mark.parametrize(
    "value,expected",
    [
        ("2013-06-15 14:32:00", (6, 14)),
        ("2013-06-15T00:05:00", (6, 0)),
        ("2013-06-15", (6, -1)),
        ("2013-06", (6, -1)),
        ("2013", (0, -1)),
        ("June 2013", (6, -1)),
        ("Sat Jun 15 2:30 PM 2013", (6, 14)),
        ("2013-06-15 14:32:00 GMT+0200", (6, 14)),
        ("12/25/2010 11:05am", (12, 11)),
        ("", (0, -1)),
        ("nan", (0, -1)),
        (None, (0, -1)),
        (float("nan"), (0, -1)),
        ("not a date at all", (0, -1)),
    ],
)
def test_parse_date(value, expected):
    assert parse_date(value) == expected


def test_caption_soundingearth_and_default_source():
    meta = {"caption": "Birds and wind. The location of the sound is Berlin.", "latitude": 1, "longitude": 2,
            "date_recorded": "2015-04-01 08:00:00"}
    assert caption_of(meta) == "Birds and wind. ."  # the reference's split + "."
    with pytest.raises(InputError, match="default_source"):
        Sample.create("12345", meta)
    s = Sample.create("12345", meta, default_source="aporee")
    assert (s.source, s.month, s.hour, s.caption) == ("aporee", 4, 8, "Birds and wind. .")


def _official_shard(path, samples, zip_for: set[str]):
    """A shard built as the authors did: meta via json, Pillow JPEG, .pyd via pickle.dumps
    (or torch.save for the keys in ``zip_for``), members in their order."""
    with tarfile.open(path, "w") as tar:
        for key, meta, img, mels in samples:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=90)
            members = [("meta.json", json.dumps(meta).encode()), ("image.jpg", buf.getvalue())]
            for v, t in enumerate(mels, 1):
                if key in zip_for:
                    b = io.BytesIO()
                    torch.save(t, b)
                    data = b.getvalue()
                else:
                    data = pickle.dumps(t)
                members.append((f"audio_mel{v}.pyd", data))
            for name, data in members:
                info = tarfile.TarInfo(f"{key}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_read_official_shard(tmp_path):
    rng = np.random.default_rng(3)
    raw = []
    for i, key in enumerate(["yfcc-8812", "freesound-17", "iNat-5"]):
        meta = {"sample_id": key, "date": "2019-07-04 21:10:00", "latitude": 10.5 + i, "longitude": -3.25, "text": "x"}
        img = np.full((16, 16, 3), 40 * i, dtype=np.uint8)
        mels = [torch.from_numpy(rng.standard_normal(MEL).astype(np.float32)) for _ in range(5)]
        raw.append((key, meta, img, mels))
    _official_shard(tmp_path / "test_0.tar", raw, zip_for={"iNat-5"})
    got = list(iter_samples([tmp_path / "test_0.tar"], mel_versions=(1, 5)))
    assert [g.key for g in got] == ["yfcc-8812", "freesound-17", "iNat-5"]
    for g, (key, meta, img, mels) in zip(got, raw):
        assert g.meta == meta and torch.equal(g.mels[1], mels[0]) and torch.equal(g.mels[5], mels[4])
        assert np.abs(g.image.astype(int) - img.astype(int)).max() <= 2  # flat colour survives JPEG
    assert [(g.month, g.hour) for g in got] == [(7, 21), (7, -1), (7, 21)]


def test_malicious_pyd_in_shard_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("meta.json", b'{"latitude": 1, "longitude": 2}'), ("audio_mel1.pyd", pickle.dumps(Evil()))]:
            info = tarfile.TarInfo(f"yfcc-1.{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(InputError, match="system"):
        list(iter_samples(path, decode_image=False))
    assert not marker.exists()
    assert list(iter_samples(path, decode_image=False, on_error="skip")) == []


def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    samples = make_samples(3)
    write_shards(samples, tmp_path, prefix="val", max_count=10, legacy_pickle=True)
    ds = wds.WebDataset(str(tmp_path / "val_000.tar"), shardshuffle=False).decode("rgb8")
    rows = list(ds)
    assert [r["__key__"] for r in rows] == [s.key for s in samples]
    assert torch.equal(rows[0]["audio_mel3.pyd"], samples[0].mels[3])
    assert rows[0]["meta.json"] == samples[0].meta
    assert rows[0]["image.jpg"].shape == (24, 32, 3)


def test_expand_and_errors(tmp_path):
    for name in ["a_000.tar", "a_001.tar", "a_002.tar", "b.tar"]:
        write_shards(make_samples(1), tmp_path, prefix=name[:-4], name_format="{prefix}.tar")
    d = str(tmp_path)
    assert expand_shards(f"{d}/a_{{000..001}}.tar") == [f"{d}/a_000.tar", f"{d}/a_001.tar"]
    assert expand_shards(f"{d}/{{a_002,b}}.tar") == [f"{d}/a_002.tar", f"{d}/b.tar"]
    assert expand_shards(f"{d}/a_*.tar::{d}/b.tar")[-1] == f"{d}/b.tar"
    with pytest.raises(InputError, match="no shard matches"):
        expand_shards(f"{d}/zz_*.tar")
    with pytest.raises(InputError, match="does not exist"):
        expand_shards(f"{d}/a_{{000..005}}.tar")
    with pytest.raises(OutputError, match="exists"):
        write_shards(make_samples(1), tmp_path, prefix="b", name_format="{prefix}.tar")
    with pytest.raises(InputError, match="mel_versions"):
        list(iter_samples(f"{d}/b.tar", mel_versions=(6,)))
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(InputError, match="not a readable tar"):
        list(iter_samples(f"{d}/junk.tar"))


def test_interrupted_write_leaves_no_partial_shard(tmp_path):
    def gen():
        yield from make_samples(4)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shards(gen(), tmp_path, prefix="train", max_count=3)
    assert sorted(os.listdir(tmp_path)) == ["train_000.tar"]
    assert len(list(iter_samples(str(tmp_path / "train_000.tar"), mel_versions=()))) == 3
