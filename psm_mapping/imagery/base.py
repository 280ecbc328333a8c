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

from ..errors import ImageryError


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
    #: bool ``[H, W]``, True where a pixel is masked because a read failed (a tile server
    #: error after the retries, an unreadable scene): transient, unlike nodata. None: none.
    fault_mask: np.ndarray | None = None

    @property
    def valid_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


#: provenance value of an attribution or licence that a source does not state
NOT_GIVEN = "not given by the source"


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
        """Provenance tags; an attribution or licence the source does not state is said so
        (GDAL drops empty tags, and the outputs must show the field)."""
        out = {
            "imagery_source": self.name,
            "imagery_kind": self.kind,
            "imagery_attribution": self.attribution or NOT_GIVEN,
            "imagery_license": self.license or NOT_GIVEN,
        }
        if self.native_resolution is not None:
            out["imagery_resolution_m"] = f"{self.native_resolution:.4g}"
        return out


def check_window(bounds, crs, shape) -> tuple[tuple[float, float, float, float], CRS, int, int]:
    """The arguments of :meth:`ImagerySource.read` checked and normalised:
    ``(bounds as floats, pyproj CRS, height, width)``."""
    crs = CRS.from_user_input(crs)
    height, width = int(shape[0]), int(shape[1])
    if height <= 0 or width <= 0:
        raise ImageryError(f"window shape {shape} is empty: pass a positive (height, width)")
    left, bottom, right, top = (float(b) for b in bounds)
    return (left, bottom, right, top), crs, height, width


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

    def identity(self) -> str:
        """What the pixels this source returns depend on, for store keys: a change of the
        imagery must change it. Remote sources: their URL (template) and settings; local
        files: their content (see :meth:`LocalRasterSource.identity`)."""
        return f"{self.info.kind}:{self.info.name}"

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
