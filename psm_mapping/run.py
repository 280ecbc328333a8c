"""The local driver: region -> grid -> imagery -> chips -> embeddings (store) -> query maps -> outputs.

``map_region(MapConfig(...))`` is what ``psm-map REGION --query ...`` calls; a notebook can call it
too. Blocks run in order with prefetch (block k+1 is read while block k is on the model); the dask
driver (``distributed.py``) calls the same ``embed_block`` per block.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .constants import DEFAULT_ZOOM_LEVELS
from .embed import ImageEmbedder, MetadataOptions, Timings, embed_windows, read_block, resolve_device
from .errors import CheckpointError, ImageryError, InputError, OutputError, StoreError
from .grid import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PIXELS, OutputGrid, make_grid
from .model.checkpoint import file_sha256
from .outputs import (FORMAT_SUFFIXES, build_map_result, default_preview_dir, describe_outputs, stac_path,
                      write_outputs)
from .query import QueryMaps, build_queries, query_store
from .store import EmbeddingStore, StoreSpec

log = logging.getLogger(__name__)


@dataclass
class MapConfig:
    """Everything a map run needs. Paths are strings or Paths; ``imagery`` is a spec for
    :func:`psm_mapping.imagery.open_source` (path, ``xyz:URL``, ``stac:URL`` or preset)."""

    region: str | None = None
    imagery: str | None = None
    queries: Sequence[str] = ()
    audio: Sequence[str] = ()
    combine: bool = False
    bbox: str | Sequence[float] | None = None
    feature: str | None = None
    checkpoint: str | None = None
    clap_config: str | None = None
    tokenizer: str | None = None
    zoom_levels: Sequence[int] = DEFAULT_ZOOM_LEVELS
    stride: float | None = None
    crs: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    month: int | None = None
    hour: int | None = None
    audio_source: str | None = None
    caption_source: str | None = None
    fuse: bool = True
    out: str = "psm-map.tif"
    format: str = "cog"
    previews: bool = True
    score: bool = False
    store: str | None = None
    overwrite: bool = False
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 64
    block_size: int = DEFAULT_BLOCK_SIZE
    min_valid: float = 0.5
    progress: bool = True
    imagery_options: dict = field(default_factory=dict)
    extra_tags: dict = field(default_factory=dict)
    #: fsspec storage options for a remote ``store`` URL (e.g. S3 ``key``/``secret``/``client_kwargs``)
    store_options: dict = field(default_factory=dict)


@dataclass
class MapRun:
    """What a run produced and what it cost."""

    outputs: dict[str, Any]
    store: str
    pixels: int
    chips: int
    blocks_total: int
    blocks_computed: int
    image_model_calls: int
    seconds: dict[str, float]
    faults: int = 0
    #: dask runs only: blocks that ran more than once (worker lost or task error retried)
    blocks_retried: int | None = None

    def summary(self) -> str:
        s = self.seconds
        retried = "" if self.blocks_retried is None else f"; blocks retried {self.blocks_retried}"
        lines = [f"pixels {self.pixels:,}; chips embedded {self.chips:,}; blocks {self.blocks_computed} "
                 f"computed / {self.blocks_total} total{retried}; tile faults {self.faults}",
                 "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()),
                 f"store: {self.store}"]
        for k, v in self.outputs.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


def resolve_checkpoint(path: str | None) -> Path:
    """``--checkpoint`` (a path, or an official experiment name found in the cache), else
    ``$PSM_CHECKPOINT``, else the single file in the cache folder."""
    from .weights import EXPERIMENTS, cache_dir

    path = path or os.environ.get("PSM_CHECKPOINT")
    if path:
        p = Path(path).expanduser()
        if not p.exists() and str(path) in EXPERIMENTS:
            cached = cache_dir() / f"{path}.ckpt"
            if not cached.is_file():
                raise CheckpointError(f"checkpoint {path} is not in the cache {cache_dir()}: run "
                                      f"`psm-map weights download {path}` (needs a network) or pass "
                                      "--checkpoint PATH")
            return cached
        return p

    found = sorted(cache_dir().glob("*.ckpt")) + sorted(cache_dir().glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise CheckpointError("no checkpoint given: pass --checkpoint PATH, set PSM_CHECKPOINT, or "
                          "`psm-map weights download NAME` (list: `psm-map weights`)"
                          + (f"; the cache {cache_dir()} holds {len(found)} files, pick one" if found else ""))


def _check_output(out: str, overwrite: bool, previews: bool = False) -> None:
    """Refuse early (before any long work) what the writers would refuse at the end."""
    if "://" in str(out):
        return
    p = Path(out)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output folder {parent} does not exist: create it or choose another --out")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {parent} is not writable: choose another --out")
    if p.exists() and not overwrite:
        raise OutputError(f"{p} exists: pass --overwrite to replace it, or choose another --out")
    if not overwrite and stac_path(p).exists():
        raise OutputError(f"STAC item {stac_path(p)} exists: pass --overwrite to replace it, or choose "
                          "another --out", option="out")
    if previews and not overwrite:
        pd = default_preview_dir(p)
        if pd.exists():
            raise OutputError(f"preview folder {pd} exists: pass --overwrite to replace it, "
                              "--no-previews, or choose another --out")


#: the largest zoom level a map accepts (chip = zoom x base tile; trained on 1, 3, 5)
MAX_ZOOM_LEVEL = 5


def _check_format(out: str, fmt: str) -> None:
    """The --out name must end as the format writes it (a COG named .png or .zarr misleads)."""
    if fmt not in FORMAT_SUFFIXES:
        raise InputError(f"--format {fmt!r} is not supported: use cog or zarr")
    name = str(out).rstrip("/").lower()
    if not name.endswith(FORMAT_SUFFIXES[fmt]):
        hint = " or pass --format zarr" if name.endswith(".zarr") else (
            " or pass --format cog" if name.endswith((".tif", ".tiff")) else "")
        raise OutputError(f"--out {out} does not match --format {fmt}: name it *"
                          f"{FORMAT_SUFFIXES[fmt][0]} for a {fmt.upper() if fmt == 'cog' else 'Zarr'} output{hint}")


def default_store_dir(out: str) -> str:
    if "://" in str(out):
        return str(out).rstrip("/") + ".psm-store"
    return str(Path(out).parent / "psm-store")


def compute_dtype(dtype: str, device) -> str:
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def load_model(cfg: MapConfig):
    from .model import PSM

    device = resolve_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.checkpoint)
    model = PSM.from_checkpoint(ckpt, clap_config=cfg.clap_config, device=device,
                                dtype=compute_dtype(cfg.dtype, device))
    return model, ckpt, device


def metadata_tags(model, md: MetadataOptions) -> dict[str, str]:
    """The ``fusion`` and ``metadata`` provenance tags of a map made with ``md``."""
    return {"fusion": "on" if (md.fuse and model.config.uses_metadata) else "off",
            "metadata": ", ".join(f"{k}={v}" for k, v in md.as_dict().items() if v is not None)}


def provenance(model, ckpt_sha: str, source, grid: OutputGrid, md: MetadataOptions, cfg: MapConfig) -> dict:
    """Provenance tags of a map and its store: model and checkpoint, grid and zooms, metadata,
    imagery source and attribution (the queries are added per map by :func:`build_map_result`)."""
    hp = model.source.get("hyper_parameters", {})
    tags = {
        "software": f"psm-mapping {__version__}",
        "model": "PSM (Khanal et al., ACM MM 2024)",
        "checkpoint": Path(model.source.get("path", "")).name,
        "checkpoint_sha256": ckpt_sha,
        "loss_type": model.config.loss_type,
        "sat_type": model.config.sat_type,
        "metadata_type": model.config.metadata_type,
        "zoom_levels": ",".join(str(z) for z in cfg.zoom_levels),
        "stride_m": f"{grid.stride:g}",
        "crs": grid.crs.to_string(),
        **metadata_tags(model, md),
        "region": grid.region_name,
    }
    if hp.get("untrained"):
        tags["weights"] = "UNTRAINED (demo checkpoint with random weights: the map is meaningless)"
        tags["untrained_weights"] = "true"  # the writers' HTML page shows a warning for it
    tags.update(source.info.tags())
    tags.update({k: str(v) for k, v in cfg.extra_tags.items()})
    return tags


def compute_store(store: EmbeddingStore, grid: OutputGrid, source, embedder: ImageEmbedder,
                  cfg: MapConfig, timings: Timings) -> tuple[int, int, int]:
    """Embed every block that is not done yet, with prefetch. Returns (computed, total, faults)."""
    from tqdm.auto import tqdm

    blocks = list(grid.blocks(cfg.block_size))
    todo = [b for b in blocks if not store.is_done(b)]
    faults = 0
    if not todo:
        return 0, len(blocks), 0
    px = sum(int(grid.mask[b.slices].sum()) for b in todo) * len(cfg.zoom_levels)
    bar = tqdm(total=px, unit="chip", desc="embedding", disable=not cfg.progress, smoothing=0.1)
    zl = tuple(cfg.zoom_levels)
    read = lambda b: read_block(b, grid=grid, source=source, zoom_levels=zl)  # noqa: E731
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="psm-prefetch") as pool:
            fut = pool.submit(_timed, read, todo[0])
            for k, b in enumerate(todo):
                windows, dt = fut.result()
                timings.read_s += dt
                if k + 1 < len(todo):
                    fut = pool.submit(_timed, read, todo[k + 1])
                res = embed_windows(b, windows, embedder, cfg.batch_size, cfg.min_valid, timings)
                t0 = time.perf_counter()
                store.write_block(res)
                timings.write_s += time.perf_counter() - t0
                faults += res.faults
                bar.update(int(grid.mask[b.slices].sum()) * len(zl))
    finally:
        bar.close()
    return len(todo), len(blocks), faults


def _timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


@dataclass
class PreparedRun:
    """Everything both drivers (local and dask) need before the block loop. ``source`` is open:
    the caller closes it (``with prep.source: ...``)."""

    cfg: MapConfig
    md: MetadataOptions
    model: Any
    ckpt: Path
    device: Any
    sha: str
    queries: list
    region: Any
    grid: OutputGrid
    source: Any
    spec: StoreSpec
    store_url: str
    store: EmbeddingStore
    tags: dict
    t_start: float


def prepare_run(cfg: MapConfig, log_fn=print) -> PreparedRun:
    """Check the inputs, load model and queries, build the grid, open the imagery and the store."""
    from .imagery import open_source
    from .region import load_region

    t_start = time.perf_counter()
    _check_format(cfg.out, cfg.format)
    if not cfg.imagery:
        raise InputError("no imagery given: pass --imagery PATH|xyz:URL|stac:URL|PRESET "
                         "(`psm-map --imagery` lists the presets)")
    if not cfg.queries and not cfg.audio:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    _check_output(cfg.out, cfg.overwrite, cfg.previews)
    _check_store_root(cfg.store)
    _check_numbers(cfg)
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    region = load_region(cfg.region, bbox=cfg.bbox, feature=cfg.feature)
    # model, tokenizer and query files next: their errors come before any long work
    model, ckpt, device = load_model(cfg)
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    grid = make_grid(region, stride=cfg.stride, crs=cfg.crs, sat_type=model.config.sat_type,
                     zoom_levels=tuple(cfg.zoom_levels), max_pixels=cfg.max_pixels)
    log_fn(f"grid: {grid.width} x {grid.height} px of {grid.stride:g} m in {grid.crs.to_string()}; "
           f"{grid.estimate(cfg.block_size)}")
    source = open_source(cfg.imagery, **cfg.imagery_options)
    try:
        _check_overlap(source, region)
        if callable(getattr(source, "prepare", None)):
            source.prepare(region.bounds)  # searching sources (STAC) fail here, before the store exists
        _warn_imagery_mismatch(source, model.config.sat_type, cfg.zoom_levels)
        sha = file_sha256(ckpt)
        spec = StoreSpec.for_grid(grid, block_size=cfg.block_size, zoom_levels=cfg.zoom_levels,
                                  checkpoint_sha256=sha, imagery=cfg.imagery, min_valid=cfg.min_valid,
                                  fc_dim=model.config.fc_dim, probabilistic=model.config.probabilistic)
        store_url = _store_url(cfg, spec)
        tags = provenance(model, sha, source, grid, md, cfg)
        store = EmbeddingStore.open_or_create(store_url, spec, attrs={
            "provenance": tags, "metadata_options": md.as_dict(), "region_name": grid.region_name,
            "checkpoint_path": str(Path(ckpt).resolve())}, storage_options=cfg.store_options or None)
    except BaseException:
        source.close()
        raise
    return PreparedRun(cfg, md, model, Path(ckpt), device, sha, queries, region, grid, source, spec,
                       store_url, store, tags, t_start)


def map_region(cfg: MapConfig, log_fn=print) -> MapRun:
    """Run the whole pipeline for ``cfg``; see :class:`MapConfig`."""
    prep = prepare_run(cfg, log_fn)
    t_setup = time.perf_counter()
    store, grid = prep.store, prep.grid
    with prep.source as source:
        timings = Timings()
        embedder = ImageEmbedder(prep.model, prep.device, MetadataOptions(**store.attrs["metadata_options"]))
        computed, total, faults = compute_store(store, grid, source, embedder, cfg, timings)
    if faults:
        log.warning("%d imagery tiles failed and were masked (see warnings above)", faults)
    t_embed = time.perf_counter()
    maps = query_store(store, prep.queries, model=prep.model, metadata=prep.md)
    t_query = time.perf_counter()
    result = build_map_result(maps, grid, prep.tags, prep.region, score=cfg.score)
    outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite,
                            progress=cfg.progress)
    t_end = time.perf_counter()
    return MapRun(
        outputs=describe_outputs(outputs), store=prep.store_url, pixels=grid.pixel_count,
        chips=timings.chips, blocks_total=total, blocks_computed=computed,
        image_model_calls=embedder.calls, faults=faults,
        seconds={"setup": t_setup - prep.t_start, "read": timings.read_s, "model": timings.model_s,
                 "store_write": timings.write_s, "embed_total": t_embed - t_setup,
                 "query": t_query - t_embed, "write": t_end - t_query, "total": t_end - prep.t_start},
    )


def _check_numbers(cfg: MapConfig) -> None:
    """Cheap range checks, before the model loads."""
    import math

    if cfg.stride is not None:
        try:
            stride = float(cfg.stride)
        except (TypeError, ValueError):
            raise InputError(f"--stride {cfg.stride!r} is not a number: give metres, e.g. --stride 40") from None
        if not math.isfinite(stride) or stride <= 0:
            raise InputError(f"--stride {cfg.stride:g} must be positive: give the pixel size in metres, e.g. --stride 40")
    if not cfg.zoom_levels or any(int(z) < 1 for z in cfg.zoom_levels):
        raise InputError(f"bad --zoom-level {tuple(cfg.zoom_levels)}: give positive integers, e.g. 1,3,5")
    if any(int(z) > MAX_ZOOM_LEVEL for z in cfg.zoom_levels):
        raise InputError(f"--zoom-level {tuple(cfg.zoom_levels)} is outside the trained range: PSM zoom levels "
                         f"are chip-size multipliers 1..{MAX_ZOOM_LEVEL} (trained on 1,3,5), not web-map "
                         "zooms: give e.g. 1,3,5")
    for name, v in (("--batch-size", cfg.batch_size), ("--block-size", cfg.block_size),
                    ("--max-pixels", cfg.max_pixels)):
        if int(v) < 1:
            raise InputError(f"{name} {v} must be at least 1: give a positive whole number")
    if not 0.0 <= float(cfg.min_valid) <= 1.0:
        raise InputError(f"--min-valid {cfg.min_valid} must be in [0, 1]: give the minimum valid fraction of a chip, e.g. 0.5")


def _check_store_root(root: str | None) -> None:
    """A local --store must be a folder (or not exist yet)."""
    if root and "://" not in str(root) and Path(root).exists() and not Path(root).is_dir():
        raise StoreError(f"--store {root} is a file, not a folder: pass a folder for the embedding "
                         "stores (it is created if missing)")


def _store_url(cfg: MapConfig, spec: StoreSpec) -> str:
    root = cfg.store or default_store_dir(cfg.out)
    if "://" not in root:
        _check_store_root(root)
        Path(root).mkdir(parents=True, exist_ok=True)
        return str(Path(root) / f"{spec.key()}.zarr")
    return root.rstrip("/") + f"/{spec.key()}.zarr"


def _warn_imagery_mismatch(source, sat_type: str, zoom_levels) -> None:
    """Warn when the imagery is not what the checkpoint was trained on (the map still runs)."""
    from .constants import chip_resolution_m

    hint = source.info.extra.get("sat_type")
    if hint and hint != sat_type:
        log.warning("imagery %s is meant for %s checkpoints but this checkpoint is %s: the map is "
                    "outside the training distribution", source.info.name, hint, sat_type)
    native = source.info.native_resolution
    finest = chip_resolution_m(sat_type, min(int(z) for z in zoom_levels))
    if native and native > 3 * finest:
        log.warning("imagery %s has %.3g m pixels but zoom-%d chips ask for %.3g m: chips will be "
                    "blurry upsamplings; use finer imagery or higher zoom levels", source.info.name,
                    native, min(int(z) for z in zoom_levels), finest)


def _check_overlap(source, region) -> None:
    fp = source.footprint_lonlat()
    if fp is None:
        return
    from shapely.geometry import box

    w, s, e, n = fp
    geom = region.unwrapped() if hasattr(region, "unwrapped") else region.geometry
    if not geom.intersects(box(w, s, e, n)) and not region.geometry.intersects(box(w, s, e, n)):
        raise ImageryError(f"the region does not overlap the imagery ({source.info.name} covers lon "
                           f"{w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f}): check the region or choose "
                           "another --imagery")


def map_from_store(store_url: str, cfg: MapConfig, log_fn=print) -> MapRun:
    """Maps from an existing store: no imagery and no image inference, only the query pass."""
    t0 = time.perf_counter()
    _check_format(cfg.out, cfg.format)
    store = EmbeddingStore.open(store_url, storage_options=cfg.store_options or None)
    _check_output(cfg.out, cfg.overwrite, cfg.previews)
    prov = dict(store.attrs.get("provenance", {}))
    if not cfg.checkpoint and not os.environ.get("PSM_CHECKPOINT"):
        cfg.checkpoint = store.attrs.get("checkpoint_path")
    model, ckpt, _ = load_model(cfg)
    sha = file_sha256(ckpt)
    if sha != store.spec.checkpoint_sha256:
        raise StoreError(f"{Path(ckpt).name} is not the checkpoint this store was built with "
                         f"(sha256 {sha[:12]} != {store.spec.checkpoint_sha256[:12]}): pass the same --checkpoint")
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    t1 = time.perf_counter()
    maps = query_store(store, queries, model=model, metadata=md)
    prov.update(metadata_tags(model, md))
    result = build_map_result(maps, store, prov, None, score=cfg.score)
    outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite,
                            progress=cfg.progress)
    t2 = time.perf_counter()
    done = store.done_mask()
    return MapRun(describe_outputs(outputs), store_url, int(np.isfinite(maps.similarity[0][0]).sum()),
                  0, int(done.sum()), 0, 0, {"setup": t1 - t0, "query": t2 - t1, "total": t2 - t0})
