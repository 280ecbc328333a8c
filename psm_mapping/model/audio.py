"""Audio decoding with a bounded cost: the one loader every query, upload and shard uses.

A compressed file says nothing about what it decodes to: a 0.14 MB FLAC can hold 15 minutes.
So the header is read first (libsndfile's frames and sample rate) and a clip longer than
``max_seconds`` is refused before any sample is decoded; then at most ``max_seconds`` are
decoded (in blocks, mixed to mono as they come, so a header that lies costs no more).

Memory of one clip, at most: ``max_seconds * samplerate * 4`` bytes of mono float32 (twice
that while the blocks are joined) plus one block (:data:`BLOCK_BYTES`), plus the 48 kHz copy.
With the default :data:`MAX_AUDIO_SECONDS` (60 s) and the largest accepted rate
(:data:`MAX_SAMPLE_RATE`, 384 kHz) that is under 200 MB; for CD-rate audio under 25 MB. Decoding
and CLAP's features of a clip near the limit peak at about 140 MB (55 s at 48 kHz) to 170 MB
(59 s at 384 kHz) above the process's resting RSS.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import AudioError, AudioTooLongError

#: the longest clip a query takes (CLI ``--audio``, explorer uploads; ``psm-map serve
#: --max-audio-seconds`` changes the explorer's): CLAP sees a clip through 10 s windows (its
#: "fusion" features: three 10 s chunks and the whole clip squeezed to 10 s); past a minute the
#: chunks see under half of the clip and the squeezed view loses 6 of every 7 frames
MAX_AUDIO_SECONDS = 60.0
#: the longest clip a training shard takes (``psm-map build-shards``: the user's own recordings)
MAX_TRAINING_AUDIO_SECONDS = 1800.0
#: the highest sample rate accepted (above: not audio CLAP can use)
MAX_SAMPLE_RATE = 384_000
#: bytes of float32 samples decoded per block (all channels)
BLOCK_BYTES = 4 << 20
#: libsndfile's "length unknown"
_UNKNOWN_FRAMES = (1 << 62)


@dataclass(frozen=True)
class AudioInfo:
    """What a clip's header says."""

    frames: int | None  # None: the header does not say
    samplerate: int
    channels: int
    format: str

    @property
    def seconds(self) -> float | None:
        return None if self.frames is None else self.frames / self.samplerate


class _QuietNativeStderr:
    """Hold what native code writes to fd 2; replay it only if the block succeeds."""

    def __enter__(self):
        import sys
        import tempfile

        try:
            sys.stderr.flush()
            self._saved = os.dup(2)
        except (OSError, ValueError):  # no real fd 2 (embedded interpreters): do nothing
            self._saved = None
            return self
        self._tmp = tempfile.TemporaryFile()
        os.dup2(self._tmp.fileno(), 2)
        return self

    def __exit__(self, exc_type, exc, tb):
        if self._saved is None:
            return False
        os.dup2(self._saved, 2)
        os.close(self._saved)
        if exc_type is None:
            self._tmp.seek(0)
            held = self._tmp.read()
            if held:
                os.write(2, held)
        self._tmp.close()
        return False


def _source(source, name: str | None):
    """``(what soundfile opens, the clip's name for messages)``: a path, or bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), name or "clip"
    p = Path(source)
    if not p.is_file():
        raise AudioError(f"audio file {p} not found: check the path")
    return str(p), name or p.name


def _undecodable(name: str, exc: Exception) -> AudioError:
    detail = str(exc).rsplit(": ", 1)[-1].strip().rstrip(".") or type(exc).__name__
    if "does not exist" in detail or "unknown format" in detail.lower():  # libsndfile's words
        detail = "corrupt or unsupported data"
    return AudioError(f"cannot decode audio {name} ({detail}): convert it to wav, flac, ogg or mp3")


def _info_of(f, name: str) -> AudioInfo:
    frames = int(f.frames)
    info = AudioInfo(None if frames <= 0 or frames >= _UNKNOWN_FRAMES else frames,
                     int(f.samplerate), int(f.channels), str(f.format))
    if not 0 < info.samplerate <= MAX_SAMPLE_RATE:
        raise AudioError(f"audio {name} says its sample rate is {info.samplerate} Hz, outside 1..{MAX_SAMPLE_RATE}: "
                         "resample it to 48 kHz")
    if info.channels < 1:
        raise AudioError(f"audio {name} has no channels: give a clip with sound")
    return info


def too_long(name: str, seconds: float, max_seconds: float, flag: str | None = None,
             known: bool = True) -> AudioTooLongError:
    """The error of a clip over the limit (``known`` False: its header did not say its length,
    decoding stopped past the limit)."""
    where = f" ({flag})" if flag else ""
    what = (f"is {seconds:,.1f} s long, over the limit of {max_seconds:g} s{where}" if known else
            f"runs past the limit of {max_seconds:g} s{where} (its header gives no length)")
    return AudioTooLongError(
        f"audio {name} {what}: trim it to at most "
        f"{max_seconds:g} s (e.g. `ffmpeg -i IN -t {max_seconds:g} OUT.wav`); CLAP looks at 10 s windows",
        seconds=seconds, max_seconds=max_seconds)


def audio_info(source, name: str | None = None) -> AudioInfo:
    """The header of a clip (a path or bytes) without decoding it."""
    import soundfile as sf

    src, name = _source(source, name)
    try:
        with _QuietNativeStderr(), sf.SoundFile(src) as f:
            return _info_of(f, name)
    except AudioError:
        raise
    except Exception as exc:
        raise _undecodable(name, exc) from None


def load_audio(source, sample_rate: int = 48000, max_seconds: float | None = None,
               name: str | None = None) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate`` of a clip (a path or bytes): soundfile decode,
    channels averaged, soxr resample. A clip longer than ``max_seconds`` (None:
    :data:`MAX_AUDIO_SECONDS`) raises :class:`~psm_mapping.errors.AudioTooLongError`, from its
    header when it says its length, else once ``max_seconds`` are decoded."""
    import soundfile as sf
    import soxr

    max_seconds = MAX_AUDIO_SECONDS if max_seconds is None else float(max_seconds)
    src, name = _source(source, name)
    try:
        with _QuietNativeStderr(), sf.SoundFile(src) as f:  # libmpg123 prints to fd 2 on corrupt mp3s
            info = _info_of(f, name)
            limit = int(math.floor(max_seconds * info.samplerate))
            if info.frames is not None and info.frames > limit:
                raise too_long(name, info.seconds, max_seconds)
            block = max(256, BLOCK_BYTES // (4 * info.channels))
            parts, n = [], 0
            while n <= limit:
                data = f.read(min(block, limit + 1 - n), dtype="float32", always_2d=True)
                if data.shape[0] == 0:
                    break
                parts.append(data.mean(axis=1))
                n += data.shape[0]
                del data
            sr = info.samplerate
    except AudioError:
        raise
    except Exception as exc:
        raise _undecodable(name, exc) from None
    if n > limit:  # the header did not say (or lied): stopped after the limit
        raise too_long(name, n / sr, max_seconds, known=False)
    if n == 0:
        raise AudioError(f"audio file {name} is empty: give a clip with sound (up to 10 s are used)")
    mono = parts[0] if len(parts) == 1 else np.concatenate(parts)
    del parts
    if not np.isfinite(mono).all():
        raise AudioError(f"audio file {name} holds NaN or infinite samples: re-export it")
    if float(np.abs(mono).max()) < 1e-6:
        raise AudioError(f"audio file {name} is silent: give a clip with audible sound")
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return mono


__all__ = ["AudioInfo", "MAX_AUDIO_SECONDS", "MAX_SAMPLE_RATE", "MAX_TRAINING_AUDIO_SECONDS", "audio_info",
           "load_audio", "too_long"]
