"""The input pipeline in front of the model: ``N`` reader threads read, decode, warp and cut blocks
into bounded queues, the model consumes them in order.

Threads, not processes: the work releases the GIL (GDAL reads and warps through rasterio, PIL /
imagecodecs decoding, httpx and sockets, NumPy copies), and threads share one lattice-tile cache;
processes would have to pickle every window back (tens of MB per block) and keep a cache each
(``benchmarks/bench_pipeline.py`` measures both). Local rasters open one GDAL handle per thread.

Order and content are deterministic: units are claimed, read and consumed in one fixed order, each
unit's chips are cut by the same code whatever the reader, so the store does not depend on ``N``.
At most ``N`` units are in flight (read ahead while the model works), and each unit's cut batches
wait in a queue of ``depth`` batches, so memory stays bounded.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

__all__ = ["default_readers", "Unit", "stream_units", "PipelineStats"]

_END = object()


def default_readers() -> int:
    """Readers for this machine: the usable cores, at least 2 (reads wait on I/O), at most 8."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        n = os.cpu_count() or 1
    return max(2, min(8, n))


@dataclass
class PipelineStats:
    """Seconds in each stage (summed over readers), the model's wait, queue depth samples."""

    read_s: float = 0.0
    cut_s: float = 0.0
    wait_s: float = 0.0
    units: int = 0
    depth_samples: list = field(default_factory=list)

    def mean_depth(self) -> float:
        return sum(self.depth_samples) / len(self.depth_samples) if self.depth_samples else 0.0


class Unit:
    """One claimed unit of work in flight: its read result (``windows``), then its cut batches."""

    def __init__(self, item: Any, depth: int):
        self.item = item
        self.ready = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None
        self.batches: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.cancelled = False
        self.read_s = 0.0
        #: seconds the consumer waited for this unit's batches
        self.wait_s = 0.0

    def put(self, batch) -> bool:
        """Queue one batch (blocks while the queue is full); False once the consumer gave up."""
        while not self.cancelled:
            try:
                self.batches.put(batch, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def iter_batches(self) -> Iterator:
        while True:
            t0 = time.perf_counter()
            b = self.batches.get()
            self.wait_s += time.perf_counter() - t0
            if b is _END:
                return
            if isinstance(b, BaseException):
                raise b
            yield b


def stream_units(claim: Callable[[], Any], read: Callable[[Any], Any],
                 cut: Callable[[Any, Any], Iterator] | None, readers: int = 1, depth: int = 4,
                 stats: PipelineStats | None = None) -> Iterator[Unit]:
    """Units in claim order, each with ``unit.result = read(item)`` done; with ``cut``, the unit's
    batches ``cut(item, result)`` arrive in ``unit.iter_batches()`` as reader threads cut them.

    ``claim()`` gives the next item or None (it runs in the caller's thread). ``readers=1`` with
    ``cut=None`` is the single prefetch thread: the next unit is read while this one is consumed."""
    st = stats if stats is not None else PipelineStats()
    inflight: deque[Unit] = deque()

    def work(u: Unit) -> None:
        t0 = time.perf_counter()
        try:
            u.result = read(u.item)
        except BaseException as exc:  # handed to the consumer
            u.error = exc
        u.read_s = time.perf_counter() - t0
        st.read_s += u.read_s
        u.ready.set()
        if cut is None or u.error is not None:
            return
        t1 = time.perf_counter()
        try:
            for b in cut(u.item, u.result):
                if not u.put(b):
                    return
            u.put(_END)
        except BaseException as exc:
            u.put(exc)
        finally:
            st.cut_s += time.perf_counter() - t1

    with ThreadPoolExecutor(max(1, readers), thread_name_prefix="psm-reader") as pool:
        def fill() -> None:
            while len(inflight) < max(1, readers):
                item = claim()
                if item is None:
                    return
                u = Unit(item, depth)
                inflight.append(u)
                pool.submit(work, u)

        try:
            fill()
            while inflight:
                u = inflight.popleft()
                st.depth_samples.append(sum(x.ready.is_set() for x in inflight) + int(u.ready.is_set()))
                t0 = time.perf_counter()
                u.ready.wait()
                st.wait_s += time.perf_counter() - t0
                fill()
                if u.error is not None:
                    raise u.error
                st.units += 1
                yield u
                u.cancelled = True  # a consumer that stopped early frees its reader
        finally:
            for u in inflight:
                u.cancelled = True
