"""Lock files per block of a local store (:class:`BlockLocks`), so that two runs on one store (map
or point store) compute each block once: the second waits for the first."""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .grid import Block


def _local_path(url: str) -> Path | None:
    """The folder of a local store URL, None for a remote one."""
    if "://" not in url:
        return Path(url)
    return Path(url[len("file://"):]) if url.startswith("file://") else None


def lock_key(block: Block) -> tuple:
    """The lock of a block: its chunk index (and its zoom grid, for a store with zooms on their
    own grids)."""
    return tuple(int(i) for i in block.index) if block.zooms is None else \
        (f"z{block.zooms[0]}", *(int(i) for i in block.index))


class BlockLocks:
    """One lock file per block beside a local store (``<store>.locks/<row>_<col>.lock``, holding
    ``pid host time``), so that two runs on one store compute each block once: the second
    waits for the first. A lock whose process is gone (same host) or older than
    ``stale_s`` (another host) is stale and taken over. Remote stores are not locked."""

    def __init__(self, store_url: str, stale_s: float = 12 * 3600):
        local = _local_path(store_url.rstrip("/"))
        self.dir = local.with_name(local.name + ".locks") if local is not None else None
        self.stale_s, self.host, self.pid = stale_s, socket.gethostname(), os.getpid()
        #: an unreadable lock file older than this is stale (seconds)
        self.unreadable_stale_s = 30.0
        self.held: set[tuple[int, int]] = set()

    def _path(self, index) -> Path:
        return self.dir / ("_".join(str(i) for i in index) + ".lock")

    def holder(self, index) -> str | None:
        """``"pid N on HOST"`` of a live holder other than this process, else None."""
        if self.dir is None:
            return None
        p = self._path(index)
        try:
            pid_s, host, t = p.read_text().split()[:3]
            pid, t = int(pid_s), float(t)
        except (OSError, ValueError):
            try:  # unreadable: a lock of an older version, or a file cut short; stale once old
                age = time.time() - p.stat().st_mtime
            except OSError:
                return None
            return None if age > self.unreadable_stale_s else f"an unknown process ({p})"
        if host == self.host and pid == self.pid:
            return None
        if host == self.host:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return None
            except PermissionError:
                pass
            return f"pid {pid}"
        return None if time.time() - t > self.stale_s else f"pid {pid} on {host}"

    def acquire(self, index) -> bool:
        """Take the lock of block ``index``; False while another live run holds it."""
        if self.dir is None:
            return True
        index = tuple(index)
        self.dir.mkdir(parents=True, exist_ok=True)
        p = self._path(index)
        for _ in range(2):
            # the lock appears whole or not at all: written under a private name, then hard-linked
            # to the lock's name (atomic, and refused when the name exists), so a holder killed at
            # any moment never leaves an empty lock behind
            tmp = p.with_name(f".{p.name}.{self.pid}.{threading.get_ident()}")
            tmp.write_text(f"{self.pid} {self.host} {time.time():.0f}\n")
            try:
                try:
                    os.link(tmp, p)
                except FileExistsError:
                    raise
                except OSError:  # a file system without hard links: exclusive create
                    with os.fdopen(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644), "w") as f:
                        f.write(tmp.read_text())
            except FileExistsError:
                if self.holder(index) is not None:
                    return False
                p.unlink(missing_ok=True)  # stale, or our own from an earlier attempt
                continue
            finally:
                tmp.unlink(missing_ok=True)
            self.held.add(index)
            return True
        return False

    def release(self, index) -> None:
        index = tuple(index)
        if self.dir is not None and index in self.held:
            self._path(index).unlink(missing_ok=True)
            self.held.discard(index)

    def release_all(self) -> None:
        for index in list(self.held):
            self.release(index)
