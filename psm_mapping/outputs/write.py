"""``write_outputs``: the map (COG or Zarr), its STAC Item and its preview folder, all staged and
swapped into place together. NumPy bands go to the eager writers; dask bands are written chunk by
chunk on the cluster (COG by odc-geo, Zarr by xarray) and their previews come from block means,
so no process holds the whole raster."""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from . import preview as _preview
from .cog import cog_profile, write_cog_any
from .results import MapResult, check_format, check_result, full_tags
from .stac import item_json, make_item, stac_path
from .staging import Stage, exists_error, is_local, local_path, raw_bytes, staged_all
from .zarr import to_dataset, to_zarr, write_zarr_remote

log = logging.getLogger(__name__)

PREVIEW_SUFFIX = ".preview"


def default_preview_dir(out: str | os.PathLike) -> Path:
    """``map.tif`` -> ``map.tif.preview/`` next to it (so ``map.tif`` and ``map.zarr`` each get
    their own)."""
    p = local_path(out)
    return p.with_name(p.name.rstrip("/") + PREVIEW_SUFFIX)


def coarse(arrays: list, transform, max_px: int):
    """NaN-aware block means so the longer side is at most ``max_px``: (NumPy arrays, transform)."""
    import dask.array as da
    from affine import Affine

    h, w = arrays[0].shape
    f = max(1, math.ceil(max(h, w) / max_px))
    if f == 1:
        return [np.asarray(a) for a in da.compute(*arrays)], transform
    out = []
    for a in arrays:
        ok = da.isfinite(a)
        s = da.coarsen(np.sum, da.where(ok, a, 0.0), {0: f, 1: f}, trim_excess=True)
        n = da.coarsen(np.sum, ok.astype(np.float32), {0: f, 1: f}, trim_excess=True)
        out.append(da.where(n > 0, s / da.maximum(n, 1), np.nan).astype(np.float32))
    return [np.asarray(a) for a in da.compute(*out)], transform * Affine.scale(f)


def from_cog_overview(path, max_px: int):
    """The bands of a written COG at its first overview whose longer side is at most ``max_px``
    (GDAL's NaN-aware averages): (NumPy arrays, transform), the previews of a streamed map
    without a second pass over its source. None when the COG has no such overview."""
    import rasterio

    with rasterio.open(path) as src:
        if max(src.height, src.width) <= max_px:
            return [a for a in src.read().astype(np.float32)], src.transform
        factors = src.overviews(1)
    for i, f in enumerate(factors):
        with rasterio.open(path, overview_level=i) as o:
            if max(o.height, o.width) <= max_px:
                return [a for a in o.read().astype(np.float32)], o.transform
    return None


def write_outputs(result: MapResult, out: str | os.PathLike, fmt: str = "cog", previews: bool = True,
                  overwrite: bool = False, preview_dir: str | os.PathLike | None = None,
                  compress: str = "deflate", progress: bool = False, stac: bool = True) -> dict[str, Any]:
    """Write the map (``fmt`` "cog" or "zarr"), its STAC Item ``<out>.stac.json`` (if ``stac``)
    and, if ``previews``, the preview folder (default ``<out>.preview/``). Every target is checked
    before anything is written and all are swapped into place together at the end. Bands holding
    dask arrays are written by the dask writers. Returns ``{"map": ..., "stac": ..., "previews":
    [...], "html": ...}``."""
    fmt = check_format(fmt)
    cog_profile(compress, 512)
    arrays = check_result(result)
    result = dataclasses.replace(result, tags=full_tags(result))  # one "created" for all
    lazy = any(hasattr(a, "dask") for a in arrays)
    small: dict[str, Any] = {}

    def small_arrays():
        """The arrays previews and the STAC geometry are drawn from: dask bands' block means, read
        from the written COG's overviews (no second pass over what computes them) or computed."""
        if "a" not in small:
            got = None
            if lazy and fmt == "cog" and map_stage is not None and map_stage.tmp.exists():
                got = from_cog_overview(map_stage.tmp, _preview.MAX_OVERLAY_PX)
            if got is None:
                got = (coarse(arrays, result.transform, _preview.MAX_OVERLAY_PX) if lazy
                       else (arrays, result.transform))
            small["a"], small["t"] = got
        return small["a"], small["t"]

    local = is_local(out)
    if fmt == "cog" and not local:
        raise OutputError(f"COG output {out} is not a local path: write it locally, then upload", option="out")
    if previews and preview_dir is None:
        if local:
            preview_dir = default_preview_dir(out)
        else:
            log.warning("previews skipped: --out %s is not local; give a local preview folder", out)
            previews = False
    map_stage = Stage(local_path(out), overwrite) if local else None
    stac_stage = Stage(stac_path(local_path(out)), overwrite) if (stac and local) else None
    prev_stage = Stage(local_path(preview_dir), overwrite) if previews else None
    stages = [s for s in (map_stage, stac_stage, prev_stage) if s is not None]
    fs = None
    if not local:  # remote Zarr: validate up-front, write it last
        import fsspec

        fs, root = fsspec.core.url_to_fs(os.fspath(out))
        if fs.exists(root.rstrip("/")) and not overwrite:
            raise exists_error(os.fspath(out))

    names: list[str] = []
    outputs: dict[str, Any] = {}

    def item():
        a, t = small_arrays()
        valid = np.zeros(a[0].shape, bool)
        for x in a:
            valid |= np.isfinite(x)
        return item_json(make_item(result, arrays, Path(local_path(out) if local else os.fspath(out)), fmt,
                                   valid=valid, valid_transform=t))

    def write() -> None:
        if map_stage is not None:
            if fmt == "cog":
                write_cog_any(result, arrays, map_stage.tmp, compress)
            else:
                to_zarr(to_dataset(result, arrays), str(map_stage.tmp))
        if stac_stage is not None:
            stac_stage.tmp.write_text(item(), encoding="utf-8")
        if prev_stage is not None:
            a, t = small_arrays()
            res = result
            if lazy:
                res = dataclasses.replace(result, transform=t,
                                          bands=[dataclasses.replace(b, data=x) for b, x in zip(result.bands, a)])
            names.extend(_preview.write_preview_dir(res, a, prev_stage.tmp, progress))
        if map_stage is None:  # remote Zarr last, so a failure discards the staged previews
            outputs["map"] = write_zarr_remote(to_dataset(result, arrays), os.fspath(out), overwrite)
            if stac:
                url = os.fspath(out).rstrip("/") + ".stac.json"
                fs.pipe_file(fsspec_path(url), item().encode("utf-8"))
                outputs["stac"] = url

    staged_all(stages, write, need_bytes=raw_bytes(arrays))
    if map_stage is not None:
        outputs["map"] = map_stage.dst
    if stac_stage is not None:
        outputs["stac"] = stac_stage.dst
    if prev_stage is not None:
        outputs["previews"] = [prev_stage.dst / n for n in names if n.endswith(".png")]
        outputs["html"] = prev_stage.dst / "index.html"
    return outputs


def fsspec_path(url: str) -> str:
    import fsspec

    return fsspec.core.url_to_fs(url)[1]
