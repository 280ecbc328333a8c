"""Imagery sources: local rasters, XYZ/WMTS tile servers, STAC Sentinel-2.

``open_source(spec)`` turns what a user typed after ``--imagery`` into a reader:

* a path GDAL opens (GeoTIFF, COG, VRT, ...)          -> :class:`LocalRasterSource`
* ``xyz:URL`` with ``{z}/{x}/{y}`` (or WMTS) template  -> :class:`XYZSource`
* ``stac:URL`` (API or static catalog)                 -> :class:`STACSource`
* a preset name (``psm-map --imagery`` lists them)     -> a preset
"""
from __future__ import annotations

from .base import ImagerySource, ImageryWindow, SourceInfo

__all__ = ["ImagerySource", "ImageryWindow", "SourceInfo", "open_source"]


def open_source(spec: str, **options) -> ImagerySource:
    """Open an imagery source from a command-line spec (see module docstring)."""
    from ..errors import ImageryError

    if not isinstance(spec, str) or not spec:
        raise ImageryError("no imagery source given: pass --imagery PATH|xyz:URL|stac:URL|PRESET")
    if spec.startswith("xyz:"):
        from .xyz import XYZSource

        return XYZSource(spec[4:], **options)
    if spec.startswith("stac:"):
        from .stac import STACSource

        return STACSource(spec[5:], **options)
    from . import presets

    if spec in presets.PRESETS:
        return presets.open_preset(spec, **options)
    from .local import LocalRasterSource

    return LocalRasterSource(spec, **options)
