"""The one reader interface every imagery backend implements (rio-tiler style).

A source reads an RGB uint8 window for given bounds, CRS and shape, with a validity mask,
and knows its name, native resolution and attribution.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pyproj import CRS


@dataclass
class ImageryWindow:
    """An RGB window read from a source: ``data`` uint8 ``[3, H, W]``, ``mask`` bool ``[H, W]``
    (True where the pixel holds imagery), the ``bounds`` ``(left, bottom, right, top)`` and
    ``crs`` it was read in."""

    data: np.ndarray
    mask: np.ndarray
    bounds: tuple[float, float, float, float]
    crs: CRS
    #: counts of degraded reads (e.g. tiles that failed and were masked)
    faults: int = 0

    @property
    def valid_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


@dataclass
class SourceInfo:
    """What a source is, for logs and output provenance."""

    name: str
    kind: str  # "local", "xyz", "wmts", "stac"
    attribution: str = ""
    license: str = ""
    native_resolution: float | None = None  # metres per pixel, approximate
    extra: dict[str, Any] = field(default_factory=dict)

    def tags(self) -> dict[str, str]:
        out = {
            "imagery_source": self.name,
            "imagery_kind": self.kind,
            "imagery_attribution": self.attribution,
            "imagery_license": self.license,
        }
        if self.native_resolution is not None:
            out["imagery_resolution_m"] = f"{self.native_resolution:.4g}"
        return out


class ImagerySource(abc.ABC):
    """Base class of imagery readers. Use as a context manager or call :meth:`close`."""

    info: SourceInfo

    @abc.abstractmethod
    def read(
        self,
        bounds: tuple[float, float, float, float],
        crs: CRS | str,
        shape: tuple[int, int],
    ) -> ImageryWindow:
        """Read ``bounds`` (left, bottom, right, top in ``crs``) resampled, with antialiasing,
        to ``shape`` = (height, width) pixels. Pixels outside the imagery are masked."""

    def footprint_lonlat(self) -> tuple[float, float, float, float] | None:
        """(west, south, east, north) in degrees that the source covers, or None if global."""
        return None

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
