"""Training / evaluation batches from shards: zoom crops, augmentation, mel versions, metadata.

Per sample (PSM_SPEC.md sections 6 and 9, the authors' ``dataloader.py``):

* zoom ``z`` drawn from ``{1, 3, 5}`` (googleEarth: 1); the image is centre-cropped to
  ``z * base_tile`` px and resized (bicubic, antialiased) to ``base_tile`` px;
* training: ``RandomResizedCrop(224, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)``, random
  horizontal flip; evaluation: resize to 224 and centre crop; then ImageNet normalisation;
* one of the five mel feature draws (random, or a fixed one for evaluation);
* metadata encodings (:class:`~psm_mapping.model.metadata.Metadata`), ``freesound`` never has
  a valid hour.

Official images are 1280 px (sentinel), 1500 px (bingmap). A smaller image is taken to cover the
same ground (e.g. a synthetic or down-sampled one): the crop is scaled by ``size / native`` so
it keeps the footprint of the zoom level. Images at least as large as the native size are cut
exactly as the reference (``z * base_tile`` px, zero-padded if the image is smaller than that).

Everything is plain torch (no torchvision); randomness comes from a per-worker
:class:`torch.Generator` so a seeded run is reproducible.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import IterableDataset, get_worker_info

from ..constants import AUDIO_SOURCES, BASE_TILE, CAPTION_SOURCES, CHIP_SIZE, IMAGENET_MEAN, IMAGENET_STD
from ..config import check_zoom_levels
from ..errors import InputError
from ..model.fusion import metadata_items
from ..model.metadata import Metadata
from ..region import wrap_lon
from .shards import MEL_VERSIONS, Sample, expand_shards, iter_samples

#: side in pixels of the official training images (the reference's crops assume it)
NATIVE_IMAGE_PX: dict[str, int] = {"sentinel": 1280, "bingmap": 1500, "googleEarth": 256}
TRAIN_ZOOM_LEVELS: dict[str, tuple[int, ...]] = {"sentinel": (1, 3, 5), "bingmap": (1, 3, 5), "googleEarth": (1,)}
TEXT_MAX_LENGTH = 128


@dataclass
class DataConfig:
    """How samples become model inputs. ``train=False`` is the evaluation path (fixed zoom and
    mel version, no augmentation)."""

    sat_type: str = "sentinel"
    metadata_type: str = "latlong_month_time_asource_tsource"
    train: bool = True
    zoom_levels: tuple[int, ...] | None = None  # None: TRAIN_ZOOM_LEVELS[sat_type]
    mel_versions: tuple[int, ...] = MEL_VERSIONS
    eval_zoom_level: int = 1
    eval_mel_version: int = 1
    input_size: int = CHIP_SIZE
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    default_source: str | None = None  # "aporee" for SoundingEarth shards
    text: bool = True

    def __post_init__(self):
        if self.sat_type not in BASE_TILE:
            raise InputError(f"unknown sat_type {self.sat_type!r}: use one of {', '.join(BASE_TILE)}")
        if self.zoom_levels is None:
            self.zoom_levels = TRAIN_ZOOM_LEVELS[self.sat_type]
        self.zoom_levels = tuple(int(z) for z in self.zoom_levels)
        self.mel_versions = tuple(int(v) for v in self.mel_versions)
        bad = [v for v in self.mel_versions + (self.eval_mel_version,) if v not in MEL_VERSIONS]
        if bad or not self.mel_versions:
            raise InputError(f"mel versions {bad or '()'} invalid: choose among 1..5")
        self.zoom_levels = check_zoom_levels(self.zoom_levels, upper=None)
        self.eval_zoom_level = check_zoom_levels((self.eval_zoom_level,), upper=None, option="eval_zoom_level")[0]

    @property
    def loaded_mels(self) -> tuple[int, ...]:
        return self.mel_versions if self.train else (self.eval_mel_version,)


# --------------------------------------------------------------------------- image transforms
def to_float_chw(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> float32 ``[3, H, W]`` in [0, 1] (torchvision ``ToTensor``)."""
    t = torch.as_tensor(np.asarray(image))
    if t.ndim != 3 or t.shape[2] != 3:
        raise InputError(f"image must be [H, W, 3] RGB, got {list(t.shape)}")
    return t.permute(2, 0, 1).float().div(255.0)


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop to ``size`` x ``size`` (zero-padded where the image is smaller), as torchvision."""
    _, h, w = img.shape
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        img = F.pad(img, [pw // 2, (pw + 1) // 2, ph // 2, (ph + 1) // 2])
        _, h, w = img.shape
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img[:, top:top + size, left:left + size]


def resize(img: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bicubic, antialiased, no clamping (torch on float tensors)."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(img.shape[-2:]) == hw:
        return img
    return F.interpolate(img[None], size=hw, mode="bicubic", antialias=True, align_corners=False)[0]


def resize_short(img: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)``: the shorter side becomes ``size``."""
    _, h, w = img.shape
    if h <= w:
        return resize(img, (size, int(size * w / h)))
    return resize(img, (int(size * h / w), size))


def zoom_crop(image: np.ndarray | torch.Tensor, zoom: int, sat_type: str) -> torch.Tensor:
    """The zoom-level view: centre ``zoom * base_tile`` px (scaled for small images), resized to
    ``base_tile`` px; float ``[3, tile, tile]``."""
    img = image if isinstance(image, torch.Tensor) and image.dtype.is_floating_point else to_float_chw(image)
    tile = BASE_TILE[sat_type]
    side = min(img.shape[1:])
    crop = zoom * tile
    if side < NATIVE_IMAGE_PX[sat_type]:
        crop = max(1, int(round(crop * side / NATIVE_IMAGE_PX[sat_type])))
    return resize(center_crop(img, crop), tile)


def random_resized_crop_params(h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float],
                               gen: torch.Generator) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` as torchvision's ``RandomResizedCrop.get_params``."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
            return top, left, ch, cw
    in_ratio = w / h  # fallback: central crop
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def normalise(img: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, dtype=img.dtype)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=img.dtype)[:, None, None]
    return (img - mean) / std


def train_view(img: torch.Tensor, cfg: DataConfig, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip + normalise."""
    top, left, ch, cw = random_resized_crop_params(img.shape[1], img.shape[2], cfg.crop_scale, cfg.crop_ratio, gen)
    out = resize(img[:, top:top + ch, left:left + cw], cfg.input_size)
    if cfg.hflip and float(torch.rand(1, generator=gen)) < 0.5:
        out = out.flip(-1)
    return normalise(out)


def eval_view(img: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """Resize (shorter side) + centre crop + normalise."""
    return normalise(center_crop(resize_short(img, cfg.input_size), cfg.input_size))


# --------------------------------------------------------------------------- samples -> items
@dataclass
class Item:
    """One prepared sample (CPU tensors)."""

    key: str
    image: torch.Tensor  # [3, 224, 224] normalised
    zoom_level: int
    mel: torch.Tensor  # [4, T, 64]
    mel_version: int
    caption: str
    latitude: float
    longitude: float
    month: int
    hour: int
    audio_source: int
    caption_source: int


def decode_image(sample: Sample) -> np.ndarray:
    """The sample's JPEG as uint8 ``[H, W, 3]``."""
    import io

    from PIL import Image

    if sample.image_bytes is None:
        raise InputError(f"sample {sample.key} has no image.jpg")
    try:
        with Image.open(io.BytesIO(sample.image_bytes)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except Exception as e:  # noqa: BLE001 - any decoder failure means a bad member
        raise InputError(f"sample {sample.key}: image.jpg is not a readable image ({e})") from None


def caption_source_of(sample: Sample) -> int:
    """``meta['caption_source']`` (meta / qwen / pengi) or ``meta``. The official shards do not
    carry it (the authors looked it up in a side table); ours may."""
    name = sample.meta.get("caption_source") or "meta"
    if name not in CAPTION_SOURCES:
        raise InputError(f"sample {sample.key}: caption_source {name!r} unknown: use one of {', '.join(CAPTION_SOURCES)}")
    return CAPTION_SOURCES[name]


def prepare(sample: Sample, cfg: DataConfig, gen: torch.Generator | None = None) -> Item:
    """Sample -> :class:`Item` (random zoom / mel / augmentation when ``cfg.train``)."""
    if sample.image is None:
        sample.image = decode_image(sample)
    if cfg.train:
        if gen is None:
            raise InputError("a training item needs a random generator")
        zoom = cfg.zoom_levels[int(torch.randint(len(cfg.zoom_levels), (1,), generator=gen))]
        versions = [v for v in cfg.mel_versions if v in sample.mels] or list(cfg.mel_versions)
        mel_v = versions[int(torch.randint(len(versions), (1,), generator=gen))]
        image = train_view(zoom_crop(sample.image, zoom, cfg.sat_type), cfg, gen)
    else:
        zoom, mel_v = cfg.eval_zoom_level, cfg.eval_mel_version
        image = eval_view(zoom_crop(sample.image, zoom, cfg.sat_type), cfg)
    if mel_v not in sample.mels:
        raise InputError(f"sample {sample.key} lacks audio_mel{mel_v}.pyd")
    mel = sample.mels[mel_v].float()
    if mel.ndim != 3:
        raise InputError(f"sample {sample.key}: audio_mel{mel_v} has shape {list(mel.shape)}, expected [4, T, 64]")
    hour = -1 if sample.source == "freesound" else sample.hour
    return Item(key=sample.key, image=image, zoom_level=zoom, mel=mel, mel_version=mel_v,
                caption=sample.caption or "", latitude=sample.latitude, longitude=sample.longitude,
                month=sample.month, hour=hour, audio_source=AUDIO_SOURCES[sample.source],
                caption_source=caption_source_of(sample))


# --------------------------------------------------------------------------- batches
def meta_inputs(items: Sequence[Item], metadata_type: str) -> dict[str, torch.Tensor]:
    """Flat tensors ``{item: enc, item_valid: bool}`` for the fusion tokens that ``metadata_type`` names."""
    names = metadata_items(metadata_type)
    if not names:
        return {}
    md = Metadata(lat=[it.latitude for it in items], lon=[wrap_lon(it.longitude) for it in items],
                  month=[it.month for it in items], hour=[it.hour for it in items],
                  audio_source=[it.audio_source for it in items], caption_source=[it.caption_source for it in items])
    enc = md.encode(len(items))
    out: dict[str, torch.Tensor] = {}
    for name in names:
        x, v = enc[name]
        out[name] = x
        out[f"{name}_valid"] = v.bool()
    return out


def unflatten_meta(flat: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{item: enc, item_valid}`` -> ``{item: (enc, valid)}`` as the fusion module takes it."""
    return {k: (v, flat[f"{k}_valid"]) for k, v in flat.items() if not k.endswith("_valid")}


def tokenize_captions(captions: Sequence[str], tokenizer) -> dict[str, torch.Tensor]:
    """RoBERTa ids as the reference (``max_length`` 128, padded, truncated); empty captions allowed."""
    enc = tokenizer(list(captions), padding="max_length", truncation=True, max_length=TEXT_MAX_LENGTH,
                    return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class Collate:
    """Items -> a batch dict of tensors (Lightning moves it to the device)."""

    def __init__(self, metadata_type: str, tokenizer=None):
        self.metadata_type = metadata_type
        self.tokenizer = tokenizer

    def __call__(self, items: Sequence[Item]) -> dict[str, Any]:
        mels = [it.mel for it in items]
        if len({tuple(m.shape) for m in mels}) != 1:
            raise InputError(f"mel features of different shapes in one batch ({sorted({tuple(m.shape) for m in mels})}): "
                             "rebuild the shards with one feature extractor")
        batch: dict[str, Any] = {
            "key": [it.key for it in items],
            "image": torch.stack([it.image for it in items]),
            "zoom_level": torch.tensor([it.zoom_level for it in items], dtype=torch.long),
            "input_features": torch.stack(mels),
            "is_longer": torch.ones(len(items), 1, dtype=torch.bool),  # the reference forces True
            "meta": meta_inputs(items, self.metadata_type),
        }
        if self.tokenizer is not None:
            batch.update(tokenize_captions([it.caption for it in items], self.tokenizer))
        return batch


def drop_metadata(valid: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Metadata dropout of one item type over a batch (the reference's ``create_mask``).

    ``int(rate * B)`` samples end up invalid: already-invalid ones count, more are chosen at random
    among the valid ones; if more are already invalid, nothing changes."""
    valid = valid.bool()
    b = valid.shape[0]
    quota = int(rate * b)
    already = int((~valid).sum())
    if quota <= already:
        return valid
    open_idx = torch.nonzero(valid, as_tuple=False).reshape(-1)
    perm = torch.randperm(open_idx.numel(), generator=generator, device="cpu")
    drop = open_idx[perm[: quota - already].to(open_idx.device)]
    out = valid.clone()
    out[drop] = False
    return out


def apply_metadata_dropout(meta: dict[str, tuple[torch.Tensor, torch.Tensor]], rate: float,
                           generator: torch.Generator | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`drop_metadata` on every item type independently; dropped encodings are zeroed."""
    if rate <= 0:
        return meta
    out = {}
    for name, (x, v) in meta.items():
        nv = drop_metadata(v, rate, generator)
        shape = (-1,) + (1,) * (x.ndim - 1)
        out[name] = (x * nv.reshape(shape).to(x.dtype) if x.is_floating_point() else x, nv)
    return out


# --------------------------------------------------------------------------- datasets
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class ShardDataset(IterableDataset):
    """Items from shards.

    ``cfg.train``: an endless stream (the reference's ``resampled=True``): each (rank, worker)
    draws shards at random with its own seed and shuffles through a buffer of ``shuffle_buffer``
    samples. Otherwise: one pass in order; DataLoader workers take every n-th sample; every rank
    sees the whole set (validation metrics need all pairs, and they are identical on each rank).
    """

    def __init__(self, shards, cfg: DataConfig, seed: int = 56, shuffle_buffer: int = 1000,
                 limit: int | None = None):
        super().__init__()
        self.paths = expand_shards(shards)
        self.cfg = cfg
        self.seed = int(seed)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.limit = limit
        self.epoch = 0

    def _samples(self, paths: Sequence[str]) -> Iterator[Sample]:
        # images stay JPEG bytes until prepared (a shuffle buffer of decoded 1280 px images is GBs)
        yield from iter_samples(paths, mel_versions=self.cfg.loaded_mels, decode_image=False,
                                default_source=self.cfg.default_source)

    def __iter__(self) -> Iterator[Item]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = _rank_world()
        if not self.cfg.train:
            for i, s in enumerate(self._samples(self.paths)):
                if self.limit is not None and i >= self.limit:
                    return
                if i % nw == wid:
                    yield prepare(s, self.cfg)
            return
        stream_seed = self.seed + 1000003 * rank + 7919 * wid + 104729 * self.epoch
        gen = torch.Generator().manual_seed(stream_seed)
        rng = random.Random(stream_seed)
        buf: list[Sample] = []
        while True:
            path = self.paths[rng.randrange(len(self.paths))]
            for s in self._samples([path]):
                # keep one mel draw per buffered sample (1 MB instead of 5)
                v = self.cfg.mel_versions[rng.randrange(len(self.cfg.mel_versions))]
                s.mels = {v: s.mels[v]}
                if len(buf) < self.shuffle_buffer:
                    buf.append(s)
                    continue
                j = rng.randrange(len(buf))
                out, buf[j] = buf[j], s
                yield prepare(out, self.cfg, gen)


def make_loader(dataset: ShardDataset, batch_size: int, collate: Collate, num_workers: int = 0,
                drop_last: bool | None = None):
    from torch.utils.data import DataLoader

    if drop_last is None:
        drop_last = dataset.cfg.train
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=num_workers,
                      drop_last=drop_last, persistent_workers=False, pin_memory=torch.cuda.is_available())


__all__ = [
    "DataConfig", "Item", "ShardDataset", "Collate", "NATIVE_IMAGE_PX", "TRAIN_ZOOM_LEVELS",
    "zoom_crop", "train_view", "eval_view", "prepare", "meta_inputs", "unflatten_meta",
    "drop_metadata", "apply_metadata_dropout", "random_resized_crop_params", "make_loader",
    "tokenize_captions",
]
