"""The dask driver: the same blocks as the local driver, one task per block, on any
``distributed`` cluster (a ``LocalCluster``, dask-jobqueue, Kubernetes, a cloud cluster).

* Setup is :func:`psm_mapping.run.prepare_run`, shared with the local driver.
* One task per block that is not done: it opens the store by URL (+ fsspec options), skips the
  block if it is done, reads the imagery, cuts chips, embeds them with
  :func:`psm_mapping.embed.embed_block` and writes the block's chunks, then its done flag.
  Identical inputs give identical chunks, so a retried, re-run or resumed block changes nothing.
* The model is loaded once per worker process (a cache keyed by checkpoint sha256, device and
  dtype), the imagery source and store handle likewise; tasks carry only small descriptions.
* Tasks are retried on errors (``retries``); dask reschedules the tasks of a lost worker.
* Query maps are dask arrays computed block by block from the store; the COG is written by
  odc-geo's dask writer (:mod:`psm_mapping.outputs.cog`), so no process holds the whole raster.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .embed import ImageEmbedder, MetadataOptions, Timings, embed_block
from .cluster import TorchThreads, _threads_per_host, connect  # noqa: F401  (public here too)
from .worker_cache import _CACHE, _worker_name, process_cache_info  # noqa: F401  (public here too)
from . import constants
from .errors import InputError, StoreError
from .grid import Block, OutputGrid
from .query import QueryMaps, Query, prepare_query
from .store import EmbeddingStore

log = logging.getLogger(__name__)

__all__ = ["BlockJob", "BlockStats", "TorchThreads", "connect", "embed_block_task", "process_cache_info",
           "compute_store_distributed", "query_store_dask",
           "map_region_distributed"]


# --------------------------------------------------------------------------- task descriptions
@dataclass(frozen=True)
class BlockJob:
    """What a block task needs besides the grid and the block: small and picklable."""

    store_url: str
    storage_options: dict
    checkpoint: str
    checkpoint_sha256: str
    clap_config: str | None
    device: str  # "auto" | "cpu" | "cuda" (resolved on the worker)
    dtype: str  # "auto" | "float32" | "bfloat16" | "float16"
    imagery: str
    imagery_options: dict
    metadata_options: dict
    zoom_levels: tuple[int, ...]
    batch_size: int = constants.DEFAULT_BATCH_SIZE
    min_valid: float = constants.DEFAULT_MIN_VALID


@dataclass
class BlockStats:
    """What one block task did (returned to the client)."""

    index: tuple[int, int]
    skipped: bool = False
    chips: int = 0
    faults: int = 0
    fault_pixels: int = 0
    model_calls: int = 0
    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    seconds: float = 0.0
    #: CPU seconds of the task's thread (seconds / cpu_s shows how contended the cores were)
    cpu_s: float = 0.0
    pid: int = 0
    worker: str = ""
    #: filled in by the client: 1 + retries after errors + reschedules after worker loss
    attempts: int = 1


def embed_block_task(job: BlockJob, grid: OutputGrid, block: Block) -> BlockStats:
    """The dask task of one block: embed the block's region pixels the store lacks and write
    them (skipped when there are none). The block's lock file is held meanwhile, so another
    run on the same store waits instead of computing it too."""
    from .run import region_need
    from .store import BlockLocks, lock_key

    t0, c0 = time.perf_counter(), time.thread_time()
    stats = BlockStats(tuple(block.index), pid=os.getpid(), worker=_worker_name())
    store = _CACHE.store(job.store_url, job.storage_options)
    locks = BlockLocks(store.url)
    try:
        while not locks.acquire(lock_key(block)):
            time.sleep(0.5)
        need = region_need(store, grid, block)
        if not need.any():
            stats.skipped = True
            stats.seconds = time.perf_counter() - t0
            return stats
        model, device = _CACHE.model(job)
        reader = _CACHE.reader(job.imagery, job.imagery_options, grid)
        embedder = ImageEmbedder(model, device, MetadataOptions(**job.metadata_options))
        timings = Timings()
        res = embed_block(block, grid=grid, source=reader, embedder=embedder,
                          zoom_levels=job.zoom_levels, batch_size=job.batch_size,
                          min_valid=job.min_valid, need=need, timings=timings)
        t1 = time.perf_counter()
        store.write_block(res)
    finally:
        locks.release(lock_key(block))
    stats.write_s = time.perf_counter() - t1
    stats.chips, stats.faults, stats.model_calls = res.chips, res.faults, embedder.calls
    stats.fault_pixels = res.fault_pixels
    stats.read_s, stats.model_s = timings.read_s, timings.model_s
    stats.seconds = time.perf_counter() - t0
    stats.cpu_s = time.thread_time() - c0
    return stats


# --------------------------------------------------------------------------- embedding
def _attempts_on_scheduler(dask_scheduler=None, keys=(), retries=0) -> dict[str, int]:
    """Runs on the scheduler: 1 + retries used after errors + reschedules after worker loss."""
    out = {}
    for k in keys:
        ts = dask_scheduler.tasks.get(k)
        if ts is not None:
            out[k] = 1 + max(0, retries - int(ts.retries)) + int(ts.suspicious)
    return out


def compute_store_distributed(client, store: EmbeddingStore, grid: OutputGrid, job: BlockJob,
                              block_size: int, *, retries: int = 3, progress: bool = True,
                              on_block: Callable[[BlockStats], Any] | None = None) -> list[BlockStats]:
    """Submit one task per block that is not done and wait for all. Interrupting (or an error)
    cancels the rest; a rerun resumes from the done blocks."""
    import uuid

    from distributed import as_completed
    from tqdm.auto import tqdm

    from .run import work_units

    todo = work_units(store, grid, block_size)  # per zoom grid (dense: the output grid, every zoom)
    if not todo:
        return []
    token = uuid.uuid4().hex[:8]
    grids = {}
    for _, _, zg in todo:
        if id(zg) not in grids:
            [grids[id(zg)]] = client.scatter([zg], broadcast=True, hash=False)
    gpu = job.device.startswith("cuda")
    futures = {}
    for b, zl, zg in todo:
        z = "" if b.zooms is None else f"z{b.zooms[0]}-"
        key = f"psm-block-{z}{b.index[0]}-{b.index[1]}-{token}"
        job_b = job if tuple(zl) == tuple(job.zoom_levels) else dataclasses.replace(job, zoom_levels=tuple(zl))
        futures[key] = client.submit(embed_block_task, job_b, grids[id(zg)], b, key=key, retries=retries,
                                     resources={"GPU": 1} if gpu else None, pure=False)
    out: list[BlockStats] = []
    bar = tqdm(total=len(todo), unit="block", desc="blocks", disable=not progress, smoothing=0.1)
    try:
        ac = as_completed(list(futures.values()))
        for batch in ac.batches():
            stats = [f.result() for f in batch]
            keys = [f.key for f in batch]
            att = client.run_on_scheduler(_attempts_on_scheduler, keys=keys, retries=retries)
            for k, st in zip(keys, stats):
                st.attempts = att.get(k, 1)
                futures.pop(k).release()  # a later worker loss must not recompute a finished block
                out.append(st)
                bar.update(1)
                if on_block is not None:
                    on_block(st)
    except BaseException:
        client.cancel(list(futures.values()))
        raise
    finally:
        bar.close()
        for f in grids.values():
            f.release()
    return out


# --------------------------------------------------------------------------- queries
def _to_task(qm, qvs) -> tuple:
    """A :class:`~psm_mapping.engine.QueryMatrix`'s tensors as NumPy arrays for a task's arguments."""
    return qm.numpy().astype(np.float32), None if qvs is None else qvs.numpy().astype(np.float64)


def _from_task(qmat):
    """The :class:`~psm_mapping.engine.QueryMatrix` of :func:`_to_task`'s arrays, on a worker."""
    import torch

    from .engine import QueryMatrix

    qm, qvs = qmat
    return QueryMatrix(torch.from_numpy(qm), None if qvs is None else torch.from_numpy(qvs))


def _query_chunk(url: str, storage_options: dict, window, qmat, mask, job: BlockJob | None,
                 metadata: dict | None) -> np.ndarray:
    """Runs on a worker: ``[Q + 1, Z, h, w]`` = similarity per query, then uncertainty, of one
    output-grid window (:func:`psm_mapping.maps.window_maps`: every zoom, scale-true ones resampled)."""
    from .engine import Refusion
    from .maps import _window_chunk

    store = _CACHE.store(url, storage_options)
    refusion = None
    if job is not None:
        model, _ = _CACHE.model(job)
        refusion = Refusion(model, MetadataOptions(**metadata), store)
    return _window_chunk(store, _from_task(qmat), refusion, window, mask).astype(np.float32, copy=False)


def query_store_dask(store: EmbeddingStore, queries: Sequence[Query], *, mask: np.ndarray | None = None,
                     metadata: MetadataOptions | None = None, job: BlockJob | None = None,
                     storage_options: dict | None = None, model=None) -> QueryMaps:
    """:func:`psm_mapping.query.query_store` as lazy dask arrays, one task per window
    (:func:`psm_mapping.maps.lazy_maps`) run on the workers, dense and scale-true stores alike.

    ``mask`` [H, W]: NaN outside it. ``job``: where workers load the model if the metadata differ
    from the store's and fusion must re-run from ``z_img``."""
    import dask

    from .maps import lazy_maps

    spec = store.spec
    qm, qvs, rerun = prepare_query(store, queries, metadata, can_rerun=job is not None or model is not None)
    if rerun and job is None:
        raise StoreError("fusion re-runs on the workers need the checkpoint: pass a BlockJob")
    qmat = dask.delayed(_to_task(qm, qvs), pure=True)
    md = metadata.as_dict() if rerun else None
    url, so = store.url, storage_options or {}

    def task(w, m, key):
        return dask.delayed(_query_chunk, pure=True)(url, so, w, qmat, m, job if rerun else None, md)

    from .engine import QueryMatrix

    arr = lazy_maps(store, QueryMatrix(qm, qvs), mask=mask, task=task)
    Q = len(queries)
    return QueryMaps(tuple(spec.zoom_levels), list(queries), [arr[q] for q in range(Q)], arr[Q])


# --------------------------------------------------------------------------- cubes
def _cube_tile(url: str, storage_options: dict, job: BlockJob, metadata: dict, axes, qmat, tile):
    """Runs on a worker: one cube tile (:func:`psm_mapping.cube.tile_cube`), the fusion re-run per
    setting with the worker's model."""
    from .cube import setting_refusions, tile_cube

    store = _CACHE.store(url, storage_options)
    model, _ = _CACHE.model(job)
    sim, unc = tile_cube(store, _from_task(qmat), setting_refusions(store, model, MetadataOptions(**metadata), axes), tile)
    return tile, sim, unc


def cube_runner(client, store: EmbeddingStore, queries: Sequence[Query], job: BlockJob, metadata: MetadataOptions,
                axes, storage_options: dict | None = None, retries: int = 3, in_flight: int | None = None):
    """A :data:`psm_mapping.cube.TileRunner` on ``client``'s workers: each tile a task (the worker
    loads ``job``'s checkpoint once), at most ``in_flight`` tiles out at a time (default two per
    worker thread), results handed back as they finish: the client holds a few tiles, whatever the
    cube's size, and writes them (into memory or the scratch Zarr) as :func:`answer_cube` does."""
    import itertools

    from distributed import as_completed

    from .engine import query_matrix

    qm = query_matrix(list(queries), store.spec.probabilistic)
    qmat = _to_task(qm.mean, qm.var_sum)
    md, url, so = metadata.as_dict(), store.url, dict(storage_options or {})

    def run(tiles):
        it = iter(tiles)
        limit = in_flight or 2 * max(1, sum(_threads_per_host(client).values()))

        def submit(w):
            return client.submit(_cube_tile, url, so, job, md, axes, qmat, w, pure=False, retries=retries)

        running = as_completed([submit(w) for w in itertools.islice(it, limit)])
        for fut in running:
            w, sim, unc = fut.result()
            fut.release()
            nxt = next(it, None)
            if nxt is not None:
                running.add(submit(nxt))
            yield w, sim, unc
    return run


# --------------------------------------------------------------------------- the driver
def map_region_distributed(cfg, workers: int | None = None, scheduler: str | None = None, client=None,
                           log_fn: Callable[[str], Any] = print, *, retries: int = 3,
                           torch_threads: int | None = None,
                           on_block: Callable[[BlockStats], Any] | None = None):
    """:func:`psm_mapping.run.map_region` on dask: ``workers`` (a new LocalCluster), ``scheduler``
    (an existing cluster's address) or ``client`` (a ``distributed.Client``). Returns a ``MapRun``
    whose ``blocks_retried`` counts blocks that ran more than once."""
    from .outputs import build_map_result, write_outputs
    from .run import MapRun, check_faults, fault_message, prepare_run

    if sum(x is not None for x in (workers, scheduler, client)) != 1:
        raise InputError("give one of --workers N, --scheduler ADDRESS or a dask Client")
    # the client only embeds queries: keep its model on the CPU; workers use cfg.device
    prep = prepare_run(dataclasses.replace(cfg, device="cpu", dtype="float32"), log_fn)
    prep.source.close()
    store, grid = prep.store, prep.grid
    job = BlockJob(store_url=prep.store_url, storage_options=dict(cfg.store_options or {}),
                   checkpoint=str(prep.ckpt.resolve()), checkpoint_sha256=prep.sha,
                   clap_config=cfg.clap_config, device=str(cfg.device), dtype=str(cfg.dtype),
                   imagery=prep.cfg.imagery, imagery_options=dict(cfg.imagery_options or {}),
                   metadata_options=dict(store.attrs["metadata_options"]),
                   zoom_levels=tuple(int(z) for z in cfg.zoom_levels), batch_size=int(prep.cfg.batch_size),
                   min_valid=float(cfg.min_valid))
    from .run import zoom_plan

    total = sum(1 for _, _, zg in zoom_plan(store, grid) for _ in zg.blocks(cfg.block_size))
    with connect(workers, scheduler, client, log_fn, torch_threads,
                 gpu=str(cfg.device).startswith("cuda")) as cl:
        t_setup = time.perf_counter()
        stats = compute_store_distributed(cl, store, grid, job, cfg.block_size, retries=retries,
                                          progress=cfg.progress, on_block=on_block)
        t_embed = time.perf_counter()
        fault_pixels = check_faults(store, grid, prep.source)
        tags = dict(prep.tags)
        if fault_pixels:
            tags["imagery_faults"] = fault_message(fault_pixels)
        if cfg.is_cube:  # a month x hour cube: fusion re-runs from the filled store, on the workers
            from .cube import TimeAxes, answer_cube

            runner = cube_runner(cl, store, prep.queries, job, prep.md, TimeAxes.from_config(prep.cfg),
                                 storage_options=cfg.store_options, retries=retries)
            outputs, _, _ = answer_cube(store, prep.queries, prep.model, prep.md, prep.cfg, grid, tags,
                                        prep.region, runner=runner)
        else:
            maps = query_store_dask(store, prep.queries, mask=grid.mask, metadata=prep.md, job=job,
                                    storage_options=cfg.store_options, model=prep.model)
            result = build_map_result(maps, store, tags, prep.region, score=cfg.score)
            outputs = write_outputs(result, cfg.out, fmt=cfg.format, previews=cfg.previews,
                                    overwrite=cfg.overwrite)  # dask bands: the dask writers
        t_end = time.perf_counter()
    computed = [s for s in stats if not s.skipped]
    faults = sum(s.faults for s in computed)
    task_s = sum(s.seconds for s in computed)
    return MapRun.from_timings(
        outputs, prep.store_url, prep.t_start,
        [("setup", t_setup), ("embed_total", t_embed), ("query+write", t_end)],
        {"read": sum(s.read_s for s in computed), "model": sum(s.model_s for s in computed),
         "store_write": sum(s.write_s for s in computed), "tasks": task_s},
        pixels=grid.pixel_count, chips=sum(s.chips for s in computed), blocks_total=total,
        blocks_computed=len(computed), image_model_calls=sum(s.model_calls for s in computed), faults=faults,
        fault_pixels=fault_pixels, blocks_retried=sum(1 for s in stats if s.attempts > 1))
