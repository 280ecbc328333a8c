"""Caches of the explorer: an LRU bounded by bytes, and "compute once per key" under concurrency."""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable


def nbytes_of(value: Any) -> int:
    """Bytes a cached value holds: its ``nbytes`` (arrays, ``ZoomArrays``, rasters), a bytes
    length, or the sum over a tuple/list."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, (tuple, list)):
        return sum(nbytes_of(v) for v in value)
    n = getattr(value, "nbytes", None)
    return int(n) if n is not None else 64


class ByteLRU:
    """A thread-safe least-recently-used mapping holding at most ``max_bytes`` (a value larger
    than the whole budget is returned to its caller but not kept)."""

    def __init__(self, max_bytes: int, name: str = "cache"):
        self.max_bytes, self.name = int(max_bytes), name
        self._d: OrderedDict[Hashable, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: Hashable, default=None):
        with self._lock:
            item = self._d.get(key)
            if item is None:
                self.misses += 1
                return default
            self._d.move_to_end(key)
            self.hits += 1
            return item[0]

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._d

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> None:
        n = nbytes_of(value) if nbytes is None else int(nbytes)
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if n > self.max_bytes:
                return
            self._d[key] = (value, n)
            self.bytes += n
            while self.bytes > self.max_bytes and self._d:
                _, (_, m) = self._d.popitem(last=False)
                self.bytes -= m
                self.evictions += 1

    def keys(self) -> list:
        with self._lock:
            return list(self._d)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._d), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}


class Once:
    """``get_or_compute(cache, key, fn)``: the value of ``key`` from ``cache``, else ``fn()``
    computed by exactly one caller while the others asking for the same key wait for it (a lock
    per key; different keys compute in parallel). ``computed[key]`` counts the computations."""

    def __init__(self):
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()
        self.computed: dict[Hashable, int] = {}

    def get_or_compute(self, cache: ByteLRU, key: Hashable, fn: Callable[[], Any]):
        value = cache.get(key)
        if value is not None:
            return value
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            value = cache.get(key)
            if value is None:
                value = fn()
                with self._guard:
                    self.computed[key] = self.computed.get(key, 0) + 1
                cache.put(key, value)
        with self._guard:  # drop the lock once nobody holds it (the dict stays small)
            if not lock.locked():
                self._locks.pop(key, None)
        return value
