"""Build training shards in the official format from a table of samples (``psm-map build-shards``).

Table (CSV, one row per recording; column names case-insensitive, aliases in brackets):

* ``audio`` [audio_path, path, file]: audio file (relative paths are relative to the table);
* ``latitude`` [lat], ``longitude`` [lon, lng]: degrees;
* ``date`` [datetime, date_recorded] (optional): free text, e.g. ``2021-05-03 14:20``;
* ``audio_source`` [source]: yfcc, iNat, aporee or freesound (or ``default_source``);
* ``caption`` [text] (optional), ``caption_source`` (optional: meta, qwen, pengi);
* ``sample_id`` [id, key] (optional: default the audio file name), ``split`` (optional: train,
  val or test, overrides the computed split).

Per sample: the image is a ``NATIVE_IMAGE_PX[sat_type]`` px window (1280 px sentinel, 1500 px
bingmap, i.e. 12.8 km / 0.9 km at the training GSD) centred on the location, read from any
imagery source in the local UTM zone; ``image_px`` shrinks the pixel count, not the footprint
(the data pipeline scales its zoom crops the same way). Audio: five CLAP fusion feature draws
(seeds 1..5). Key ``<source>-<id>``.

Split: rows without a ``split`` are ordered by ``sha256(seed:key)``; the first
``round(val * N)`` go to val, the next ``round(test * N)`` to test, the rest to train. Shard
``k`` of a split holds samples ``[k * shard_size, (k + 1) * shard_size)`` of that order, so a
rerun skips every shard already written (shards appear atomically) and only builds the rest.
``build.json`` records the settings and the table's hash; a rerun with other settings is refused.
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..constants import AUDIO_SOURCES, CAPTION_SOURCES, GSD, SAT_TYPES
from ..errors import ImageryError, InputError, OutputError, PSMError
from .data import NATIVE_IMAGE_PX
from .shards import Sample, write_shards

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
N_MEL_DRAWS = 5
_ALIASES = {
    "audio": ("audio", "audio_path", "path", "file"),
    "latitude": ("latitude", "lat"),
    "longitude": ("longitude", "lon", "lng"),
    "date": ("date", "datetime", "date_recorded"),
    "audio_source": ("audio_source", "source"),
    "caption": ("caption", "text"),
    "caption_source": ("caption_source",),
    "sample_id": ("sample_id", "id", "key"),
    "split": ("split",),
}


@dataclass
class SampleRow:
    """One validated table row."""

    row: int  # 1-based data row (the header is line 1, so this row is on line row + 1)
    key: str
    audio: Path
    latitude: float
    longitude: float
    date: str | None
    audio_source: str
    caption: str
    caption_source: str
    split: str | None = None

    def where(self) -> str:
        return f"row {self.row} ({self.key})"


@dataclass
class BuildConfig:
    sat_type: str = "sentinel"
    image_px: int | None = None  # default NATIVE_IMAGE_PX[sat_type]
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    shard_size: int = 1000
    min_valid: float = 0.9
    jpeg_quality: int = 95
    default_source: str | None = None
    skip_bad: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.sat_type not in SAT_TYPES:
            raise InputError(f"unknown --sat-type {self.sat_type!r}: use one of {', '.join(SAT_TYPES)}")
        fr = tuple(float(f) for f in self.split)
        if len(fr) != 3 or any(f < 0 or not math.isfinite(f) for f in fr) or not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
            raise InputError(f"--split {self.split} invalid: give three fractions train,val,test summing to 1, e.g. 0.8,0.1,0.1")
        self.split = fr
        if self.shard_size < 1:
            raise InputError("--shard-size must be >= 1")
        if self.image_px is not None and self.image_px < 16:
            raise InputError(f"--image-px {self.image_px} too small: use at least 16 (default {NATIVE_IMAGE_PX[self.sat_type]})")
        if not 0 <= self.min_valid <= 1:
            raise InputError("--min-valid must be in 0..1")

    @property
    def px(self) -> int:
        return int(self.image_px or NATIVE_IMAGE_PX[self.sat_type])

    @property
    def footprint_m(self) -> float:
        return NATIVE_IMAGE_PX[self.sat_type] * GSD[self.sat_type]


@dataclass
class BuildReport:
    out_dir: str
    counts: dict[str, int] = field(default_factory=dict)
    written: list[str] = field(default_factory=list)
    skipped_shards: list[str] = field(default_factory=list)
    bad_rows: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- table
def _clean_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text.strip()).strip("_") or "x"


def read_table(path: str | os.PathLike, default_source: str | None = None) -> list[SampleRow]:
    """Read and validate the sample table; any bad row raises :class:`InputError` naming it."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"sample table {p} not found: pass a CSV with columns audio, latitude, longitude, "
                         "date, audio_source, caption")
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            raw_rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read the sample table {p} ({e}): give a UTF-8 CSV file") from None
    cols: dict[str, str] = {}
    for name, aliases in _ALIASES.items():
        for a in aliases:
            if a in header:
                cols[name] = (reader.fieldnames or [])[header.index(a)]
                break
    for req in ("audio", "latitude", "longitude"):
        if req not in cols:
            raise InputError(f"sample table {p.name} has no {req!r} column (aliases: {', '.join(_ALIASES[req])}): add it")
    if "audio_source" not in cols and default_source is None:
        raise InputError(f"sample table {p.name} has no audio_source column: add one (yfcc, iNat, aporee, "
                         "freesound) or pass --audio-source")
    if not raw_rows:
        raise InputError(f"sample table {p.name} has no rows")
    rows: list[SampleRow] = []
    seen: dict[str, int] = {}
    for i, raw in enumerate(raw_rows, start=1):
        def get(name: str) -> str:
            return (raw.get(cols[name]) or "").strip() if name in cols else ""

        where = f"{p.name} row {i} (line {i + 1})"
        audio_s = get("audio")
        if not audio_s:
            raise InputError(f"{where}: no audio file given: fill the audio column")
        audio = Path(audio_s)
        if not audio.is_absolute():
            audio = p.parent / audio
        if not audio.is_file():
            raise InputError(f"{where}: audio file {audio} not found: fix the path (relative paths are relative to the table)")
        try:
            lat, lon = float(get("latitude")), float(get("longitude"))
        except ValueError:
            raise InputError(f"{where}: latitude {get('latitude')!r} / longitude {get('longitude')!r} are not "
                             "numbers: give decimal degrees") from None
        if not (math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180):
            raise InputError(f"{where}: latitude {lat} / longitude {lon} out of range: use degrees, "
                             "latitude -90..90, longitude -180..180")
        src = get("audio_source") or (default_source or "")
        lower = {k.lower(): k for k in AUDIO_SOURCES}
        if src.lower() not in lower:
            raise InputError(f"{where}: audio source {src!r} unknown: use one of {', '.join(AUDIO_SOURCES)}")
        src = lower[src.lower()]
        csrc = get("caption_source") or "meta"
        if csrc not in CAPTION_SOURCES:
            raise InputError(f"{where}: caption_source {csrc!r} unknown: use one of {', '.join(CAPTION_SOURCES)}")
        split = get("split").lower() or None
        if split is not None and split not in SPLITS:
            raise InputError(f"{where}: split {split!r} unknown: use train, val or test (or leave it empty)")
        ident = _clean_id(get("sample_id") or audio.stem)
        key = ident if ident.startswith(f"{src}-") else f"{src}-{ident}"
        if key in seen:
            raise InputError(f"{where}: sample key {key} repeats row {seen[key]}: give a unique sample_id")
        seen[key] = i
        date = get("date") or None
        rows.append(SampleRow(i, key, audio, lat, lon, date, src, get("caption"), csrc, split))
    return rows


def assign_splits(rows: Sequence[SampleRow], fractions: tuple[float, float, float], seed: int
                  ) -> dict[str, list[SampleRow]]:
    """Deterministic split (see the module docstring); each split in its shard order."""
    def h(r: SampleRow) -> str:
        return hashlib.sha256(f"{seed}:{r.key}".encode()).hexdigest()

    out: dict[str, list[SampleRow]] = {s: [] for s in SPLITS}
    free = sorted((r for r in rows if r.split is None), key=h)
    n = len(free)
    n_val, n_test = int(round(fractions[1] * n)), int(round(fractions[2] * n))
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    for r in free[:n_val]:
        out["val"].append(r)
    for r in free[n_val:n_val + n_test]:
        out["test"].append(r)
    out["train"] += free[n_val + n_test:]
    for r in rows:
        if r.split is not None:
            out[r.split].append(r)
    for s in SPLITS:
        out[s].sort(key=h)
    return out


# --------------------------------------------------------------------------- per sample
def utm_crs(lat: float, lon: float):
    """The WGS 84 / UTM zone CRS of a point."""
    from pyproj import CRS

    zone = min(60, int(math.floor((lon + 180) / 6)) + 1)
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def cut_image(source, lat: float, lon: float, cfg: BuildConfig) -> tuple[np.ndarray, float]:
    """uint8 ``[px, px, 3]`` window centred on the point (footprint of the official images) and its
    valid fraction."""
    from pyproj import Transformer

    crs = utm_crs(lat, lon)
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    half = cfg.footprint_m / 2
    win = source.read((x - half, y - half, x + half, y + half), crs, (cfg.px, cfg.px))
    data = np.asarray(win.data)
    if data.shape != (3, cfg.px, cfg.px):
        raise ImageryError(f"imagery source returned {list(data.shape)} for a {cfg.px} px window: it is broken")
    img = np.where(np.asarray(win.mask)[None], data, 0).astype(np.uint8)
    return np.ascontiguousarray(img.transpose(1, 2, 0)), win.valid_fraction


def mel_draws(path: Path, n: int = N_MEL_DRAWS) -> dict[int, torch.Tensor]:
    """The ``n`` CLAP fusion feature draws (seeds 1..n) ``[4, 1001, 64]`` of an audio file."""
    from ..model.audio import MAX_TRAINING_AUDIO_SECONDS
    from ..model.clap import audio_features, load_audio

    wave = load_audio(path, max_seconds=MAX_TRAINING_AUDIO_SECONDS)
    return {s: audio_features([wave], seed=s)["input_features"][0].contiguous() for s in range(1, n + 1)}


def make_sample(row: SampleRow, source, cfg: BuildConfig, imagery_name: str) -> Sample:
    try:
        image, valid = cut_image(source, row.latitude, row.longitude, cfg)
    except PSMError as e:
        raise type(e)(f"{row.where()}: {e}") from None
    if valid < cfg.min_valid:
        raise ImageryError(f"{row.where()}: the imagery covers {valid:.0%} of the {cfg.footprint_m / 1000:g} km window "
                           f"at ({row.latitude:.5f}, {row.longitude:.5f}): use a source that covers it, lower "
                           "--min-valid, or drop the row")
    try:
        mels = mel_draws(row.audio)
    except PSMError as e:
        raise type(e)(f"{row.where()}: {e}") from None
    meta = {"sample_id": row.key, "date": row.date, "latitude": row.latitude, "longitude": row.longitude,
            "text": row.caption, "caption_source": row.caption_source, "audio_file": row.audio.name,
            "imagery": imagery_name, "sat_type": cfg.sat_type, "image_px": cfg.px,
            "image_footprint_m": cfg.footprint_m, "image_valid_fraction": round(float(valid), 4)}
    return Sample.create(row.key, meta, image=image, mels=mels)


# --------------------------------------------------------------------------- driver
def _table_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_manifest(out: Path, settings: dict) -> None:
    mf = out / "build.json"
    if mf.is_file():
        try:
            old = json.loads(mf.read_text())
        except (OSError, ValueError):
            raise OutputError(f"{mf} is corrupt: delete it (and the shards) or choose another --out") from None
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            raise InputError(f"{out} was built with other settings ({', '.join(diff)} differ): use the same table "
                             "and options to resume, or another --out")
    else:
        tmp = mf.with_name(f".build.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(settings, indent=2))
        os.replace(tmp, mf)


def build_shards(table: str | os.PathLike, imagery, out_dir: str | os.PathLike, cfg: BuildConfig | None = None,
                 **source_options) -> BuildReport:
    """Build ``{train,val,test}_NNN.tar`` in ``out_dir`` (resumable). ``imagery``: an
    :class:`ImagerySource` or a spec for :func:`open_source`. A run that fails before its first
    shard leaves no new ``out_dir`` behind."""
    import shutil

    out = Path(out_dir)
    fresh = not out.exists()
    try:
        return _build_shards(table, imagery, out, cfg, **source_options)
    except BaseException:
        if fresh and out.is_dir() and not any(out.glob("*.tar")):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _build_shards(table, imagery, out_dir: Path, cfg: BuildConfig | None, **source_options) -> BuildReport:
    from ..imagery import ImagerySource, open_source

    cfg = cfg or BuildConfig()
    table = Path(table)
    rows = read_table(table, cfg.default_source)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror}; choose a writable --out") from None
    spec = imagery if isinstance(imagery, str) else getattr(getattr(imagery, "info", None), "name", "custom")
    settings = {"format": "psm-shards/1", "table_sha256": _table_hash(table), "imagery": str(spec),
                "sat_type": cfg.sat_type, "image_px": cfg.px, "split": list(cfg.split), "seed": cfg.seed,
                "shard_size": cfg.shard_size, "min_valid": cfg.min_valid, "mel_draws": N_MEL_DRAWS}
    _check_manifest(out, settings)
    for stale in out.glob(".*.tar.tmp-*"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    splits = assign_splits(rows, cfg.split, cfg.seed)
    report = BuildReport(str(out), counts={s: len(v) for s, v in splits.items()})
    todo: list[tuple[str, int, list[SampleRow]]] = []
    for s in SPLITS:
        items = splits[s]
        for k in range(0, len(items), cfg.shard_size):
            idx = k // cfg.shard_size
            path = out / f"{s}_{idx:03d}.tar"
            if path.exists():
                report.skipped_shards.append(str(path))
            else:
                todo.append((s, idx, items[k:k + cfg.shard_size]))
    if not todo:
        return report
    own = not isinstance(imagery, ImagerySource)
    source = open_source(imagery, **source_options) if own else imagery
    name = source.info.name if getattr(source, "info", None) else str(spec)
    total = sum(len(c) for _, _, c in todo)
    try:
        with tqdm(total=total, desc="building shards", unit="sample", disable=not cfg.progress) as bar:
            for split, idx, chunk in todo:
                def gen() -> Iterator[Sample]:
                    for row in chunk:
                        try:
                            yield make_sample(row, source, cfg, name)
                        except PSMError as e:
                            if not cfg.skip_bad:
                                raise
                            log.warning("skipping %s", e)
                            report.bad_rows.append(str(e))
                        finally:
                            bar.update(1)

                written = write_shards(gen(), out, prefix=split, max_count=cfg.shard_size, start_index=idx,
                                       jpeg_quality=cfg.jpeg_quality)
                report.written += [str(p) for p in written]
    finally:
        if own:
            source.close()
    return report


__all__ = ["BuildConfig", "BuildReport", "SampleRow", "read_table", "assign_splits", "cut_image", "mel_draws",
           "make_sample", "build_shards", "utm_crs", "SPLITS"]
