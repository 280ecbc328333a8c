"""Tile bytes for the XYZ reader: memory LRU, then the disk cache, then HTTP.

:class:`TileFetcher` returns each tile's bytes (``b""``: the server has none, a 404) or the
reason it failed; failures are transient and retried by the next run. Retries, backoff and
dead-server tracking live in :mod:`psm_mapping.imagery.http`; :meth:`TileFetcher.check_alive`
turns a dead server into :class:`~psm_mapping.errors.ServerDeadError`. (The reader:
:mod:`psm_mapping.imagery.xyz`.)
"""
from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from ..errors import ServerDeadError
from .cache import TileCache
from .http import FetchResult, HTTPClient

__all__ = ["XYZStats", "TileFetcher", "decode_tile"]


@dataclass
class XYZStats:
    """Counters over the life of a source (for logs and benchmarks)."""

    tiles: int = 0
    memory_hits: int = 0
    disk_hits: int = 0
    downloads: int = 0
    http_attempts: int = 0
    faults: int = 0
    fetch_seconds: float = 0.0
    decode_seconds: float = 0.0
    warp_seconds: float = 0.0


class TileFetcher:
    """Tiles of one server: ``url_for(z, x, y)`` addresses them, ``http`` downloads them,
    ``cache`` (or None) keeps them on disk, the last ``memory_tiles`` stay in memory."""

    def __init__(self, http: HTTPClient, cache: TileCache | None,
                 url_for: Callable[[int, int, int], str], host: str, memory_tiles: int = 256,
                 progress: bool = False):
        self.http, self.cache, self.url_for, self.host = http, cache, url_for, host
        self.progress = progress
        self._memory: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._memory_size = int(memory_tiles)
        self._lock = threading.Lock()
        self.stats = XYZStats()

    def memory_get(self, key):
        with self._lock:
            data = self._memory.get(key)
            if data is not None:
                self._memory.move_to_end(key)
            return data

    def memory_put(self, key, data: bytes) -> None:
        if self._memory_size <= 0:
            return
        with self._lock:
            self._memory[key] = data
            self._memory.move_to_end(key)
            while len(self._memory) > self._memory_size:
                self._memory.popitem(last=False)

    def fetch(self, z: int, tiles: list[tuple[int, int]]):
        """Raw bytes per tile (``b""`` = known missing) or a fault reason string per tile."""
        n = 2**z
        out: dict[tuple[int, int], bytes | str] = {}
        todo: list[tuple[int, int]] = []
        for col, row in tiles:
            key = (z, col % n, row)
            data = self.memory_get(key)
            if data is not None:
                self.stats.memory_hits += 1
                out[(col, row)] = data
                continue
            if self.cache is not None:
                data = self.cache.get(*key)
                if data is not None:
                    self.stats.disk_hits += 1
                    out[(col, row)] = data
                    continue
            todo.append((col, row))
        if not todo:
            return out, []
        urls = [self.url_for(z, col % n, row) for col, row in todo]
        bar = tqdm(total=len(urls), desc=f"tiles z{z}", unit="tile", disable=not self.progress,
                   leave=False)
        t0 = time.perf_counter()
        try:
            results = self.http.get_many(urls, on_done=lambda r: bar.update(1))
        finally:
            bar.close()
        self.stats.fetch_seconds += time.perf_counter() - t0
        self.stats.downloads += len(urls)
        self.stats.http_attempts += sum(r.attempts for r in results)
        for (col, row), res in zip(todo, results):
            key = (z, col % n, row)
            if res.ok:
                out[(col, row)] = res.content or b""
            elif res.status == 404:
                out[(col, row)] = b""
                if self.cache is not None:
                    self.cache.put_missing(*key)
            else:
                out[(col, row)] = _reason(res)
        return out, results

    def check_alive(self) -> None:
        """Raise :class:`ServerDeadError` once the server stopped answering (see
        :class:`~psm_mapping.imagery.http.ServerHealth`)."""
        health = self.http.health
        if not health.dead.is_set():
            return
        err = health.last_error
        raise ServerDeadError(
            f"tile server {self.host} stopped answering: no answer to any request for "
            f"{health.dead_after:g} s ({type(err).__name__}: {' '.join(str(err).split()) or 'no detail'}); "
            "the run stopped and no map was written; the finished pixels are kept in the store "
            "and rerunning the same command resumes once the server answers again (or wait "
            "longer: --imagery-option dead_after=SECONDS)")

    def keep(self, key, data: bytes) -> None:
        """Remember the good tile ``key`` = (z, x, y) in memory and on disk."""
        self.memory_put(key, data)
        if self.cache is not None and not self.cache.path(*key).exists():
            self.cache.put(*key, data)


def _reason(res: FetchResult) -> str:
    if res.status is not None:
        return f"HTTP {res.status}"
    return type(res.error).__name__


def decode_tile(data: bytes, size: int) -> np.ndarray | None:
    """RGBA uint8 ``[4, size, size]`` from image bytes (alpha 255 where valid), None if corrupt."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            has_alpha = img.mode in ("RGBA", "LA", "PA") or (
                img.mode == "P" and "transparency" in img.info)
            img = img.convert("RGBA" if has_alpha else "RGB")
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.LANCZOS)
            arr = np.asarray(img)
    except Exception:  # PIL raises many types for bad bytes
        return None
    if arr.ndim != 3:
        return None
    out = np.empty((4, size, size), np.uint8)
    out[:3] = np.moveaxis(arr[..., :3], -1, 0)
    out[3] = np.where(arr[..., 3] >= 128, 255, 0) if arr.shape[-1] == 4 else 255
    return out
