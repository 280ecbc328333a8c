"""The builder: region -> grid -> imagery -> chips -> embeddings (store); the answer (maps or a
cube, then outputs) is :mod:`psm_mapping.answer`'s.

``map_region(MapConfig(...))`` is what ``psm-map REGION --query ...`` calls; a notebook can call it
too. Blocks run in order with prefetch (block k+1 is read while block k is on the model); the dask
driver (``distributed.py``) calls the same ``embed_block`` per block.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .checks import (_check_overlap, _check_output, _check_store_root, _store_url,  # noqa: F401
                     _warn_imagery_mismatch)
from .config import MapConfig, default_imagery  # noqa: F401  (public here too)
from .embed import (ImageEmbedder, MetadataOptions, Timings, cut_batches, embed_windows, read_block,
                    resolve_device)
from .pipeline import PipelineStats, default_readers, stream_units
from .errors import ImageryError, InputError
from .grid import OutputGrid, make_grid
from .tiling import ChipReader
from .offline import set_offline
from .model.checkpoint import file_sha256
from .answer import answer_store, check_answer
from .outcome import MapRun, fault_message  # noqa: F401  (public here too)
from .query import build_queries
from .store import FAULT, BlockLocks, CorruptChunkError, EmbeddingStore, StoreSpec, lock_key
from .session import load_model, metadata_tags, record_text_setup
from .zoomgrid import zoom_factors, zoom_grid

log = logging.getLogger(__name__)


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


@dataclass
class StoreFill:
    """What :func:`compute_store` did: blocks, failed reads, pixel-zooms masked for them."""

    blocks_total: int = 0
    blocks_computed: int = 0
    faults: int = 0
    fault_pixels: int = 0
    pixels: int = 0


def region_need(store: EmbeddingStore, grid: OutputGrid, block, status=None) -> np.ndarray:
    """bool ``[Z, h, w]``: the block's region pixels that the store has not computed (DONE).
    ``grid``: the grid of the block's zooms (:func:`zoom_plan`; the output grid when dense)."""
    return store.pending(block, grid.mask[block.slices], status)


def zoom_plan(store: EmbeddingStore, grid: OutputGrid) -> list[tuple[tuple[int, int] | None, tuple[int, ...], OutputGrid]]:
    """``[(zooms, zoom levels, grid)]``: what a run computes, per zoom grid of the store. Dense:
    one entry, every zoom on the output grid (``zooms`` None); scale-true: each zoom grid with
    its mask = the cells the region's pixels are interpolated from."""
    zl = tuple(int(z) for z in store.spec.zoom_levels)
    if store.spec.dense:
        return [(None, zl, grid)]
    return [(g.zooms, zl[slice(*g.zooms)], zoom_grid(grid, g)) for g in store.groups]


def work_units(store: EmbeddingStore, grid: OutputGrid, block_size: int, status=None):
    """``[(block, zoom levels, grid)]`` of every block holding pixels to compute, zoom grid by zoom
    grid (dense: the output grid's blocks, every zoom). ``status``: the store's, read once."""
    from dataclasses import replace

    status = store.status() if status is None else status
    out = []
    for zooms, zl, zg in zoom_plan(store, grid):
        for b in zg.blocks(block_size):
            b = b if zooms is None else replace(b, zooms=zooms)
            if region_need(store, zg, b, status[(b.zoom_slice, *b.slices)]).any():
                out.append((b, zl, zg))
    return out


def compute_store(store: EmbeddingStore, grid: OutputGrid, source, embedder: ImageEmbedder,
                  cfg: MapConfig, timings: Timings, log_fn=print) -> StoreFill:
    """Embed every region pixel the store lacks (not DONE: never computed, or a read fault of
    an earlier run), block by block with prefetch. Blocks another live run is computing are
    left to it and waited for at the end (lock files, :class:`BlockLocks`)."""
    from tqdm.auto import tqdm

    status = store.status()
    fill = StoreFill(blocks_total=sum(1 for zooms, zl, zg in zoom_plan(store, grid)
                                      for _ in zg.blocks(cfg.block_size)))
    units = work_units(store, grid, cfg.block_size, status)
    if not units:
        return fill
    fill.pixels = sum(int(region_need(store, zg, b, status[(b.zoom_slice, *b.slices)]).sum())
                      for b, zl, zg in units)
    reader = ChipReader(source, grid.crs, grid.sat_type)
    locks = BlockLocks(store.url)
    queue, deferred = list(units), []

    def claim():
        while queue:
            u = queue.pop(0)
            if locks.acquire(lock_key(u[0])):
                return u
            deferred.append(u)
        return None

    def read(u):
        b, zl, zg = u
        need = region_need(store, zg, b)  # fresh: another run may have done part of it
        if not need.any():
            return None, need
        return read_block(b, grid=zg, source=reader, zoom_levels=zl, need=need), need

    def embed(u, windows, need, batches=None):
        b = u[0]
        if windows is not None:
            res = embed_windows(b, windows, embedder, cfg.batch_size, cfg.min_valid, timings, batches)
            t0 = time.perf_counter()
            store.write_block(res)
            timings.write_s += time.perf_counter() - t0
            fill.blocks_computed += 1
            fill.faults += res.faults
            fill.fault_pixels += res.fault_pixels
        locks.release(lock_key(b))
        bar.update(int(need.sum()))

    bar = tqdm(total=fill.pixels, unit="chip", desc="embedding", disable=not cfg.progress,
               smoothing=0.1)
    readers = default_readers() if cfg.readers is None else int(cfg.readers)
    host_cut = not getattr(embedder, "cuts_on_device", False)

    def cut(u, result):
        windows, _ = result
        return iter(()) if windows is None else cut_batches(u[0], windows, cfg.batch_size, cfg.min_valid)

    try:
        if readers == 0:  # the single prefetch thread of earlier versions (chips cut here)
            with ThreadPoolExecutor(1, thread_name_prefix="psm-prefetch") as pool:
                b = claim()
                fut = pool.submit(_timed, read, b) if b is not None else None
                while b is not None:
                    (windows, need), dt = fut.result()
                    timings.read_s += dt
                    nb = claim()
                    fut = pool.submit(_timed, read, nb) if nb is not None else None
                    embed(b, windows, need)
                    b = nb
        else:  # N readers read, decode, warp and cut ahead into bounded queues
            pstats = PipelineStats()
            for unit in stream_units(claim, read, cut if host_cut else None, readers, depth=4, stats=pstats):
                windows, need = unit.result
                timings.read_s += unit.read_s
                embed(unit.item, windows, need, unit.iter_batches() if host_cut and windows is not None else None)
                timings.wait_s += unit.wait_s
            timings.wait_s += pstats.wait_s
            timings.queue_depth = pstats.mean_depth()
        if deferred:
            who = sorted({locks.holder(lock_key(u[0])) or "?" for u in deferred})
            log_fn(f"waiting for {len(deferred)} blocks that another run ({', '.join(who)}) is "
                   "computing in this store")
        while deferred:
            for u in list(deferred):
                if locks.acquire(lock_key(u[0])):
                    deferred.remove(u)
                    (windows, need), dt = _timed(read, u)
                    timings.read_s += dt
                    embed(u, windows, need)
            if deferred:
                time.sleep(0.5)
    finally:
        bar.close()
        locks.release_all()
    return fill


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
    cfg.validate()
    if cfg.offline:
        set_offline()
    if not cfg.imagery:
        from .imagery.presets import get_preset

        cfg.imagery = default_imagery()
        p = get_preset(cfg.imagery)
        log_fn(f"imagery: {p.name} (the default: {p.description}); licence {p.license}; "
               f"attribution: {p.attribution}")
    if not cfg.queries and not cfg.audio:
        raise InputError("no query given: pass --query TEXT and/or --audio FILE")
    _check_output(cfg.out, cfg.overwrite, cfg.previews)
    _check_store_root(cfg.store)
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    region = load_region(cfg.region, bbox=cfg.bbox, feature=cfg.feature)
    # model, tokenizer and query files next: their errors come before any long work
    model, ckpt, device = load_model(cfg)
    check_answer(cfg, model.config, md)  # e.g. a month x hour cube the model cannot make
    if cfg.batch_size == "auto":
        from .embed import auto_batch_size

        cfg.batch_size = auto_batch_size(model, resolve_device(cfg.device))
        log_fn(f"batch size: {cfg.batch_size} (auto, {resolve_device(cfg.device).type})")
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    grid = make_grid(region, stride=cfg.stride, crs=cfg.crs, sat_type=model.config.sat_type,
                     zoom_levels=tuple(cfg.zoom_levels), max_pixels=cfg.max_pixels)
    factors = zoom_factors(grid.sat_type, grid.stride, cfg.zoom_levels, cfg.zoom_sampling)
    log_fn(f"grid: {grid.width} x {grid.height} px of {grid.stride:g} m in {grid.crs.to_string()}; "
           f"{grid.estimate(cfg.block_size, zoom_factors=factors)}")
    source = open_source(cfg.imagery, **cfg.imagery_options)
    try:
        _check_overlap(source, region)
        if callable(getattr(source, "prepare", None)):
            source.prepare(region.bounds)  # searching sources (STAC) fail here, before the store exists
        _warn_imagery_mismatch(source, model.config.sat_type, cfg.zoom_levels)
        sha = file_sha256(ckpt)
        spec = StoreSpec.for_grid(grid, block_size=cfg.block_size, zoom_levels=cfg.zoom_levels,
                                  checkpoint_sha256=sha, imagery=source.identity(), min_valid=cfg.min_valid,
                                  fc_dim=model.config.fc_dim, probabilistic=model.config.probabilistic,
                                  zoom_factors=factors)
        store_url = _store_url(cfg, spec)
        tags = provenance(model, sha, source, grid, md, cfg)
        store = EmbeddingStore.open_or_create(store_url, spec, attrs={
            "provenance": tags, "metadata_options": md.as_dict(), "region_name": grid.region_name,
            "checkpoint_path": str(Path(ckpt).resolve())}, storage_options=cfg.store_options or None)
        record_text_setup(store, cfg, model)
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
    timings = Timings()
    fill = StoreFill()
    with prep.source as source:
        embedder = ImageEmbedder(prep.model, prep.device, MetadataOptions(**store.attrs["metadata_options"]),
                                 device_cut=cfg.device_cut, compile=cfg.compile)
        for attempt in range(3):  # a corrupt chunk found by the query: recompute its blocks
            f = compute_store(store, grid, source, embedder, cfg, timings, log_fn)
            fill.blocks_total = f.blocks_total
            fill.blocks_computed += f.blocks_computed
            fill.faults += f.faults
            t_embed = time.perf_counter()
            fault_pixels = check_faults(store, grid, source)
            tags = dict(prep.tags)
            if fault_pixels:
                tags["imagery_faults"] = fault_message(fault_pixels)
            try:  # the answer (map or cube), through the views over the engine
                outputs, t_query, _ = answer_store(store, prep.queries, prep.model, prep.md, cfg, grid, tags,
                                                   prep.region)
                break
            except CorruptChunkError as exc:
                bad = store.find_corrupt_blocks()
                if not bad or attempt == 2:
                    raise
                log_fn(f"store: {len(bad)} block(s) with corrupt chunks ({str(exc).split(' (')[0]}); "
                       "computing them again")
                store.reset_blocks(bad)
    t_end = time.perf_counter()
    return MapRun.from_timings(
        outputs, prep.store_url, prep.t_start,
        [("setup", t_setup), ("embed_total", t_embed), ("query", t_query), ("write", t_end)],
        {"read": timings.read_s, "model": timings.model_s, "store_write": timings.write_s,
         "model_waits_for_readers": timings.wait_s},
        pixels=grid.pixel_count, chips=timings.chips, blocks_total=fill.blocks_total,
        blocks_computed=fill.blocks_computed, image_model_calls=embedder.calls, faults=fill.faults,
        fault_pixels=fault_pixels, queue_depth=timings.queue_depth)


#: above this fraction of the region's pixel-zooms masked for read faults, a run fails
MAX_FAULT_FRACTION = 0.5


def check_faults(store: EmbeddingStore, grid: OutputGrid, source=None) -> int:
    """Region pixel-zooms the store holds as FAULT (NaN, retried by the next run). Past
    :data:`MAX_FAULT_FRACTION` of the region the imagery source is failing: an
    :class:`ImageryError` (no map is written; the store keeps what was computed)."""
    st = store.status()
    n = total = 0
    for zooms, _, zg in zoom_plan(store, grid):
        sub = st[slice(None) if zooms is None else slice(*zooms), :zg.height, :zg.width]
        n += int((sub[:, zg.mask] == FAULT).sum())
        total += int(zg.mask.sum()) * sub.shape[0]
    if total and n > MAX_FAULT_FRACTION * total:
        name = source.info.name if source is not None else "the imagery"
        raise ImageryError(f"{n:,} of {total:,} pixel-zooms of the region could not be read from "
                           f"{name} (tile server errors after retries): no map written; rerun "
                           "when the server answers again (finished pixels are kept)")
    return n
