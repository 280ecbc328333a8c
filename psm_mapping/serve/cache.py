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
    """A thread-safe least-recently-used mapping holding at most ``max_bytes`` and, if given,
    ``max_entries`` (a value larger than the whole budget is returned to its caller but not
    kept). ``on_evict(key, value)`` runs (outside the lock) for each value dropped to make room,
    replaced, popped or not kept."""

    def __init__(self, max_bytes: int, name: str = "cache", max_entries: int | None = None,
                 on_evict: Callable[[Hashable, Any], None] | None = None):
        self.max_bytes, self.name = int(max_bytes), name
        self.max_entries, self.on_evict = max_entries, on_evict
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

    def put(self, key: Hashable, value: Any, nbytes: int | None = None) -> bool:
        """Keep ``value`` (False: larger than the budget, not kept)."""
        n = nbytes_of(value) if nbytes is None else int(nbytes)
        dropped = []
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
                if old[0] is not value:
                    dropped.append((key, old[0]))
            kept = n <= self.max_bytes
            if kept:
                self._d[key] = (value, n)
                self.bytes += n
            else:
                dropped.append((key, value))
            while self._d and (self.bytes > self.max_bytes or
                               (self.max_entries is not None and len(self._d) > self.max_entries)):
                k, (v, m) = self._d.popitem(last=False)
                self.bytes -= m
                self.evictions += 1
                dropped.append((k, v))
        self._dropped(dropped)
        return kept

    def pop(self, key: Hashable, default=None):
        """Remove ``key`` (``on_evict`` runs for it); its value or ``default``."""
        with self._lock:
            item = self._d.pop(key, None)
            if item is None:
                return default
            self.bytes -= item[1]
        self._dropped([(key, item[0])])
        return item[0]

    def clear(self) -> None:
        with self._lock:
            items = [(k, v) for k, (v, _) in self._d.items()]
            self._d.clear()
            self.bytes = 0
        self._dropped(items)

    def _dropped(self, items: list) -> None:
        if self.on_evict is not None:
            for k, v in items:
                self.on_evict(k, v)

    def keys(self) -> list:
        with self._lock:
            return list(self._d)

    def stats(self) -> dict:
        with self._lock:
            d = {"entries": len(self._d), "bytes": self.bytes, "max_bytes": self.max_bytes,
                 "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
            if self.max_entries is not None:
                d["max_entries"] = self.max_entries
            return d


class Once:
    """``get_or_compute(cache, key, fn)``: the value of ``key`` from ``cache``, else ``fn()``
    computed by exactly one caller while the others asking for the same key wait for it (a lock
    per key; different keys compute in parallel). ``computed[key]`` counts the computations of
    the ``max_keys`` most recently computed keys (older counts are dropped and counted in
    ``computed_dropped``), so a long-running server's statistics stay small."""

    #: keys whose computations are counted (``/api/stats`` ``computed``)
    MAX_KEYS = 256

    def __init__(self, max_keys: int = MAX_KEYS):
        self._locks: dict[Hashable, threading.Lock] = {}
        self._guard = threading.Lock()
        self.max_keys = int(max_keys)
        self.computed: OrderedDict[Hashable, int] = OrderedDict()
        self.computed_dropped = 0

    def counts(self) -> list[tuple[Hashable, int]]:
        """``(key, times computed)`` of the counted keys, oldest first."""
        with self._guard:
            return list(self.computed.items())

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
                    self.computed[key] = self.computed.pop(key, 0) + 1
                    while len(self.computed) > self.max_keys:
                        self.computed.popitem(last=False)
                        self.computed_dropped += 1
                cache.put(key, value)
        with self._guard:  # drop the lock once nobody holds it (the dict stays small)
            if not lock.locked():
                self._locks.pop(key, None)
        return value
