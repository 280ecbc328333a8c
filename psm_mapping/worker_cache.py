"""What a dask worker process keeps between tasks: the model, imagery sources and readers, and
store handles (:mod:`psm_mapping.distributed`'s tasks carry only small descriptions).

One :class:`_ProcessCache` per process (:data:`_CACHE`): a model is loaded once per (checkpoint
sha256, device, dtype), after checking the worker's file is the client's; ``cuda`` on a worker
named by an integer (LocalCluster) picks GPU ``name % count``. :func:`process_cache_info` reports
it (``client.run(process_cache_info)`` asks every worker).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any

from .errors import CheckpointError
from .grid import OutputGrid
from .store import EmbeddingStore


class _ProcessCache:
    """Models, imagery sources and store handles of one worker process (a lock guards loads)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.models: dict[tuple, tuple[Any, Any]] = {}
        self.sources: dict[str, Any] = {}
        self.readers: dict[str, Any] = {}
        self.stores: dict[str, EmbeddingStore] = {}
        self.loads = 0  # model loads in this process (tests and logs)

    def store(self, url: str, storage_options: dict | None) -> EmbeddingStore:
        key = url + json.dumps(storage_options or {}, sort_keys=True, default=str)
        with self.lock:
            if key not in self.stores:
                self.stores[key] = EmbeddingStore.open(url, storage_options=storage_options or None,
                                                       mode="r+")
            return self.stores[key]

    def source(self, spec: str, options: dict):
        from .imagery import open_source

        key = spec + json.dumps(options or {}, sort_keys=True, default=str)
        with self.lock:
            if key not in self.sources:
                self.sources[key] = open_source(spec, **(options or {}))
            return self.sources[key]

    def reader(self, spec: str, options: dict, grid: OutputGrid):
        """A :class:`ChipReader` of the source in the grid's CRS: blocks of a worker share
        its tile cache."""
        from .tiling import ChipReader

        source = self.source(spec, options)
        key = spec + json.dumps(options or {}, sort_keys=True, default=str) + grid.crs.to_wkt()
        with self.lock:
            if key not in self.readers:
                self.readers[key] = ChipReader(source, grid.crs, grid.sat_type)
            return self.readers[key]

    def model(self, job):
        """(model, device) for ``job``'s checkpoint on this worker (a
        :class:`psm_mapping.distributed.BlockJob`), loaded once per process."""
        device = _worker_device(job.device)
        from .session import compute_dtype

        dtype = compute_dtype(job.dtype, device)
        key = (job.checkpoint_sha256, str(device), dtype)
        with self.lock:
            if key not in self.models:
                from .model import PSM
                from .model.checkpoint import file_sha256

                if not os.path.isfile(job.checkpoint):
                    raise CheckpointError(f"checkpoint {job.checkpoint} is not on worker {_worker_name()}: "
                                          "put it on a file system every worker reaches")
                sha = file_sha256(job.checkpoint)
                if sha != job.checkpoint_sha256:
                    raise CheckpointError(f"checkpoint {job.checkpoint} on worker {_worker_name()} has sha256 "
                                          f"{sha[:12]}, not the client's {job.checkpoint_sha256[:12]}: give "
                                          "every worker the same file")
                model = PSM.from_checkpoint(job.checkpoint, clap_config=job.clap_config, device=device,
                                            dtype=dtype)
                self.models[key] = (model, device)
                self.loads += 1
            return self.models[key]


#: one per process: worker processes keep their model between tasks (by design)
_CACHE = _ProcessCache()


def process_cache_info() -> dict[str, int]:
    """This process's cache: models loaded so far, models, sources and stores held
    (``client.run(process_cache_info)`` asks every worker)."""
    return {"model_loads": _CACHE.loads, "models": len(_CACHE.models), "sources": len(_CACHE.sources),
            "stores": len(_CACHE.stores)}


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return str(get_worker().name)
    except (ImportError, ValueError):
        return f"pid {os.getpid()}"


def _worker_device(device: str):
    """``cuda`` on a worker named by an integer (LocalCluster) picks GPU ``name % count``."""
    import torch

    from .embed import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        try:
            from distributed import get_worker

            name = get_worker().name
            if isinstance(name, int):
                return torch.device("cuda", name % torch.cuda.device_count())
        except ValueError:
            pass
    return dev
