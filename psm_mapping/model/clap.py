"""CLAP audio / text encoders (Hugging Face ``transformers``), the tokenizer and audio features.

The architecture is ``laion/clap-htsat-fused``: ``ClapConfig()`` with
``audio_config.enable_fusion = True``. It is built from the config, never downloaded: the PSM
checkpoint holds the fine-tuned weights.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError, TokenizerError
from .audio import MAX_AUDIO_SECONDS, load_audio  # noqa: F401 (the bounded decoder, re-exported)

log = logging.getLogger(__name__)

TEXT_MAX_LENGTH = 128
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

    if clap_config is None:
        return default_clap_config()
    if isinstance(clap_config, ClapConfig):
        return clap_config
    if isinstance(clap_config, (str, os.PathLike)):
        path = Path(clap_config)
        if not path.is_file():
            raise InputError(f"CLAP config {path} not found: pass the JSON file written with the "
                             "checkpoint (ClapConfig.to_json_file) or omit it for laion/clap-htsat-fused")
        try:
            clap_config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"CLAP config {path} is not valid JSON ({exc}): fix or regenerate it") from None
    if isinstance(clap_config, dict):
        return ClapConfig.from_dict(clap_config)
    raise InputError(f"clap_config of type {type(clap_config).__name__} is not supported: pass "
                     "None, a transformers.ClapConfig, a dict or a JSON path")


class _HFWrap(nn.Module):
    """Holds the HF model as ``.model`` so state_dict keys read ``model.model.*`` as the authors'."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


class ClapBranch(nn.Module):
    """A CLAP tower + PSM heads: ``mean_head``/``std_head`` (pcmepp) or ``head`` (infonce)."""

    def __init__(self, kind: str, clap_config, probabilistic: bool, fc_dim: int = 512):
        super().__init__()
        from transformers import ClapAudioModelWithProjection, ClapTextModelWithProjection

        from .heads import Projector

        self.kind = kind
        if kind == "audio":
            hf = ClapAudioModelWithProjection(clap_config.audio_config)
            feat = clap_config.audio_config.projection_dim
        else:
            hf = ClapTextModelWithProjection(clap_config.text_config)
            feat = clap_config.text_config.projection_dim
        hf.eval()
        self.model = _HFWrap(hf)
        self.probabilistic = probabilistic
        if probabilistic:
            self.mean_head = Projector(feat, fc_dim)
            self.std_head = Projector(feat, fc_dim)
            nn.init.constant_(self.std_head.linear1.bias, -4.0)
            nn.init.constant_(self.std_head.linear2.bias, -4.0)
        else:
            self.head = Projector(feat, fc_dim)

    def features(self, **inputs) -> torch.Tensor:
        out = self.model.model(**inputs)
        return out.audio_embeds if self.kind == "audio" else out.text_embeds

    def forward(self, **inputs):
        from .heads import ProbEmbedding

        x = self.features(**inputs)
        if self.probabilistic:
            return ProbEmbedding.from_heads(self.mean_head(x), self.std_head(x))
        return ProbEmbedding.from_heads(self.head(x), None)


# ---------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str | os.PathLike | None = None):
    """A RoBERTa tokenizer from a local folder, or ``roberta-base`` from the Hugging Face cache.

    Offline mode (``HF_HUB_OFFLINE=1``) is honoured: then only the cache is looked at.
    """
    from transformers import AutoTokenizer

    if path is not None:
        p = Path(path)
        if not p.is_dir():
            raise TokenizerError(f"tokenizer folder {p} not found: pass --tokenizer DIR with a RoBERTa "
                                 "tokenizer (e.g. `hf download roberta-base --local-dir DIR`)")
        try:
            return AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds
            raise TokenizerError(f"cannot load a tokenizer from {p} ({type(exc).__name__}): the folder "
                                 "needs tokenizer.json or vocab.json + merges.txt of roberta-base") from None
    from ..offline import is_offline, reachable

    try:
        return AutoTokenizer.from_pretrained("roberta-base", local_files_only=True)
    except Exception:
        if is_offline():
            raise TokenizerError("roberta-base is not in the Hugging Face cache and offline mode is on: "
                                 "pass --tokenizer DIR, or fill the cache once online "
                                 "(`hf download roberta-base`)", option="tokenizer") from None
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if not reachable(endpoint):  # at once, not after the hub client's retries
        raise TokenizerError(f"roberta-base is not in the Hugging Face cache and {endpoint} cannot be reached: "
                             "pass --tokenizer DIR, or fill the cache once online (`hf download roberta-base`)",
                             option="tokenizer")
    try:
        return AutoTokenizer.from_pretrained("roberta-base")
    except Exception as exc:
        raise TokenizerError(f"cannot get the roberta-base tokenizer ({type(exc).__name__}): pass "
                             "--tokenizer DIR with a local copy, or fill the Hugging Face cache "
                             "online (`hf download roberta-base`)") from None


def tokenize(texts: Sequence[str], tokenizer) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask`` as the reference: max_length 128, padded, truncated."""
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InputError("a text query is empty: give words, e.g. --query 'birds chirping'")
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


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
