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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import __version__
from .constants import DEFAULT_ZOOM_LEVELS, FULL_METADATA
from .embed import ImageEmbedder, MetadataOptions, Timings, embed_windows, read_block, resolve_device
from .errors import CheckpointError, ImageryError, InputError, OutputError
from .grid import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PIXELS, OutputGrid, make_grid
from .model.checkpoint import file_sha256
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

    def summary(self) -> str:
        s = self.seconds
        lines = [f"pixels {self.pixels:,}; chips embedded {self.chips:,}; blocks {self.blocks_computed} "
                 f"computed / {self.blocks_total} total; tile faults {self.faults}",
                 "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()),
                 f"store: {self.store}"]
        for k, v in self.outputs.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


def resolve_checkpoint(path: str | None) -> Path:
    """``--checkpoint``, else ``$PSM_CHECKPOINT``, else the single file in the cache folder."""
    if path:
        return Path(path)
    env = os.environ.get("PSM_CHECKPOINT")
    if env:
        return Path(env)
    from .weights import cache_dir

    found = sorted(cache_dir().glob("*.ckpt")) + sorted(cache_dir().glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    raise CheckpointError("no checkpoint given: pass --checkpoint PATH, set PSM_CHECKPOINT, or "
                          "`psm-map weights download NAME` (list: `psm-map weights`)"
                          + (f"; the cache {cache_dir()} holds {len(found)} files, pick one" if found else ""))


def _check_output(out: str, overwrite: bool) -> None:
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


def default_store_dir(out: str) -> str:
    if "://" in str(out):
        return str(out).rstrip("/") + ".psm-store"
    return str(Path(out).parent / "psm-store")


def _compute_dtype(dtype: str, device) -> str:
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    return dtype


def load_model(cfg: MapConfig):
    from .model import PSM

    device = resolve_device(cfg.device)
    ckpt = resolve_checkpoint(cfg.checkpoint)
    model = PSM.from_checkpoint(ckpt, clap_config=cfg.clap_config, device=device,
                                dtype=_compute_dtype(cfg.dtype, device))
    return model, ckpt, device


def provenance(model, ckpt_sha: str, source, grid: OutputGrid, md: MetadataOptions, cfg: MapConfig) -> dict:
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
        "fusion": "on" if (md.fuse and model.config.uses_metadata) else "off",
        "metadata": ", ".join(f"{k}={v}" for k, v in md.as_dict().items() if v is not None),
        "region": grid.region_name,
    }
    if hp.get("untrained"):
        tags["weights"] = "UNTRAINED (demo checkpoint with random weights: the map is meaningless)"
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


def _describe_outputs(outputs: dict) -> dict[str, str]:
    out = {}
    for k, v in outputs.items():
        if isinstance(v, (list, tuple)):
            out[k] = f"{len(v)} files in {Path(v[0]).parent}" if v else "none"
        else:
            out[k] = str(v)
    return out


def _timed(fn, *a):
    t0 = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t0


def map_region(cfg: MapConfig, log_fn=print) -> MapRun:
    """Run the whole pipeline for ``cfg``; see :class:`MapConfig`."""
    from .imagery import open_source
    from .region import load_region

    t_start = time.perf_counter()
    if cfg.format not in ("cog", "zarr"):
        raise InputError(f"--format {cfg.format!r} is not supported: use cog or zarr")
    if not cfg.imagery:
        raise InputError("no imagery given: pass --imagery PATH|xyz:URL|stac:URL|PRESET "
                         "(`psm-map --imagery` lists the presets)")
    if not cfg.queries and not cfg.audio:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    _check_output(cfg.out, cfg.overwrite)
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    # model, tokenizer and query files first: their errors come before any long work
    model, ckpt, device = load_model(cfg)
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    region = load_region(cfg.region, bbox=cfg.bbox, feature=cfg.feature)
    grid = make_grid(region, stride=cfg.stride, crs=cfg.crs, sat_type=model.config.sat_type,
                     zoom_levels=tuple(cfg.zoom_levels), max_pixels=cfg.max_pixels)
    log_fn(f"grid: {grid.width} x {grid.height} px of {grid.stride:g} m in {grid.crs.to_string()}; "
           f"{grid.estimate(cfg.block_size)}")
    t_setup = time.perf_counter()
    with open_source(cfg.imagery, **cfg.imagery_options) as source:
        _check_overlap(source, region)
        sha = file_sha256(ckpt)
        spec = StoreSpec.for_grid(grid, block_size=cfg.block_size, zoom_levels=cfg.zoom_levels,
                                  checkpoint_sha256=sha, imagery=cfg.imagery, min_valid=cfg.min_valid,
                                  fc_dim=model.config.fc_dim, probabilistic=model.config.probabilistic)
        store_url = _store_url(cfg, spec)
        tags = provenance(model, sha, source, grid, md, cfg)
        store = EmbeddingStore.open_or_create(store_url, spec, attrs={
            "provenance": tags, "metadata_options": md.as_dict(), "region_name": grid.region_name,
            "checkpoint_path": str(Path(ckpt).resolve())})
        timings = Timings()
        embedder = ImageEmbedder(model, device, MetadataOptions(**store.attrs["metadata_options"]))
        computed, total, faults = compute_store(store, grid, source, embedder, cfg, timings)
    if faults:
        log.warning("%d imagery tiles failed and were masked (see warnings above)", faults)
    t_embed = time.perf_counter()
    maps = query_store(store, queries, model=model, metadata=md)
    t_query = time.perf_counter()
    result = build_map_result(maps, grid, tags, region, score=cfg.score)
    from .writers import write_outputs

    outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite)
    t_end = time.perf_counter()
    return MapRun(
        outputs=_describe_outputs(outputs), store=store_url, pixels=grid.pixel_count,
        chips=timings.chips, blocks_total=total, blocks_computed=computed,
        image_model_calls=embedder.calls, faults=faults,
        seconds={"setup": t_setup - t_start, "read": timings.read_s, "model": timings.model_s,
                 "store_write": timings.write_s, "embed_total": t_embed - t_setup,
                 "query": t_query - t_embed, "write": t_end - t_query, "total": t_end - t_start},
    )


def _store_url(cfg: MapConfig, spec: StoreSpec) -> str:
    root = cfg.store or default_store_dir(cfg.out)
    if "://" not in root:
        Path(root).mkdir(parents=True, exist_ok=True)
        return str(Path(root) / f"{spec.key()}.zarr")
    return root.rstrip("/") + f"/{spec.key()}.zarr"


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


def build_map_result(maps: QueryMaps, grid_or_store, tags: dict, region=None, score: bool = False):
    """Bands per (query, zoom) plus uncertainty per zoom, NaN outside the region."""
    from affine import Affine
    from pyproj import CRS

    from .writers import MapBand, MapResult

    if isinstance(grid_or_store, OutputGrid):
        crs, transform, mask = grid_or_store.crs, grid_or_store.transform, grid_or_store.mask
    else:
        spec = grid_or_store.spec
        crs, transform = CRS.from_wkt(spec.crs_wkt), Affine(*spec.transform)
        mask = None
    bands = []
    probabilistic = any(q.embedding.logvar is not None for q in maps.queries)
    for qi, q in enumerate(maps.queries):
        sc = maps.score(qi) if score else None
        for k, z in enumerate(maps.zoom_levels):
            data = _masked(maps.similarity[qi][k], mask)
            what = "similarity (negative csd)" if probabilistic else "similarity (cosine)"
            bands.append(MapBand(f"similarity:{q.label}:z{z}", data,
                                 f"{what} to {q.kind} query '{q.label}' at zoom {z}", "similarity", q.label, z))
            if sc is not None:
                bands.append(MapBand(f"score:{q.label}:z{z}", _masked(sc[k], mask),
                                     f"0-1 score for '{q.label}' at zoom {z}", "score", q.label, z))
    if probabilistic:
        for k, z in enumerate(maps.zoom_levels):
            bands.append(MapBand(f"uncertainty:z{z}", _masked(maps.uncertainty[k], mask),
                                 f"image embedding uncertainty (std norm) at zoom {z}", "uncertainty", None, z))
    t = dict(tags)
    t["queries"] = " | ".join(f"{q.kind}:{q.label}" for q in maps.queries)
    geojson = None
    if region is not None:
        from shapely.geometry import mapping

        geojson = mapping(region.geometry)
    return MapResult(bands, crs, transform, t, geojson)


def _masked(a: np.ndarray, mask) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a if mask is None else np.where(mask, a, np.nan).astype(np.float32)


def map_from_store(store_url: str, cfg: MapConfig, log_fn=print) -> MapRun:
    """Maps from an existing store: no imagery and no image inference, only the query pass."""
    from .errors import StoreError
    from .writers import write_outputs

    t0 = time.perf_counter()
    store = EmbeddingStore.open(store_url)
    _check_output(cfg.out, cfg.overwrite)
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
    prov["metadata"] = ", ".join(f"{k}={v}" for k, v in md.as_dict().items() if v is not None)
    prov["fusion"] = "on" if (md.fuse and model.config.uses_metadata) else "off"
    result = build_map_result(maps, store, prov, None, score=cfg.score)
    outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite)
    t2 = time.perf_counter()
    done = store.done_mask()
    return MapRun(_describe_outputs(outputs), store_url, int(np.isfinite(maps.similarity[0][0]).sum()),
                  0, int(done.sum()), 0, 0, {"setup": t1 - t0, "query": t2 - t1, "total": t2 - t0})
