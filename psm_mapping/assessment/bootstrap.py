"""Spatial block bootstrap: confidence intervals that respect clustered sites.

Sites (and background points) are put on a square grid of ``block_km`` cells in an azimuthal
equidistant projection centred on them; a replicate draws as many blocks as there are non-empty
blocks, with replacement, and takes every point of each drawn block (a point's weight = how often
its block was drawn). The interval is the percentile interval of the replicates (2.5 and 97.5 %
for 95 %), replicates where the figure is undefined (e.g. no absence drawn) left out and counted.
The default block size is a tenth of the sites' extent (the larger of its east-west and
north-south spans), at least 1 km. Seeded: the same ``seed`` gives the same interval.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

__all__ = ["Blocks", "spatial_blocks", "default_block_km", "replicate_weights", "Interval", "percentile_interval",
           "extent_km"]

#: replicates per batch (a batch's weights are ``[CHUNK, n]`` float64)
CHUNK = 64


@dataclass
class Blocks:
    """Block index per point (``ids`` 0..count-1) and the grid's cell size."""

    ids: np.ndarray
    count: int
    block_km: float


def _local_xy(lon: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from pyproj import Transformer

    lon0, lat0 = float(np.mean(lon)), float(np.mean(lat))
    aeqd = f"+proj=aeqd +lat_0={lat0:.8f} +lon_0={lon0:.8f} +datum=WGS84 +units=m"
    return Transformer.from_crs("EPSG:4326", aeqd, always_xy=True).transform(lon, lat)


def extent_km(lon: np.ndarray, lat: np.ndarray) -> float:
    """The larger of the east-west and north-south spans of the points, km."""
    x, y = _local_xy(np.asarray(lon, np.float64), np.asarray(lat, np.float64))
    return float(max(np.ptp(x), np.ptp(y)) / 1000.0) if len(x) else 0.0


def default_block_km(lon, lat) -> float:
    """A tenth of the points' extent, at least 1 km."""
    return max(1.0, extent_km(lon, lat) / 10.0) if len(lon) else 1.0


def spatial_blocks(lon, lat, block_km: float | None = None) -> Blocks:
    """Blocks of ``block_km`` (default :func:`default_block_km`) for points in degrees."""
    lon, lat = np.asarray(lon, np.float64), np.asarray(lat, np.float64)
    km = float(block_km) if block_km is not None else default_block_km(lon, lat)
    x, y = _local_xy(lon, lat)
    cell = np.stack([np.floor(np.asarray(x) / (km * 1000)), np.floor(np.asarray(y) / (km * 1000))], 1)
    _, ids = np.unique(cell, axis=0, return_inverse=True)
    ids = ids.reshape(-1).astype(np.int64)
    return Blocks(ids, int(ids.max()) + 1 if len(ids) else 0, km)


def replicate_weights(blocks: Blocks, n_boot: int, seed: int | None) -> Iterator[np.ndarray]:
    """Batches of point weights ``[b, n]`` for ``n_boot`` replicates (seeded)."""
    rng = np.random.default_rng(seed)
    K = blocks.count
    done = 0
    while done < n_boot:
        b = min(CHUNK, n_boot - done)
        counts = rng.multinomial(K, np.full(K, 1.0 / K), size=b).astype(np.float64)
        yield counts[:, blocks.ids]
        done += b


@dataclass
class Interval:
    """A percentile bootstrap interval: ``low``, ``high`` (NaN when too few replicates had a
    value), the replicates run and the ones without a value."""

    low: float
    high: float
    level: float
    replicates: int
    undefined: int

    def as_dict(self) -> dict:
        return {"low": self.low, "high": self.high, "level": self.level, "replicates": self.replicates,
                "undefined_replicates": self.undefined}


def percentile_interval(stat: Callable[[np.ndarray], np.ndarray], blocks: Blocks, n_boot: int,
                        seed: int | None, level: float = 0.95) -> Interval:
    """The interval of ``stat`` (weights ``[b, n]`` -> figures ``[b]``) over ``n_boot`` replicates."""
    if n_boot <= 0 or blocks.count == 0:
        return Interval(float("nan"), float("nan"), level, 0, 0)
    reps = np.concatenate([np.asarray(stat(w), np.float64) for w in replicate_weights(blocks, n_boot, seed)])
    ok = np.isfinite(reps)
    if ok.sum() < max(2, n_boot // 2):
        return Interval(float("nan"), float("nan"), level, n_boot, int((~ok).sum()))
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(reps[ok], [a, 100 - a])
    return Interval(float(lo), float(hi), level, n_boot, int((~ok).sum()))
