"""CLAP towers: the audio tower (Hugging Face ``transformers``), the text tower (plain torch,
:mod:`.text`), the PSM heads over them, the tokenizer (:mod:`.tokenizer`) and audio features.

The architecture is ``laion/clap-htsat-fused``: ``ClapConfig()`` with
``audio_config.enable_fusion = True``. It is built from the config, never downloaded: the PSM
checkpoint holds the fine-tuned weights. Only the audio path imports ``transformers``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .audio import MAX_AUDIO_SECONDS, load_audio  # noqa: F401 (the bounded decoder, re-exported)
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
