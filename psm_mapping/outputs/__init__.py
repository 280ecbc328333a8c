"""Map outputs: Cloud-Optimised GeoTIFF, Zarr, a STAC Item, preview PNGs and an HTML page.

Everything here takes plain arrays (:class:`MapResult`: NumPy or dask bands plus georeferencing),
so it knows neither the model nor the imagery nor the store.

* :mod:`.results`  result types, band naming, tag and format checks
* :mod:`.staging`  the one move-aside-and-swap routine, stale staged files, write errors
* :mod:`.cog`      the eager and the dask COG writer, side by side
* :mod:`.zarr`     the Zarr writer (local or fsspec URL)
* :mod:`.preview`  PNGs (PIL + colour lookup table) and the HTML page (``assets/preview.html``)
* :mod:`.stac`     the STAC Item beside every output (``<out>.stac.json``)
* :mod:`.info`     ``psm-map info``: what a map holds
* :mod:`.write`    :func:`write_outputs`: map + STAC + previews, staged together
"""
from __future__ import annotations

from .cog import write_cog
from .info import MapInfo, read_info
from .preview import MAX_OVERLAY_PX, write_preview_dir, write_previews
from .results import (BAND_KINDS, COLORMAPS, FORMAT_SUFFIXES, MapBand, MapResult, build_map_result, check_format,
                      check_result, describe_outputs, format_for, full_tags, lonlat_bounds, safe_name)
from .stac import stac_path
from .write import default_preview_dir, write_outputs
from .zarr import to_dataset, write_zarr

__all__ = [
    "MapBand", "MapResult", "MapInfo", "write_cog", "write_zarr", "write_previews", "write_outputs",
    "check_result", "check_format", "format_for", "full_tags", "to_dataset", "write_preview_dir",
    "default_preview_dir", "read_info", "lonlat_bounds", "safe_name", "build_map_result", "describe_outputs",
    "stac_path", "BAND_KINDS", "COLORMAPS", "FORMAT_SUFFIXES", "MAX_OVERLAY_PX",
]
