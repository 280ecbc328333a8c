"""What kind of store a path holds, from its ``format`` attribute, without opening it as Zarr.

A cheap look at the group's metadata file (``zarr.json`` or ``.zattrs``), for commands that take
either a map's embedding store or a point store (``psm-map query``, ``info``, ``assess``): it
imports nothing of either store's code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["POINT_FORMAT", "is_point_store", "store_format"]

#: the ``format`` attribute of a point store (:mod:`psm_mapping.places.store`)
POINT_FORMAT = "psm-mapping-points/1"


def store_format(url: str | os.PathLike) -> str | None:
    """The ``format`` attribute of a local Zarr group, None when there is none or it cannot be read."""
    p = Path(url)
    for name in ("zarr.json", ".zattrs"):
        f = p / name
        if f.is_file():
            try:
                d = json.loads(f.read_text())
                fmt = d.get("attributes", d).get("format")
            except (OSError, ValueError, AttributeError):
                return None
            return fmt if isinstance(fmt, str) else None
    return None


def is_point_store(url: str | os.PathLike) -> bool:
    """Whether ``url`` is a point store (a cheap look at its attributes)."""
    return store_format(url) == POINT_FORMAT
