"""Batched inference: uint8 chips -> image embeddings, on any device.

Chips travel as uint8 (pinned on CUDA, non-blocking copies) and are normalised on the device;
the ViT runs under bf16 autocast on GPU when asked. ``embed_block`` is the unit of work shared by
the local and the dask drivers: read one block's imagery, cut chips, embed, return arrays.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

from .errors import InputError
from .grid import Block, OutputGrid
from .imagery.base import ImagerySource
from .model import PSM, Metadata
from .store import DONE, FAULT, PENDING, BlockEmbeddings
from .tiling import (ChipBatch, ChipReader, ChipWindow, block_faults, block_valid_fraction,
                     normalize_chips, read_chip_windows)

log = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    return dev


@dataclass
class MetadataOptions:
    """Run-wide metadata: location comes from each pixel; the rest is given or masked."""

    month: int | None = None
    hour: int | None = None
    audio_source: str | int | None = None
    caption_source: str | int | None = None
    fuse: bool = True
    use_location: bool = True

    def __post_init__(self):
        Metadata(month=self.month, hour=self.hour, audio_source=self.audio_source,
                 caption_source=self.caption_source)  # validates ranges

    def for_pixels(self, lon: np.ndarray, lat: np.ndarray) -> Metadata:
        return Metadata(lat=lat if self.use_location else None, lon=lon if self.use_location else None,
                        month=self.month, hour=self.hour, audio_source=self.audio_source,
                        caption_source=self.caption_source)

    def as_dict(self) -> dict:
        """The fields as a JSON-ready dict (stored in the store's attributes)."""
        return asdict(self)


@dataclass
class Timings:
    """Seconds spent reading imagery, on the model and writing the store, and chips embedded."""

    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    chips: int = 0
    #: seconds the model's thread waited for the readers, and their mean queue depth (units ready)
    wait_s: float = 0.0
    queue_depth: float = 0.0


class ImageEmbedder:
    """Wraps a model for chip batches: ``__call__(batch) -> (z_img, mean, logvar-derived stats)``.

    ``device_cut`` (default: on CUDA): a block's window per zoom is uploaded once (uint8, pinned,
    non-blocking) and its chips are cut on the device (:func:`device_batches`) instead of being
    copied chip by chip from the host; the same code runs on CPU. ``compile``: ``torch.compile``
    of the image encoder."""

    def __init__(self, model: PSM, device: torch.device, metadata: MetadataOptions,
                 device_cut: bool | None = None, compile: bool = False):
        self.model, self.device, self.metadata = model, device, metadata
        self.pin = device.type == "cuda"
        self.calls = 0
        self.cuts_on_device = device.type == "cuda" if device_cut is None else bool(device_cut)
        if compile:
            compile_image_encoder(model)

    def __call__(self, batch: ChipBatch) -> dict[str, np.ndarray]:
        return self.heads(self._features(batch), batch.lon, batch.lat)

    def _features(self, batch: ChipBatch) -> torch.Tensor:
        self.calls += 1
        if torch.is_tensor(batch.chips):  # cut on the device already
            x = normalize_chips(batch.chips)
        else:
            chips = torch.from_numpy(batch.chips)
            if self.pin:
                chips = chips.pin_memory()
            x = normalize_chips(chips, device=self.device)
        return self.model.image_features(x, torch.full((len(batch),), batch.zoom, dtype=torch.long))

    def submit(self, batch: ChipBatch):
        """Start ``batch``; returns ``collect()`` giving :meth:`__call__`'s dict. On CUDA the outputs
        come back with non-blocking copies into pinned memory (an event marks their end), so the
        caller launches the next batch before collecting this one; elsewhere it runs at once."""
        if self.device.type != "cuda":
            out = self(batch)
            return lambda: out
        z = self._features(batch)
        md = self.metadata.for_pixels(batch.lon, batch.lat)
        emb = self.model.embed_image_features(z, md, fuse=self.metadata.fuse)
        dev = {"z_img": z.half(), "mean": emb.mean.half()}
        if emb.logvar is not None:
            dev["var_sum"], dev["uncertainty"] = emb.var_sum().float(), emb.uncertainty().float()
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                for k, v in dev.items()}
        done = torch.cuda.Event()
        done.record()
        n = len(batch)

        def collect() -> dict[str, np.ndarray]:
            done.synchronize()
            out = {k: v.numpy() for k, v in host.items()}
            out.setdefault("var_sum", np.zeros(n, np.float32))
            out.setdefault("uncertainty", np.full(n, np.nan, np.float32))
            return out

        return collect

    def heads(self, z: torch.Tensor, lon: np.ndarray, lat: np.ndarray) -> dict[str, np.ndarray]:
        md = self.metadata.for_pixels(lon, lat)
        emb = self.model.embed_image_features(z, md, fuse=self.metadata.fuse)
        out = {"z_img": z.cpu().numpy().astype(np.float16), "mean": emb.mean.cpu().numpy().astype(np.float16)}
        if emb.logvar is not None:
            out["var_sum"] = emb.var_sum().cpu().numpy().astype(np.float32)
            out["uncertainty"] = emb.uncertainty().cpu().numpy().astype(np.float32)
        else:
            out["var_sum"] = np.zeros(len(z), np.float32)
            out["uncertainty"] = np.full(len(z), np.nan, np.float32)
        return out


def read_block(block: Block, *, grid: OutputGrid, source: ImagerySource | ChipReader,
               zoom_levels: Iterable[int], need: np.ndarray | None = None,
               timings: Timings | None = None) -> dict[int, list[ChipWindow]]:
    """Read a block's imagery per zoom level on the zoom's lattice (:mod:`psm_mapping.tiling`):
    the chips of ``need`` (bool ``[Z, h, w]``: the pixels to compute; default every region
    pixel at every zoom)."""
    t0 = time.perf_counter()
    zl = [int(z) for z in zoom_levels]
    reader = source if isinstance(source, ChipReader) else ChipReader(source, grid.crs, grid.sat_type)
    region = grid.mask[block.slices]
    out = {z: read_chip_windows(reader, grid, block, z, need=region if need is None else need[k])
           for k, z in enumerate(zl)}
    if timings is not None:
        timings.read_s += time.perf_counter() - t0
    return out


def compile_image_encoder(model: PSM) -> None:
    """``torch.compile`` the ViT backbone in place (``--compile``; dynamic batch sizes)."""
    enc = model.sat_encoder.encoder
    if not getattr(enc, "_psm_compiled", False):
        enc.backbone = torch.compile(enc.backbone, dynamic=True)
        enc._psm_compiled = True


def gather_chips(data: torch.Tensor, row_offsets, col_offsets) -> torch.Tensor:
    """Chips ``[N, 3, 224, 224]`` of a window ``data`` (uint8 ``[3, H, W]``, on any device) at
    origins ``(row_offsets[n], col_offsets[n])``: a view of every chip (``unfold``), then one gather."""
    from .tiling import CHIP

    v = data.unfold(1, CHIP, 1).unfold(2, CHIP, 1)  # [3, H-223, W-223, 224, 224], a view
    ro = torch.as_tensor(np.asarray(row_offsets, np.int64), device=data.device)
    co = torch.as_tensor(np.asarray(col_offsets, np.int64), device=data.device)
    return v[:, ro, co].permute(1, 0, 2, 3).contiguous()


def device_batches(block: Block, windows: dict[int, list[ChipWindow]], batch_size: int, min_valid: float,
                   device: torch.device) -> Iterator[tuple[int, ChipBatch]]:
    """The batches of :func:`cut_batches` (same chips, same order), cut on ``device``: each window
    is uploaded once as uint8 (pinned, non-blocking on CUDA)."""
    for k, z in enumerate(windows):
        for win in windows[z]:
            ii, jj = np.nonzero(win.keep(min_valid))
            if not len(ii):
                continue
            data = torch.from_numpy(win.data)
            if device.type == "cuda":
                data = data.pin_memory()
            data = data.to(device, non_blocking=True)
            for s in range(0, len(ii), batch_size):
                bi, bj = ii[s:s + batch_size], jj[s:s + batch_size]
                yield k, ChipBatch(
                    chips=gather_chips(data, win.row_offsets[bi], win.col_offsets[bj]), zoom=win.zoom,
                    rows=win.rows[bi], cols=win.cols[bj],
                    valid_fraction=win.valid_fraction[bi, bj].astype(np.float32),
                    lon=win.lon[bi, bj], lat=win.lat[bi, bj], block=block)


def auto_batch_size(model: PSM, device: torch.device) -> int:
    """``--batch-size auto``: on CUDA from the free memory (half of it, a ViT inference step's peak
    per chip: MLP and attention activations plus the input), a power of two in 32..2048; CPU: 64."""
    if device.type != "cuda":
        return 64
    free, _ = torch.cuda.mem_get_info(device)
    vit = model.sat_encoder.encoder.backbone
    D = int(getattr(vit, "embed_dim", 768))
    heads = int(vit.blocks[0].attn.num_heads) if len(getattr(vit, "blocks", ())) else max(1, D // 64)
    tokens = 196
    per_chip = 2 * (tokens * 4 * D * 4 + heads * tokens * tokens * 4) + 3 * 224 * 224 * 5
    n = int(0.5 * free // per_chip)
    return int(max(32, min(2048, 1 << max(5, n.bit_length() - 1))))


def cut_batches(block: Block, windows: dict[int, list[ChipWindow]], batch_size: int = 64,
                min_valid: float = 0.5) -> Iterator[tuple[int, ChipBatch]]:
    """``(zoom index, batch)`` of a block's windows, in the order :func:`embed_windows` embeds them
    (reader threads cut ahead with it, :mod:`psm_mapping.pipeline`)."""
    for k, z in enumerate(windows):
        for win in windows[z]:
            yield from ((k, b) for b in win.batches(batch_size, min_valid, block))


def embed_windows(block: Block, windows: dict[int, list[ChipWindow]], embedder: ImageEmbedder,
                  batch_size: int = 64, min_valid: float = 0.5,
                  timings: Timings | None = None,
                  batches: Iterable[tuple[int, ChipBatch]] | None = None) -> BlockEmbeddings:
    """Cut chips from a block's windows, embed them, and assemble the block's arrays. Pixels
    asked for get status DONE (embedded, or NaN below ``min_valid``) or FAULT (the chip
    touches a failed read: NaN, not embedded); the others stay PENDING. ``batches``: the
    block's batches cut already (:func:`cut_batches`, e.g. by reader threads)."""
    zl = tuple(windows)
    h, w, D = block.height, block.width, embedder.model.config.fc_dim
    Z = len(zl)
    res = BlockEmbeddings(
        block=block,
        z_img=np.full((Z, h, w, D), np.nan, np.float16), mean=np.full((Z, h, w, D), np.nan, np.float16),
        var_sum=np.full((Z, h, w), np.nan, np.float32), uncertainty=np.full((Z, h, w), np.nan, np.float32),
        valid=np.full((Z, h, w), np.nan, np.float32), status=np.full((Z, h, w), PENDING, np.uint8),
    )
    t = timings if timings is not None else Timings()
    for k, z in enumerate(zl):
        res.valid[k] = block_valid_fraction(block, windows[z])
        asked = np.isfinite(res.valid[k])
        res.status[k][asked] = DONE
        res.status[k][block_faults(block, windows[z])] = FAULT
        res.valid[k][res.status[k] == FAULT] = np.nan
        res.faults += sum(win.faults for win in windows[z])
    if batches is not None:
        todo = batches
    elif getattr(embedder, "cuts_on_device", False):
        todo = device_batches(block, windows, batch_size, min_valid, embedder.device)
    else:
        todo = cut_batches(block, windows, batch_size, min_valid)
    def store(k, batch, out):
        r, c = batch.rows - block.row_off, batch.cols - block.col_off
        for name in ("z_img", "mean", "var_sum", "uncertainty"):
            getattr(res, name)[k, r, c] = out[name]
        res.chips += len(batch)
        t.chips += len(batch)

    submit = getattr(embedder, "submit", None)
    pending = None  # the previous batch: collected after the next one is launched (CUDA)
    for k, batch in todo:
        t0 = time.perf_counter()
        if submit is None:
            store(k, batch, embedder(batch))
        else:
            collect = submit(batch)
            if pending is not None:
                store(pending[0], pending[1], pending[2]())
            pending = (k, batch, collect)
        t.model_s += time.perf_counter() - t0
    if pending is not None:
        t0 = time.perf_counter()
        store(pending[0], pending[1], pending[2]())
        t.model_s += time.perf_counter() - t0
    return res


def embed_block(block: Block, *, grid: OutputGrid, source: ImagerySource | ChipReader,
                embedder: ImageEmbedder, zoom_levels: Iterable[int], batch_size: int = 64,
                min_valid: float = 0.5, need: np.ndarray | None = None,
                timings: Timings | None = None) -> BlockEmbeddings:
    """The unit of work: one block's imagery read, chips cut and embedded, arrays assembled
    (only the pixels of ``need``, see :func:`read_block`)."""
    windows = read_block(block, grid=grid, source=source, zoom_levels=zoom_levels, need=need,
                         timings=timings)
    return embed_windows(block, windows, embedder, batch_size, min_valid, timings)
