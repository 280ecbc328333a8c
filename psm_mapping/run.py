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
from .checks import (_check_overlap, _check_output, _check_store_root, _store_url,  # noqa: F401
                     _warn_imagery_mismatch, default_store_dir)
from .config import (MAX_ZOOM_LEVEL, MapConfig, check_hour, check_month, default_imagery,  # noqa: F401
                     imagery_sat_type)
from .embed import (ImageEmbedder, MetadataOptions, Timings, cut_batches, embed_windows, read_block,
                    resolve_device)
from .pipeline import PipelineStats, default_readers, stream_units
from .errors import ImageryError, InputError, StoreError
from .grid import OutputGrid, make_grid
from .tiling import ChipReader
from .offline import set_offline
from .model.checkpoint import file_sha256
from .outputs import build_map_result, describe_outputs, write_outputs
from .query import build_queries, query_store
from .store import FAULT, BlockLocks, CorruptChunkError, EmbeddingStore, StoreSpec, lock_key
from .session import (compute_dtype, load_model, metadata_tags, record_text_setup,  # noqa: F401
                      reuse_text_setup)
from .zoomgrid import zoom_factors, zoom_grid
from .weights import resolve_checkpoint  # noqa: F401  (public here too)

log = logging.getLogger(__name__)


@dataclass
class MapRun:
    """What a run produced and what it cost."""

    outputs: dict[str, Any]
    store: str
    pixels: int
    chips: int = 0
    blocks_total: int = 0
    blocks_computed: int = 0
    image_model_calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    faults: int = 0
    #: dask runs only: blocks that ran more than once (worker lost or task error retried)
    blocks_retried: int | None = None
    #: region pixel-zooms that are NaN in the map because an imagery read failed
    fault_pixels: int = 0
    #: readers' mean queue depth (blocks read ahead when the model asked for the next one)
    queue_depth: float = 0.0

    @classmethod
    def from_timings(cls, outputs: dict, store: str, t_start: float, marks: Sequence[tuple[str, float]],
                     detail: dict[str, float] | None = None, **counts) -> "MapRun":
        """A run from ``write_outputs``' answer and clock readings: ``marks`` are (stage, end time)
        in order, each stage's seconds counted from the previous mark (the first from ``t_start``);
        ``detail`` (e.g. read / model seconds) is listed after the first stage; ``total`` last."""
        seconds: dict[str, float] = {}
        prev = t_start
        for i, (name, t) in enumerate(marks):
            seconds[name] = t - prev
            prev = t
            if i == 0 and detail:
                seconds.update(detail)
        seconds["total"] = prev - t_start
        return cls(outputs=describe_outputs(outputs), store=store, seconds=seconds, **counts)

    def summary(self) -> str:
        s = self.seconds
        retried = "" if self.blocks_retried is None else f"; blocks retried {self.blocks_retried}"
        lines = [f"pixels {self.pixels:,}; chips embedded {self.chips:,}; blocks {self.blocks_computed} "
                 f"computed / {self.blocks_total} total{retried}; tile faults {self.faults}",
                 "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items()),
                 f"store: {self.store}"]
        for k, v in self.outputs.items():
            lines.append(f"{k}: {v}")
        if self.fault_pixels:
            lines.append(fault_message(self.fault_pixels))
        return "\n".join(lines)


def fault_message(fault_pixels: int) -> str:
    """The line that says a map has holes from failed reads, and how they heal."""
    return (f"{fault_pixels:,} pixel-zooms are masked (NaN) because imagery reads failed (tile "
            "server errors after retries): rerun the same command to retry exactly those")


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
    if cfg.is_cube:  # a month x hour cube: refused here if the model cannot make it
        from .cube import check_cube_run

        check_cube_run(cfg, model.config, md)
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
            try:
                if cfg.is_cube:
                    from .cube import cube_maps

                    maps = cube_maps(store, prep.queries, prep.model, prep.md, cfg)
                else:
                    maps = query_store(store, prep.queries, model=prep.model, metadata=prep.md)
                break
            except CorruptChunkError as exc:
                bad = store.find_corrupt_blocks()
                if not bad or attempt == 2:
                    raise
                log_fn(f"store: {len(bad)} block(s) with corrupt chunks ({str(exc).split(' (')[0]}); "
                       "computing them again")
                store.reset_blocks(bad)
    t_query = time.perf_counter()
    tags = dict(prep.tags)
    if fault_pixels:
        tags["imagery_faults"] = fault_message(fault_pixels)
    if cfg.is_cube:
        from .cube import write_cube

        outputs = write_cube(maps, grid, tags, prep.region, cfg)
    else:
        result = build_map_result(maps, grid, tags, prep.region, score=cfg.score)
        outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite,
                                progress=cfg.progress)
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


def map_from_store(store_url: str, cfg: MapConfig, log_fn=print) -> MapRun:
    """Maps from an existing store: no imagery and no image inference, only the query pass."""
    t0 = time.perf_counter()
    cfg.check_output_name()
    cfg.month, cfg.hour = check_month(cfg.month), check_hour(cfg.hour)
    cfg.check_time()
    if cfg.offline:
        set_offline()
    from .session import open_session

    store = EmbeddingStore.open(store_url, storage_options=cfg.store_options or None)
    _check_output(cfg.out, cfg.overwrite, cfg.previews)
    session = open_session(store_url, cfg.checkpoint, encoders=("text", "audio") if cfg.audio else ("text",),
                           clap_config=cfg.clap_config, tokenizer=cfg.tokenizer, device=cfg.device, dtype=cfg.dtype,
                           storage_options=cfg.store_options or None, progress=cfg.progress, log_fn=log_fn)
    store, model = session.store, session.model
    cfg.tokenizer = session.tokenizer
    prov = dict(store.attrs.get("provenance", {}))
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    if cfg.is_cube:
        from .cube import check_cube_run

        check_cube_run(cfg, model.config, md, zooms=len(store.spec.zoom_levels))
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    t1 = time.perf_counter()
    if cfg.is_cube:
        from .cube import cube_maps

        maps = cube_maps(store, queries, model, md, cfg)
    else:  # in memory when small, else streamed window by window into the writers (bounded memory)
        from .query import answer_maps

        maps = answer_maps(store, queries, model=model, metadata=md)
    prov.update(metadata_tags(model, md))
    fault_pixels = int((store.status() == FAULT).sum())
    if fault_pixels:  # holes from failed reads: the map says so (the map run retries them)
        prov["imagery_faults"] = fault_message(fault_pixels).replace(
            "rerun the same command", "rerun the map command that built the store")
    if cfg.is_cube:
        from .cube import write_cube

        outputs = write_cube(maps, store, prov, None, cfg)
    else:
        result = build_map_result(maps, store, prov, None, score=cfg.score)
        outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews, overwrite=cfg.overwrite,
                                progress=cfg.progress)
    t2 = time.perf_counter()
    done = store.done_mask()
    if cfg.is_cube:
        first = maps.similarity[0].reshape(-1, *maps.similarity[0].shape[-2:])[0]  # first zoom (and setting)
        pixels = int(np.isfinite(first).sum())
    else:
        from .maps import counted_pixels

        pixels = counted_pixels(store)
    return MapRun.from_timings(outputs, store_url, t0, [("setup", t1), ("query", t2)],
                               pixels=pixels, blocks_total=int(done.sum()),
                               fault_pixels=fault_pixels)
