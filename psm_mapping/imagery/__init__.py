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


def _accepted(cls, options: dict) -> dict:
    """The options ``cls`` takes (a shared option set serves every backend)."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def _check_option_names(options: dict) -> None:
    """An option that no backend takes is a typo: say so instead of dropping it."""
    import inspect

    from ..errors import ImageryError
    from .local import LocalRasterSource
    from .stac import STACSource
    from .xyz import XYZSource

    known = {n for cls in (LocalRasterSource, STACSource, XYZSource)
             for n in inspect.signature(cls.__init__).parameters if n != "self"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ImageryError(f"unknown imagery option(s) {', '.join(unknown)}: use some of "
                           f"{', '.join(sorted(known))}")


def open_source(spec: str, **options) -> ImagerySource:
    """Open an imagery source from a command-line spec (see module docstring).

    ``options`` may hold settings of several backends (``cache_dir``, ``stretch``, ...): each
    backend takes the ones it knows."""
    from ..errors import ImageryError

    _check_option_names(options)
    if not isinstance(spec, str) or not spec:
        raise ImageryError("no imagery source given: pass --imagery PATH|xyz:URL|stac:URL|PRESET")
    if spec.startswith("xyz:"):
        from .xyz import XYZSource

        return XYZSource(spec[4:], **_accepted(XYZSource, options))
    if spec.startswith("stac:"):
        from .stac import STACSource

        return STACSource(spec[5:], **_accepted(STACSource, options))
    from . import presets

    if spec in presets.PRESETS:
        from .xyz import XYZSource

        return presets.open_preset(spec, **_accepted(XYZSource, options))
    import os

    if not os.path.exists(spec) and "/" not in spec and os.sep not in spec and not os.path.splitext(spec)[1]:
        # a bare name that is no file: a mistyped preset
        raise ImageryError(f"unknown imagery preset {spec!r} (and no such file): pick one of "
                           f"{', '.join(sorted(presets.PRESETS))} (`psm-map --imagery` lists them) or pass a path")
    from .local import LocalRasterSource

    return LocalRasterSource(spec, **_accepted(LocalRasterSource, options))
