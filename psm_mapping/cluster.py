"""The dask cluster a map run uses: a given ``distributed.Client``, an existing scheduler's
address, or a new ``LocalCluster``; the worker plugin that keeps torch from oversubscribing the
cores."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

from distributed.diagnostics.plugin import WorkerPlugin

from .errors import InputError

class TorchThreads(WorkerPlugin):
    """Worker plugin: ``torch.set_num_threads`` so workers do not oversubscribe the cores.

    ``threads`` fixed, or None: the host's cores divided by the worker threads on that host."""

    name = "psm-torch-threads"

    def __init__(self, threads: int | None = None, per_host: dict[str, int] | None = None):
        self.threads, self.per_host = threads, dict(per_host or {})

    def setup(self, worker) -> None:
        import torch

        n = self.threads
        if n is None:
            host = str(worker.address).split("://")[-1].rsplit(":", 1)[0]
            busy = self.per_host.get(host, worker.state.nthreads)
            n = max(1, (os.cpu_count() or 1) // max(1, busy))
        torch.set_num_threads(int(n))



def _threads_per_host(client) -> dict[str, int]:
    out: dict[str, int] = {}
    for addr, w in client.scheduler_info(n_workers=-1)["workers"].items():
        host = addr.split("://")[-1].rsplit(":", 1)[0]
        out[host] = out.get(host, 0) + int(w.get("nthreads", 1))
    return out


@contextlib.contextmanager
def connect(workers: int | None = None, scheduler: str | None = None, client=None,
            log_fn: Callable[[str], Any] = print, torch_threads: int | None = None,
            gpu: bool = False) -> Iterator[Any]:
    """A ``distributed.Client``: the given one, one for ``scheduler``, or a new ``LocalCluster`` of
    ``workers`` single-threaded processes (closed on exit). Registers :class:`TorchThreads`."""
    from distributed import Client, LocalCluster

    given = [x is not None for x in (workers, scheduler, client)]
    if sum(given) != 1:
        raise InputError("give one of --workers N, --scheduler ADDRESS or a dask Client")
    cluster = None
    own = client is None
    if client is None and scheduler:
        try:
            client = Client(scheduler, timeout="30s")
        except OSError as exc:
            raise InputError(f"no dask scheduler answers at {scheduler} ({exc}): start one "
                             "(`dask scheduler`) or check --scheduler") from None
    elif client is None:
        if workers is None or int(workers) < 1:
            raise InputError(f"--workers {workers} must be a positive number of processes")
        cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                               dashboard_address="127.0.0.1:0", resources={"GPU": 1} if gpu else None)
        client = Client(cluster)
    try:
        if torch_threads is None and cluster is not None:
            torch_threads = max(1, (os.cpu_count() or 1) // int(workers))
        client.register_plugin(TorchThreads(torch_threads, _threads_per_host(client)))
        log_fn(f"dask: {len(client.scheduler_info(n_workers=-1)['workers'])} workers; "
               f"dashboard {client.dashboard_link}")
        yield client
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
