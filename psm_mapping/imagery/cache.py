"""On-disk tile cache: ``<root>/<sha of template>/<z>/<x>/<y>.<ext>``, written atomically.

Paths are built only from integers and a hex digest, so the cache never leaves ``root``.
A tile the server answered with 404 is remembered as an empty ``<y>.404`` marker.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageryError

_EXT_RE = re.compile(r"\.(jpe?g|png|webp|tiff?|gif)(?:[?#].*)?$", re.IGNORECASE)


def template_key(template: str) -> str:
    """Folder name of a template's cache: 16 hex digits of its SHA-256."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def template_ext(template: str) -> str:
    """File extension for cached tiles of a template (``tile`` if the URL has none)."""
    m = _EXT_RE.search(template)
    return m.group(1).lower() if m else "tile"


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0


class TileCache:
    """Tiles of one URL template under ``root``; ``max_age`` seconds (None: never expire)."""

    def __init__(self, root: str | os.PathLike, template: str, max_age: float | None = None):
        self.root = Path(root).expanduser().resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImageryError(
                f"cannot create tile cache folder {self.root} ({exc.strerror}): "
                "pass a writable cache_dir") from exc
        self.dir = self.root / template_key(template)
        self.ext = template_ext(template)
        self.max_age = max_age
        self.stats = CacheStats()

    def path(self, z: int, x: int, y: int, ext: str | None = None) -> Path:
        return self.dir / str(int(z)) / str(int(x)) / f"{int(y)}.{ext or self.ext}"

    def _fresh(self, p: Path) -> bool:
        if self.max_age is None:
            return True
        try:
            return time.time() - p.stat().st_mtime <= self.max_age
        except OSError:
            return False

    def get(self, z: int, x: int, y: int) -> bytes | None:
        """Cached bytes, ``b""`` for a remembered 404, or None on a miss."""
        p = self.path(z, x, y)
        try:
            if self._fresh(p):
                data = p.read_bytes()
                self.stats.hits += 1
                return data
        except OSError:
            pass
        missing = self.path(z, x, y, "404")
        if missing.exists() and self._fresh(missing):
            self.stats.hits += 1
            return b""
        self.stats.misses += 1
        return None

    def put(self, z: int, x: int, y: int, data: bytes) -> None:
        self._write(self.path(z, x, y), data)

    def put_missing(self, z: int, x: int, y: int) -> None:
        self._write(self.path(z, x, y, "404"), b"")

    def _write(self, p: Path, data: bytes) -> None:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".tmp-", suffix=p.suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, p)
            self.stats.writes += 1
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
