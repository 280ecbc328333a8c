"""The PSM model: SatMAE image path with metadata fusion, CLAP audio and text paths, Gaussian heads."""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..constants import GSD
from ..errors import CheckpointError, InputError
from .checkpoint import RawCheckpoint, check_keys, read_checkpoint, save_safetensors, to_jsonable
from .clap import ClapBranch, audio_features, load_audio, resolve_clap_config
from .config import PSMConfig
from .fusion import MetaFuser
from .heads import ProbEmbedding, Projector
from .metadata import Metadata
from .text import read_clap_dict
from .tokenizer import load_tokenizer, tokenize
from .vit import SatViT

log = logging.getLogger(__name__)
#: held while a deferred text tower is built (PSM._load_deferred_text)
_DEFERRED_BUILD = threading.RLock()


#: the towers a model can be built with (:meth:`PSM.from_checkpoint` ``encoders``)
ENCODERS = ("image", "text", "audio")
#: the checkpoint keys of each tower
_ENCODER_KEYS = {"image": "sat_encoder.encoder.backbone.", "text": "text_encoder.", "audio": "audio_encoder."}


def _check_encoders(encoders: Sequence[str]) -> tuple[str, ...]:
    out = tuple(dict.fromkeys(str(e) for e in encoders))
    bad = [e for e in out if e not in ENCODERS]
    if bad:
        raise InputError(f"unknown encoder(s) {', '.join(bad)}: use some of {', '.join(ENCODERS)}")
    return out


class SatEncoderCore(nn.Module):
    """Keys ``backbone``, ``projector``, ``meta_fuser``, ``mean_head``, ``std_head``."""

    def __init__(self, cfg: PSMConfig, backbone: bool = True):
        super().__init__()
        if backbone:  # left out when only stored z_img are fused (queries of a store)
            self.backbone = SatViT(cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads,
                                   cfg.mlp_ratio)
        self.projector = Projector(cfg.embed_dim, cfg.fc_dim)
        if cfg.uses_metadata:
            self.meta_fuser = MetaFuser(cfg.metadata_type, cfg.fc_dim, cfg.fuser_heads, cfg.fuser_layers)
        self.probabilistic = cfg.probabilistic
        if cfg.probabilistic:
            self.mean_head = Projector(cfg.fc_dim, cfg.fc_dim)
            self.std_head = Projector(cfg.fc_dim, cfg.fc_dim)
            nn.init.constant_(self.std_head.linear1.bias, -4.0)
            nn.init.constant_(self.std_head.linear2.bias, -4.0)

    # the image path, one home for inference (PSM.embed_images) and training / evaluation
    def features(self, images: torch.Tensor, resolution: torch.Tensor) -> torch.Tensor:
        """``z_img``: ViT at ``resolution`` m per patch step, then the projector."""
        return self.projector(self.backbone(images, resolution))

    def heads(self, z: torch.Tensor, meta_inputs: dict | None = None, fuse: bool = True,
              dtype: torch.dtype | None = None) -> ProbEmbedding:
        """Fusion with ``meta_inputs`` (``{item: (encoding, valid)}``; None masks all; skipped
        without a fuser or with ``fuse=False``), then the heads (outputs cast to ``dtype``)."""
        if fuse and hasattr(self, "meta_fuser"):
            z = self.meta_fuser(z, meta_inputs)
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        if self.probabilistic:
            return ProbEmbedding.from_heads(cast(self.mean_head(z)), cast(self.std_head(z)))
        return ProbEmbedding.from_heads(cast(z), None)

    def forward(self, images: torch.Tensor, resolution: torch.Tensor, meta_inputs: dict | None = None) -> ProbEmbedding:
        return self.heads(self.features(images, resolution), meta_inputs)


class SatEncoder(nn.Module):
    def __init__(self, cfg: PSMConfig, backbone: bool = True):
        super().__init__()
        self.encoder = SatEncoderCore(cfg, backbone)


class PSM(nn.Module):
    """Probabilistic Soundscape Mapping model (inference side).

    >>> m = PSM.from_checkpoint("x.ckpt")
    >>> s = m.embed_images(images, zoom_levels, metadata=None)   # ProbEmbedding
    """

    def __init__(self, config: PSMConfig, clap_config=None, dtype: torch.dtype = torch.float32,
                 encoders: Sequence[str] = ENCODERS):
        super().__init__()
        self.config = config
        # the text tower reads the config as a plain dict; transformers' ClapConfig is resolved
        # only for the audio tower or when asked for (:attr:`clap_config`)
        self._clap_source = read_clap_dict(clap_config)
        self._clap_resolved = clap_config if type(clap_config).__name__ == "ClapConfig" else None
        self.compute_dtype = dtype
        self.encoders = _check_encoders(encoders)
        self.sat_encoder = SatEncoder(config, backbone="image" in self.encoders)
        if config.audio and "audio" in self.encoders:
            self.audio_encoder = ClapBranch("audio", self.clap_config, config.probabilistic, config.fc_dim)
        if config.text and "text" in self.encoders:
            self.text_encoder = ClapBranch("text", self._clap_source, config.probabilistic, config.fc_dim)
        self.source: dict[str, Any] = {}
        #: the text tower's weights while it waits for its first use (:meth:`from_checkpoint` ``defer_text``)
        self._deferred_text: dict[str, torch.Tensor] | None = None
        self.eval()

    @property
    def text_config(self):
        """The text tower's :class:`~.text.TextConfig` (no transformers import)."""
        from .text import text_config

        return text_config(self._clap_source)

    @property
    def clap_config(self):
        """The CLAP config as a ``transformers.ClapConfig`` (imports transformers on first use)."""
        if self._clap_resolved is None:
            self._clap_resolved = resolve_clap_config(self._clap_source)
        return self._clap_resolved

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, clap_config=None, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str = torch.float32, encoders: Sequence[str] = ENCODERS,
                        defer_text: bool | None = None) -> "PSM":
        """Load an official Lightning ``.ckpt`` or a safetensors export, strictly and safely.

        ``encoders``: the towers to build and load, of ``image`` (the ViT backbone), ``text`` and
        ``audio``; a query of a store needs no ``image`` (it fuses the stored ``z_img``), a text
        query no ``audio``. The fusion and heads are always loaded.

        ``defer_text``: check the text tower's keys now but build it on its first use (a text
        query, :meth:`state_dict`), so that queries answered from a text-embedding cache never
        build it. Default: when ``image`` is not among ``encoders`` (a model for answering)."""
        raw = read_checkpoint(path)
        model = meta_model(raw, clap_config, dtype=_as_dtype(dtype), encoders=encoders)
        if defer_text is None:
            defer_text = "image" not in model.encoders
        expected = model.state_dict()
        sd = {k: v for k, v in raw.state_dict.items() if k in expected}
        if defer_text and hasattr(model, "text_encoder"):
            del model.text_encoder  # keys checked by meta_model; built by _load_deferred_text
            model._deferred_text = {k: sd.pop(k) for k in list(sd) if k.startswith("text_encoder.")}
        model.load_state_dict(sd, strict=False, assign=True)
        model._materialise_missing_buffers()
        model.source = {"path": str(Path(path).resolve()), "format": raw.format,
                        "hyper_parameters": to_jsonable(raw.hyper_parameters)}
        # compute in float32 whatever the storage dtype (official weights can be float16)
        return model.to(device=device, dtype=torch.float32).eval()

    def _load_deferred_text(self) -> None:
        """Build the text tower held back by :meth:`from_checkpoint` (``defer_text``)."""
        if self._deferred_text is None:
            return
        with _DEFERRED_BUILD:  # the explorer may ask from several threads at once: one builds it
            weights = self._deferred_text
            if weights is None:
                return
            log.info("building the text tower")
            with torch.device("meta"):
                branch = ClapBranch("text", self._clap_source, self.config.probabilistic, self.config.fc_dim)
            branch.load_state_dict({k[len("text_encoder."):]: v for k, v in weights.items()}, strict=False,
                                   assign=True)
            self.text_encoder = branch
            self._materialise_missing_buffers()
            branch.to(device=self.device, dtype=torch.float32).train(self.training)
            self._deferred_text = None

    # a deferred tower is part of the model's weights: whoever lists them gets it built
    def state_dict(self, *args, **kwargs):
        self._load_deferred_text()
        return super().state_dict(*args, **kwargs)

    def named_parameters(self, *args, **kwargs):
        self._load_deferred_text()
        return super().named_parameters(*args, **kwargs)

    def named_buffers(self, *args, **kwargs):
        self._load_deferred_text()
        return super().named_buffers(*args, **kwargs)

    def _materialise_missing_buffers(self) -> None:
        """Index buffers absent from the file are rebuilt from a fresh module (they are constants)."""
        for mname, module in self.named_modules():
            for bname, buf in list(nn.Module.named_buffers(module, recurse=False)):
                if buf is not None and buf.is_meta:
                    fresh = _fresh_buffer(self, mname, bname)
                    module.register_buffer(bname, fresh, persistent=bname in module.state_dict())

    def export_safetensors(self, path: str | os.PathLike) -> Path:
        """Weights + model config + CLAP config in one memory-mappable file."""
        meta = {"psm_config": asdict(self.config), "clap_config": self.clap_config.to_dict(),
                "hyper_parameters": self.source.get("hyper_parameters", {})}
        return save_safetensors(self.state_dict(), path, meta)

    # ------------------------------------------------------------------ helpers
    @property
    def device(self) -> torch.device:
        return self.sat_encoder.encoder.projector.linear1.weight.device  # lists no (deferred) tower

    def _autocast(self):
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def resolution(self, zoom_levels) -> torch.Tensor:
        """Metres per patch step for each zoom level (``zoom * gsd[sat_type]``), float32."""
        zl = torch.as_tensor(zoom_levels).reshape(-1).tolist()
        return torch.tensor([1.0 * z * GSD[self.config.sat_type] for z in zl], dtype=torch.float32)

    # ------------------------------------------------------------------ image path
    @torch.inference_mode()
    def image_features(self, images: torch.Tensor, zoom_levels) -> torch.Tensor:
        """``z_img``: the projector output before fusion, ``[B, fc_dim]`` float32."""
        images = images.to(self.device, non_blocking=True)
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"images must be [B, 3, H, W], got {list(images.shape)}")
        zl = torch.as_tensor(zoom_levels).reshape(-1)
        if zl.numel() == 1 and images.shape[0] > 1:
            zl = zl.expand(images.shape[0])
        if zl.numel() != images.shape[0]:
            raise InputError(f"{zl.numel()} zoom levels for {images.shape[0]} images: give one per image")
        enc = self.sat_encoder.encoder
        if not hasattr(enc, "backbone"):
            raise InputError("this model was loaded without its image encoder: load it with "
                             "encoders including 'image' (PSM.from_checkpoint(..., encoders=...))")
        with self._autocast():
            z = enc.features(images.float() if self.compute_dtype == torch.float32 else images,
                             self.resolution(zl).to(self.device))
        return z.float()

    @torch.inference_mode()
    def embed_image_features(self, z_img: torch.Tensor, metadata: Metadata | None = None,
                             fuse: bool = True) -> ProbEmbedding:
        """Fusion (when the checkpoint has it and ``fuse``) and heads, from ``z_img``.

        ``metadata=None`` on a fusion checkpoint masks every metadata item (the authors'
        evaluation); ``fuse=False`` skips the fuser (the authors' mapping scripts).
        """
        enc = self.sat_encoder.encoder
        z = z_img.to(self.device).float()
        with self._autocast():
            inputs = metadata.encode(z.shape[0], self.device) if (metadata is not None and fuse) else None
            return enc.heads(z, inputs, fuse=fuse, dtype=torch.float32)

    def embed_images(self, images: torch.Tensor, zoom_levels, metadata: Metadata | None = None,
                     fuse: bool = True) -> ProbEmbedding:
        """Gaussian embeddings of normalised images ``[B, 3, 224, 224]`` at ``zoom_levels`` ``[B]``."""
        return self.embed_image_features(self.image_features(images, zoom_levels), metadata, fuse)

    # ------------------------------------------------------------------ text / audio
    def _branch(self, name: str) -> ClapBranch:
        if name == "text_encoder":
            self._load_deferred_text()
        if not hasattr(self, name):
            kind = name.split("_")[0]
            if getattr(self.config, kind, False):
                raise InputError(f"this model was loaded without its {kind} encoder: load it with "
                                 f"encoders including {kind!r}")
            raise InputError(f"this checkpoint has no {kind} encoder: use a checkpoint "
                             "whose modality_type includes it")
        return getattr(self, name)

    @torch.inference_mode()
    def embed_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ProbEmbedding:
        ids = torch.as_tensor(input_ids).to(self.device)
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).to(self.device)
        with self._autocast():
            emb = self._branch("text_encoder")(input_ids=ids, attention_mask=mask)
        return _float(emb)

    @torch.inference_mode()
    def embed_audio(self, input_features: torch.Tensor, is_longer: torch.Tensor | None = None) -> ProbEmbedding:
        feats = torch.as_tensor(input_features).to(self.device).float()
        if is_longer is None:
            is_longer = torch.ones(feats.shape[0], 1, dtype=torch.bool)
        is_longer = torch.as_tensor(is_longer).to(self.device).bool().reshape(-1, 1)
        with self._autocast():
            emb = self._branch("audio_encoder")(input_features=feats, is_longer=is_longer)
        return _float(emb)

    def embed_text_queries(self, texts: Sequence[str] | str, tokenizer=None, batch_size: int = 64) -> ProbEmbedding:
        """Text strings -> embeddings. ``tokenizer``: a tokenizer, a folder, or None (roberta-base cache)."""
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(tokenizer)
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), batch_size):
            enc = tokenize(texts[i:i + batch_size], tokenizer)
            out.append(self.embed_text(enc["input_ids"], enc["attention_mask"]))
        return ProbEmbedding.cat(out)

    def embed_audio_files(self, paths: Sequence[str | os.PathLike], seed: int = 0,
                          batch_size: int = 8, max_seconds: float | None = None) -> ProbEmbedding:
        """Audio files (anything soundfile reads) -> embeddings; mono, 48 kHz, CLAP features.
        A clip over ``max_seconds`` (None: ``MAX_AUDIO_SECONDS``, 60 s) is refused before decoding."""
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        out = []
        for i in range(0, len(paths), batch_size):
            waves = [load_audio(p, max_seconds=max_seconds) for p in paths[i:i + batch_size]]
            feats = audio_features(waves, seed=seed)
            out.append(self.embed_audio(feats["input_features"], feats["is_longer"]))
        return ProbEmbedding.cat(out)

    def describe(self) -> dict[str, Any]:
        d = asdict(self.config)
        d["loss_type"] = self.config.loss_type
        d["source"] = self.source.get("path")
        return d


def meta_model(raw: RawCheckpoint, clap_config=None, dtype: torch.dtype = torch.float32,
               encoders: Sequence[str] = ENCODERS) -> PSM:
    """The model ``raw`` describes, built on the meta device (no memory, no weights), after its
    keys and shapes were checked strictly against the file's (:func:`check_keys`).
    ``clap_config`` None: the checkpoint's own, else the laion/clap-htsat-fused architecture."""
    if raw.psm_config is not None:
        cfg = PSMConfig.from_dict(raw.psm_config)
    else:
        cfg = PSMConfig.infer(raw.state_dict, raw.hyper_parameters)
    if clap_config is None:
        clap_config = raw.clap_config or raw.hyper_parameters.get("clap_config")
    with torch.device("meta"):  # no memory, no values drawn (the modules skip init on meta)
        model = PSM(cfg, clap_config, dtype=dtype, encoders=encoders)
    left_out = tuple(p for e, p in _ENCODER_KEYS.items() if e not in model.encoders)
    found = {k: v for k, v in raw.state_dict.items() if not k.startswith(left_out)} if left_out else raw.state_dict
    check_keys(model.state_dict(), found, Path(raw.path).name if raw.path else "checkpoint")
    return model


def _float(e: ProbEmbedding) -> ProbEmbedding:
    return e.map(torch.Tensor.float)


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise InputError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")
    return table[dtype]


def _fresh_buffer(model: PSM, module_name: str, buffer_name: str) -> torch.Tensor:
    """Rebuild a constant index buffer that the checkpoint did not carry (its shape is known)."""
    module = model.get_submodule(module_name)
    shape = getattr(module, buffer_name).shape
    if buffer_name == "position_ids":
        return torch.arange(shape[-1]).expand(shape).contiguous()
    if buffer_name == "token_type_ids":
        return torch.zeros(shape, dtype=torch.long)
    if buffer_name == "relative_position_index":  # Swin window attention (CLAP audio)
        ws = module.window_size
        ws = (ws, ws) if isinstance(ws, int) else tuple(ws)
        coords = torch.stack(torch.meshgrid(torch.arange(ws[0]), torch.arange(ws[1]), indexing="ij"))
        flat = coords.flatten(1)
        rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
        rel[:, :, 0] += ws[0] - 1
        rel[:, :, 1] += ws[1] - 1
        rel[:, :, 0] *= 2 * ws[1] - 1
        return rel.sum(-1).reshape(shape)
    raise CheckpointError(f"checkpoint lacks the buffer {module_name}.{buffer_name}: re-export it")
