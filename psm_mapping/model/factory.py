"""Small checkpoints and tokenizers in the official formats, for tests, the demo and new training.

``make_checkpoint`` writes a Lightning-style ``.ckpt`` (``state_dict`` with the authors' keys and
``hyper_parameters``) from a freshly initialised (untrained) model of any size.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..constants import FULL_METADATA

#: a CLAP small enough for CPU tests (same shape family as laion/clap-htsat-fused)
TINY_CLAP: dict[str, Any] = {
    "audio_config": {"enable_fusion": True, "patch_embeds_hidden_size": 8, "hidden_size": 64,
                     "depths": [1, 1, 1, 1], "num_attention_heads": [1, 1, 2, 2], "projection_dim": 512},
    "text_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "vocab_size": 1000, "projection_dim": 512},
}


def tiny_clap_config(**overrides):
    from transformers import ClapConfig

    d = json.loads(json.dumps(TINY_CLAP))
    d.update(overrides)
    return ClapConfig.from_dict(d)


def hyper_parameters(sat_type: str, metadata_type: str, probabilistic: bool, text: bool = True,
                     **extra) -> dict[str, Any]:
    """``hyper_parameters`` as the authors' Lightning module saves them."""
    enc = "prob" if probabilistic else "baseline"
    hp = {
        "mode": "evaluate", "pretrained_model_path": "none", "fc_dim": 512,
        "metadata_type": metadata_type, "meta_droprate": 0.0,
        "sat_encoder_type": f"{enc}SatMAE", "audio_encoder_type": f"{enc}CLAP",
        "text_encoder_type": f"{enc}CLAP",
        "modality_type": "sat_audio_text" if text else "sat_audio",
        "freeze": False, "loss_type": "pcmepp" if probabilistic else "infonce",
        "pseudo_match_alpha": 0.1, "vib_beta": 1e-4, "sat_type": sat_type,
        "dataset_type": "SoundingEarth" if sat_type == "googleEarth" else "GeoSound",
        "probabilistic": probabilistic, "recall_at": 10, "sat_input_size": 224,
    }
    hp.update(extra)
    return hp


def build_model(sat_type: str = "sentinel", metadata_type: str = FULL_METADATA, probabilistic: bool = True,
                embed_dim: int = 768, depth: int = 1, num_heads: int | None = None, clap_config=None,
                text: bool = True, seed: int = 0):
    """A randomly initialised PSM (untrained) of the given shape."""
    from .psm import PSM, PSMConfig

    cfg = PSMConfig(sat_type=sat_type, metadata_type=metadata_type, probabilistic=probabilistic,
                    embed_dim=embed_dim, depth=depth, num_heads=num_heads or max(1, embed_dim // 64),
                    text=text)
    torch.manual_seed(seed)
    return PSM(cfg, clap_config if clap_config is not None else tiny_clap_config())


def checkpoint_state_dict(model, probabilistic: bool) -> dict[str, torch.Tensor]:
    """The model's weights plus the loss scalars an official checkpoint carries."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if probabilistic:
        sd["criterion.shift"] = torch.tensor([5.0])
        sd["criterion.negative_scale"] = torch.tensor([5.0])
    else:
        sd["criterion.tau"] = torch.tensor([1.0])
    return sd


def make_checkpoint(path: str | os.PathLike, sat_type: str = "sentinel", metadata_type: str = FULL_METADATA,
                    probabilistic: bool = True, embed_dim: int = 768, depth: int = 1,
                    num_heads: int | None = None, clap_config=None, text: bool = True, seed: int = 0,
                    dtype: torch.dtype = torch.float32, model=None, hparams_extra: dict | None = None) -> Path:
    """Write an official-format ``.ckpt`` (untrained unless ``model`` is given)."""
    if model is None:
        model = build_model(sat_type, metadata_type, probabilistic, embed_dim, depth, num_heads,
                            clap_config, text, seed)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v)
          for k, v in checkpoint_state_dict(model, model.config.probabilistic).items()}
    ckpt = {
        "state_dict": sd,
        "hyper_parameters": hyper_parameters(model.config.sat_type, model.config.metadata_type,
                                             model.config.probabilistic, model.config.text,
                                             **(hparams_extra or {})),
        "pytorch-lightning_version": "2.2.0", "epoch": 0, "global_step": 0,
    }
    if clap_config is not None or model.clap_config.to_dict() != _default_clap_dict():
        # our extension: a non-default CLAP travels with the file so it loads without --clap-config
        ckpt["hyper_parameters"]["clap_config"] = model.clap_config.to_dict()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    torch.save(ckpt, tmp)
    os.replace(tmp, p)
    return p


def _default_clap_dict() -> dict:
    from .clap import default_clap_config

    return default_clap_config().to_dict()


def make_tokenizer(out_dir: str | os.PathLike, corpus: list[str] | None = None, vocab_size: int = 1000) -> Path:
    """Train a small byte-level BPE tokenizer in RoBERTa's format (ids 0..4 are the specials)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    corpus = corpus or DEMO_CORPUS
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(corpus * 4, vocab_size=vocab_size, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_model(str(out))
    # from the folder (vocab.json + merges.txt): transformers 5 ignores vocab_file= keywords
    fast = RobertaTokenizerFast.from_pretrained(str(out), model_max_length=512)
    fast.save_pretrained(str(out))
    return out


DEMO_CORPUS = [
    "birds chirping in the forest", "waves crashing on the beach", "cars driving on a busy road",
    "people talking in a crowded market", "wind blowing through the trees", "rain falling on a roof",
    "a church bell ringing in the town", "frogs croaking near a pond", "a train passing by",
    "children playing in a park", "water flowing in a river", "insects buzzing in a meadow",
    "an airplane flying overhead", "construction machines working", "dogs barking in the street",
    "a quiet night in the countryside", "footsteps on gravel", "sheep and cows on a farm",
]
