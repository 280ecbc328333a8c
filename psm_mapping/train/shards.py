"""Webdataset shards in the official PSM format (PSM_SPEC.md section 9), read and written.

A shard is a tar file; a sample is the run of consecutive members sharing a key::

    <key>.meta.json  <key>.image.jpg  <key>.audio_mel1.pyd ... <key>.audio_mel5.pyd

``key = "<source>-<id>"`` (GeoSound) with source in yfcc / iNat / aporee / freesound; SoundingEarth
shards have bare keys and are all aporee (pass ``default_source="aporee"``). ``.pyd`` members are
pickles: they are read only through :mod:`psm_mapping.safe_pickle`. Reading uses :mod:`tarfile`
directly (streaming, nothing extracted to disk).
"""
from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import tarfile
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..constants import AUDIO_SOURCES
from ..errors import InputError, OutputError
from ..safe_pickle import dump_tensor, load_tensor

MEL_VERSIONS = (1, 2, 3, 4, 5)
#: SoundingEarth captions end with a generated location sentence that the reference cuts off
_LOCATION_SENTENCE = "The location of the sound is"


# --------------------------------------------------------------------------- metadata parsing


def parse_date(value: Any) -> tuple[int, int]:
    """``(month, hour)`` from a free-form date string; ``0`` / ``-1`` when unknown.

    Cleaned as the reference does (lower-case; cut after ``am``/``pm`` or before ``gmt``), then
    parsed with dateutil twice with different defaults: a field that follows the default was
    absent from the string and is reported unknown (the reference's single parse would default
    a missing hour to 0 and a missing month to the current month)."""
    if not isinstance(value, str) or not value.strip() or value.strip().lower() in ("nan", "none", "null"):
        return 0, -1
    from dateutil import parser as du

    t = value.lower().strip()
    m = re.search(r"\b(am|pm)\b", t) or re.search(r"\d(am|pm)\b", t)
    if m:
        t = t[: m.end()].strip()
    elif "gmt" in t:
        t = t[: t.find("gmt")].strip()
    try:
        a = du.parse(t, default=datetime(2000, 1, 1, 0, 0))
        b = du.parse(t, default=datetime(2001, 2, 2, 1, 1))
    except (ValueError, OverflowError, TypeError):
        return 0, -1
    month = a.month if a.month == b.month else 0
    hour = a.hour if a.hour == b.hour else -1
    return month, hour


def source_of(key: str, default_source: str | None = None) -> str:
    """Audio source name from the key prefix ``<source>-<id>``."""
    prefix = key.rsplit("/", 1)[-1].split("-", 1)[0]
    if prefix in AUDIO_SOURCES and "-" in key:
        return prefix
    if default_source is not None:
        if default_source not in AUDIO_SOURCES:
            raise InputError(f"default_source={default_source!r} is unknown: use one of {sorted(AUDIO_SOURCES)}")
        return default_source
    raise InputError(
        f"sample key {key!r} does not start with a source ({'/'.join(AUDIO_SOURCES)}): "
        "pass default_source='aporee' for SoundingEarth shards"
    )


def caption_of(meta: dict) -> str:
    """The metadata caption: GeoSound ``text``; SoundingEarth ``caption`` cut before its
    generated location sentence, then ``"."`` appended, exactly as the reference (which gives
    ``"Birds. ."`` for ``"Birds. The location of the sound is X."``)."""
    if isinstance(meta.get("text"), str):
        return meta["text"]
    cap = meta.get("caption")
    if isinstance(cap, str):
        return cap.split(_LOCATION_SENTENCE)[0] + "."
    return ""


@dataclass
class Sample:
    """One shard sample with the fields the model needs already parsed."""

    key: str
    meta: dict
    #: RGB uint8 ``[H, W, 3]`` (None when not decoded)
    image: np.ndarray | None = None
    #: the encoded JPEG as stored (written back as is)
    image_bytes: bytes | None = field(default=None, repr=False)
    #: mel version (1..5) -> float tensor ``[4, 1001, 64]``
    mels: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    source: str = ""
    latitude: float = math.nan
    longitude: float = math.nan
    month: int = 0  # 1..12, 0 unknown
    hour: int = -1  # 0..23, -1 unknown
    caption: str = ""

    @property
    def audio_source(self) -> int:
        """Index of the audio source (yfcc 0, iNat 1, aporee 2, freesound 3)."""
        return AUDIO_SOURCES[self.source]

    @classmethod
    def create(
        cls,
        key: str,
        meta: dict,
        image: np.ndarray | None = None,
        image_bytes: bytes | None = None,
        mels: dict[int, torch.Tensor] | None = None,
        default_source: str | None = None,
    ) -> "Sample":
        """Build a sample and parse its metadata (lat/lon, month, hour, source, caption)."""
        source = source_of(key, default_source)
        try:
            lat, lon = float(meta["latitude"]), float(meta["longitude"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"sample {key}: meta.json needs numeric 'latitude' and 'longitude'") from None
        if not (-90 <= lat <= 90 and -180 <= lon <= 360):
            raise InputError(f"sample {key}: latitude {lat} / longitude {lon} out of range: fix meta.json")
        date = meta.get("date", meta.get("date_recorded"))
        month, hour = parse_date(date)
        if source == "freesound":  # freesound samples never have a valid hour
            hour = -1
        return cls(
            key=key, meta=meta, image=image, image_bytes=image_bytes, mels=dict(mels or {}),
            source=source, latitude=lat, longitude=lon, month=month, hour=hour, caption=caption_of(meta),
        )


# --------------------------------------------------------------------------- shard lists


def _brace_expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in _brace_expand(head + item + tail)]


def expand_shards(pattern_or_paths: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Shard paths from a glob (``test_*.tar``), a brace range (``test_{000..003}.tar``), a
    ``::``-separated list, or a sequence of any of these; order kept, duplicates dropped."""
    if isinstance(pattern_or_paths, (str, os.PathLike)):
        items = [str(p) for p in str(pattern_or_paths).split("::")]
    else:
        items = [str(p) for p in pattern_or_paths]
    out: list[str] = []
    for item in items:
        for pat in _brace_expand(os.path.expanduser(item)):
            if glob.has_magic(pat):
                found = sorted(glob.glob(pat))
                if not found:
                    raise InputError(f"no shard matches {pat!r}: check the path and pattern")
            elif os.path.isfile(pat):
                found = [pat]
            else:
                raise InputError(f"shard {pat!r} does not exist: check the path")
            out.extend(p for p in found if p not in out)
    if not out:
        raise InputError("no shards given: pass a path, a glob or a brace pattern")
    return out


def check_shards(paths: Sequence[str]) -> None:
    """Open each shard's first tar header: unreadable files fail here, not in a loader worker."""
    for path in paths:
        if "://" in str(path):
            continue
        try:
            with tarfile.open(path, mode="r|*") as tar:  # the reader's mode
                tar.next()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise InputError(f"shard {path} is not a readable tar file ({e}): re-create or re-download it") from None


def check_metadata_type(text: str | None, flag: str = "--metadata") -> str:
    """A metadata spec: ``none`` or items of latlong, month, time, asource, tsource joined by ``_``."""
    from ..constants import METADATA_ITEMS

    if text in (None, "", "none"):
        return "none"
    bad = [t for t in str(text).split("_") if t not in METADATA_ITEMS]
    if bad:
        raise InputError(f"{flag} {text!r} names unknown items {bad}: join items of "
                         f"{', '.join(METADATA_ITEMS)} with '_' (e.g. latlong_month_time_asource_tsource), or none")
    return str(text)


# --------------------------------------------------------------------------- reading


def _split_name(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename."""
    d, base = os.path.split(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext


def _iter_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    try:
        with tarfile.open(path, mode="r|*") as tar:
            key, group = None, {}
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key and key is not None and group:
                    yield key, group
                    group = {}
                key = k
                f = tar.extractfile(member)
                group[ext] = f.read() if f is not None else b""
            if key is not None and group:
                yield key, group
    except (tarfile.TarError, OSError, EOFError) as e:
        raise InputError(f"shard {path} is not a readable tar file ({e}): re-create or re-download it") from None


def _decode(
    key: str,
    group: dict[str, bytes],
    mel_versions: Sequence[int],
    decode_image: bool,
    default_source: str | None,
    where: str,
) -> Sample:
    if "meta.json" not in group:
        raise InputError(f"sample {key} in {where} has no meta.json member: the shard is not in PSM format")
    try:
        meta = json.loads(group["meta.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"sample {key} in {where}: meta.json is not valid JSON ({e})") from None
    img_bytes = group.get("image.jpg")
    image = None
    if decode_image:
        if img_bytes is None:
            raise InputError(f"sample {key} in {where} has no image.jpg: pass decode_image=False to skip images")
        from PIL import Image

        try:
            with Image.open(io.BytesIO(img_bytes)) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except Exception as e:
            raise InputError(f"sample {key} in {where}: image.jpg is not a readable image ({e})") from None
    mels = {}
    for v in mel_versions:
        name = f"audio_mel{v}.pyd"
        if name not in group:
            raise InputError(f"sample {key} in {where} has no {name}: choose mel_versions among those present")
        mels[v] = load_tensor(group[name])
    return Sample.create(key, meta, image=image, image_bytes=img_bytes, mels=mels, default_source=default_source)


def iter_samples(
    pattern_or_paths: str | os.PathLike | Iterable[str | os.PathLike],
    mel_versions: Sequence[int] = (1,),
    decode_image: bool = True,
    default_source: str | None = None,
    on_error: str = "raise",
    progress: bool = False,
) -> Iterator[Sample]:
    """Samples of the shards, in order. ``mel_versions``: which of ``audio_mel1..5`` to load
    (``()`` for none); ``on_error``: ``"raise"`` or ``"skip"`` a bad sample (a bad tar always raises)."""
    bad = [v for v in mel_versions if v not in MEL_VERSIONS]
    if bad:
        raise InputError(f"mel_versions {bad} invalid: choose among 1..5")
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error={on_error!r}: use 'raise' or 'skip'")
    paths = expand_shards(pattern_or_paths)
    for path in tqdm(paths, desc="shards", unit="shard", disable=not progress):
        for key, group in _iter_groups(path):
            try:
                yield _decode(key, group, mel_versions, decode_image, default_source, path)
            except InputError:
                if on_error == "raise":
                    raise


# --------------------------------------------------------------------------- writing


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise InputError(f"image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}: convert it first")
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def sample_members(sample: Sample, jpeg_quality: int = 95, legacy_pickle: bool = False) -> list[tuple[str, bytes]]:
    """``(member name, bytes)`` of one sample in the official order."""
    key = sample.key
    if not key or "." in os.path.basename(key) or key.startswith("/") or ".." in key.split("/"):
        raise InputError(f"sample key {key!r} is unusable in a shard: use '<source>-<id>' without dots")
    img = sample.image_bytes
    if img is None:
        if sample.image is None:
            raise InputError(f"sample {key} has no image: give image (uint8 HWC) or image_bytes")
        img = _encode_jpeg(sample.image, jpeg_quality)
    out = [(f"{key}.meta.json", json.dumps(sample.meta, ensure_ascii=False).encode("utf-8")), (f"{key}.image.jpg", img)]
    for v in sorted(sample.mels):
        if v not in MEL_VERSIONS:
            raise InputError(f"sample {key}: mel version {v} invalid, use 1..5")
        out.append((f"{key}.audio_mel{v}.pyd", dump_tensor(sample.mels[v], legacy_pickle=legacy_pickle)))
    return out


class _ShardFile:
    """A tar written under a temporary name and renamed into place on close."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.tar = tarfile.open(self.tmp, mode="w", format=tarfile.PAX_FORMAT)
        self.count = 0

    def add(self, members: list[tuple[str, bytes]]) -> None:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            self.tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def commit(self) -> None:
        self.tar.close()
        with open(self.tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.tar.close()
        self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike,
    prefix: str = "train",
    max_count: int = 10_000,
    start_index: int = 0,
    name_format: str = "{prefix}_{index:03d}.tar",
    overwrite: bool = False,
    jpeg_quality: int = 95,
    legacy_pickle: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``samples`` into shards of at most ``max_count`` samples; return their paths.

    Each shard appears atomically (temporary name, then rename), so an interrupted run leaves
    only complete shards. ``.pyd`` members are ``torch.save`` bytes (:func:`dump_tensor`);
    ``legacy_pickle=True`` writes raw pickles that the authors' ``pickle.loads`` decoder reads."""
    if max_count < 1:
        raise InputError(f"max_count={max_count} must be >= 1")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create shard folder {out}: {e.strerror}; choose a writable --out") from None
    written: list[Path] = []
    index = start_index
    shard: _ShardFile | None = None
    try:
        for sample in tqdm(samples, desc=f"writing {prefix}", unit="sample", disable=not progress):
            if shard is None:
                path = out / name_format.format(prefix=prefix, index=index)
                if path.exists() and not overwrite:
                    raise OutputError(f"shard {path} exists: pass overwrite=True or another start_index")
                shard = _ShardFile(path)
            shard.add(sample_members(sample, jpeg_quality, legacy_pickle))
            if shard.count >= max_count:
                shard.commit()
                written.append(shard.path)
                shard, index = None, index + 1
        if shard is not None:
            shard.commit()
            written.append(shard.path)
            shard = None
    finally:
        if shard is not None:
            shard.abort()
    return written


__all__ = [
    "MEL_VERSIONS", "Sample", "caption_of", "expand_shards", "iter_samples", "parse_date",
    "sample_members", "source_of", "write_shards",
]
