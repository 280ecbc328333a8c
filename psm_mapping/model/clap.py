"""CLAP towers: the audio tower (Hugging Face ``transformers``), the text tower (plain torch,
:mod:`.text`), the PSM heads over them, the tokenizer (:mod:`.tokenizer`) and audio features.

The architecture is ``laion/clap-htsat-fused``: ``ClapConfig()`` with
``audio_config.enable_fusion = True``. It is built from the config, never downloaded: the PSM
checkpoint holds the fine-tuned weights. Only the audio path imports ``transformers``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import AudioError
from .text import ClapTextTower, read_clap_dict, text_config
from .tokenizer import TEXT_MAX_LENGTH, load_tokenizer, tokenize  # noqa: F401  (public here too)

log = logging.getLogger(__name__)

AUDIO_SAMPLE_RATE = 48000
#: the preprocessor of laion/clap-htsat-fused
CLAP_FEATURE_KWARGS: dict[str, Any] = dict(
    feature_size=64, sampling_rate=AUDIO_SAMPLE_RATE, hop_length=480, fft_window_size=1024,
    frequency_min=50, frequency_max=14000, max_length_s=10, padding="repeatpad",
    truncation="fusion",
)


def default_clap_config():
    """The ``laion/clap-htsat-fused`` architecture, from defaults (no download)."""
    from transformers import ClapConfig

    cfg = ClapConfig()
    cfg.audio_config.enable_fusion = True
    return cfg


def resolve_clap_config(clap_config=None):
    """``None`` (laion/clap-htsat-fused), a ``ClapConfig``, a dict or a path to a JSON file."""
    from transformers import ClapConfig

    if isinstance(clap_config, ClapConfig):
        return clap_config
    d = read_clap_dict(clap_config)
    return default_clap_config() if d is None else ClapConfig.from_dict(d)


class _Wrap(nn.Module):
    """Holds a tower as ``.model`` so state_dict keys read ``model.model.*`` as the authors'."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


def audio_tower(clap_config) -> tuple[nn.Module, int]:
    """``ClapAudioModelWithProjection`` (transformers) and its output width."""
    from transformers import ClapAudioModelWithProjection

    cfg = resolve_clap_config(clap_config)
    return ClapAudioModelWithProjection(cfg.audio_config), cfg.audio_config.projection_dim


def text_tower(clap_config) -> tuple[nn.Module, int]:
    """:class:`~.text.ClapTextTower` (plain torch) and its output width; no transformers import."""
    tower = ClapTextTower(text_config(clap_config))
    return tower, tower.out_dim


class ClapBranch(nn.Module):
    """A CLAP tower + PSM heads: ``mean_head``/``std_head`` (pcmepp) or ``head`` (infonce).

    ``clap_config``: anything :func:`~.text.read_clap_dict` takes, or a ``ClapConfig``."""

    def __init__(self, kind: str, clap_config, probabilistic: bool, fc_dim: int = 512):
        super().__init__()
        from .heads import Projector

        self.kind = kind
        tower, feat = audio_tower(clap_config) if kind == "audio" else text_tower(clap_config)
        tower.eval()
        self.model = _Wrap(tower)
        self.probabilistic = probabilistic
        if probabilistic:
            self.mean_head = Projector(feat, fc_dim)
            self.std_head = Projector(feat, fc_dim)
            nn.init.constant_(self.std_head.linear1.bias, -4.0)
            nn.init.constant_(self.std_head.linear2.bias, -4.0)
        else:
            self.head = Projector(feat, fc_dim)

    def features(self, **inputs) -> torch.Tensor:
        if self.kind == "audio":
            return self.model.model(**inputs).audio_embeds
        return self.model.model(inputs["input_ids"], inputs.get("attention_mask"))

    def forward(self, **inputs):
        from .heads import ProbEmbedding

        x = self.features(**inputs)
        if self.probabilistic:
            return ProbEmbedding.from_heads(self.mean_head(x), self.std_head(x))
        return ProbEmbedding.from_heads(self.head(x), None)


# ---------------------------------------------------------------------------- audio
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


def load_audio(path: str | os.PathLike, sample_rate: int = AUDIO_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 waveform at ``sample_rate`` (soundfile decode, soxr resample)."""
    import soundfile as sf
    import soxr

    p = Path(path)
    if not p.is_file():
        raise AudioError(f"audio file {p} not found: check the path")
    try:
        with _QuietNativeStderr():  # libmpg123 prints to fd 2 on corrupt mp3s
            data, sr = sf.read(str(p), dtype="float32", always_2d=True)
    except Exception as exc:
        detail = str(exc).split("': ", 1)[-1].strip()
        if "does not exist" in detail:  # libsndfile's word for a stream it cannot parse
            detail = "corrupt or unsupported data"
        raise AudioError(f"cannot decode audio {p.name} ({detail}): convert it to wav, flac, ogg or mp3") from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file {p.name} is empty: give a clip with sound (up to 10 s are used)")
    mono = data.mean(axis=1)
    if not np.isfinite(mono).all():
        raise AudioError(f"audio file {p.name} holds NaN or infinite samples: re-export it")
    if float(np.abs(mono).max()) < 1e-6:
        raise AudioError(f"audio file {p.name} is silent: give a clip with audible sound")
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ").astype(np.float32)
    return mono


def audio_features(waveforms: Sequence[np.ndarray], seed: int = 0,
                   feature_kwargs: dict | None = None) -> dict[str, torch.Tensor]:
    """``ClapFeatureExtractor`` features ``[B, 4, 1001, 64]`` and ``is_longer`` ``[B, 1]``.

    ``is_longer`` is True for every clip, as the reference's data loader forces it. Clips over
    10 s are cut into random chunks by the "fusion" truncation: seeded, so a query is
    deterministic (numpy's global state is restored afterwards).
    """
    from transformers import ClapFeatureExtractor

    fe = ClapFeatureExtractor(**(feature_kwargs or CLAP_FEATURE_KWARGS))
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        out = fe([np.asarray(w, dtype=np.float64) for w in waveforms],
                 sampling_rate=fe.sampling_rate, return_tensors="pt")
    finally:
        np.random.set_state(state)
    feats = out["input_features"].float()
    return {"input_features": feats, "is_longer": torch.ones(feats.shape[0], 1, dtype=torch.bool)}
