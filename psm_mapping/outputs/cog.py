"""Cloud-Optimised GeoTIFF writers, side by side (as odc-geo keeps them): the eager one (NumPy
bands, GDAL's COG driver from an in-memory GeoTIFF) and the dask one (odc-geo's ``save_cog_with_dask``,
tiles compressed on the workers). Both write float32, NaN nodata, 512 px tiles, PREDICTOR=3,
average overviews, band descriptions and tags, and the provenance as dataset tags."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any

import numpy as np
from pyproj import CRS

from ..errors import InputError, OutputError
from .results import MapResult, check_result, full_tags
from .staging import Stage, is_local, local_path, raw_bytes, staged_all


def cog_profile(compress: str, blocksize: int) -> dict[str, Any]:
    compress = compress.lower()
    if compress not in ("deflate", "zstd"):
        raise InputError(f"COG compression {compress!r} is not supported: use deflate or zstd")
    if blocksize % 16 or blocksize <= 0:
        raise InputError(f"COG block size {blocksize} is not a positive multiple of 16")
    return {"driver": "GTiff", "interleave": "pixel", "tiled": True, "blockxsize": blocksize,
            "blockysize": blocksize, "compress": compress.upper(), "predictor": 3, "BIGTIFF": "IF_SAFER"}


def band_stats(arr: np.ndarray) -> dict[str, str]:
    """GDAL's statistics metadata (QGIS styles a band from these without a scan)."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"STATISTICS_VALID_PERCENT": "0"}
    f64 = finite.astype(np.float64)
    return {"STATISTICS_MINIMUM": repr(float(f64.min())), "STATISTICS_MAXIMUM": repr(float(f64.max())),
            "STATISTICS_MEAN": repr(float(f64.mean())), "STATISTICS_STDDEV": repr(float(f64.std())),
            "STATISTICS_VALID_PERCENT": repr(100.0 * finite.size / arr.size)}


# --------------------------------------------------------------------------- eager
def write_cog_file(result: MapResult, arrays: list[np.ndarray], path: Path, compress: str = "deflate",
                   blocksize: int = 512) -> None:
    """The eager writer: ``arrays`` (NumPy) to a COG at ``path`` (no staging), by GDAL's COG driver
    from an in-memory GeoTIFF (the tags, band descriptions and band tags copied with it)."""
    import rasterio
    import rasterio.shutil
    from rasterio.io import MemoryFile

    h, w = arrays[0].shape
    src_profile = {"driver": "GTiff", "width": w, "height": h, "count": len(arrays), "dtype": "float32",
                   "crs": rasterio.crs.CRS.from_wkt(CRS.from_user_input(result.crs).to_wkt()),
                   "transform": result.transform, "nodata": float("nan"), "tiled": True,
                   "blockxsize": blocksize, "blockysize": blocksize}
    tags = {**full_tags(result), "OVERVIEW_RESAMPLING": "AVERAGE"}  # as the dask writer records it
    with MemoryFile() as mem:
        with mem.open(**src_profile) as src:
            for i, (band, arr) in enumerate(zip(result.bands, arrays), 1):
                src.write(arr, i)
                src.set_band_description(i, band.description)
                src.update_tags(i, **band.band_tags(), **band_stats(arr))
            src.update_tags(**tags)
        # the COG is built in memory and written to disk by Python: a full disk or a refused
        # write is one OSError (errno and path), never libtiff's own lines on stderr
        with mem.open() as src, MemoryFile() as cog:
            prof = cog_profile(compress, blocksize)
            rasterio.shutil.copy(src, cog.name, driver="COG", BLOCKSIZE=blocksize, COMPRESS=prof["compress"],
                                 PREDICTOR="FLOATING_POINT", OVERVIEWS="AUTO", OVERVIEW_RESAMPLING="AVERAGE",
                                 BIGTIFF="IF_SAFER")
            cog.seek(0)
            with open(path, "wb") as fh:
                while chunk := cog.read(8 << 20):
                    fh.write(chunk)


# --------------------------------------------------------------------------- dask
def cog_metadata_xml(existing: str, result: MapResult) -> str:
    """odc-geo's GDAL_METADATA (statistics, descriptions) + provenance tags + per-band tags."""
    body = existing.strip()
    body = body[len("<GDALMetadata>"):] if body.startswith("<GDALMetadata>") else ""
    body = body[:-len("</GDALMetadata>")] if body.endswith("</GDALMetadata>") else body
    tags = {**result.tags, "OVERVIEW_RESAMPLING": "AVERAGE"}  # as rio-cogeo records it
    items = [f'<Item name="{html.escape(str(k))}">{html.escape(str(v), quote=False)}</Item>'
             for k, v in tags.items()]
    for i, band in enumerate(result.bands):
        items += [f'<Item name="{html.escape(k)}" sample="{i}">{html.escape(v, quote=False)}</Item>'
                  for k, v in band.band_tags().items()]
    return "<GDALMetadata>" + "".join(items) + body + "</GDALMetadata>"


def write_cog_dask(result: MapResult, arrays: list, path: str | Path, blocksize: int = 512,
                   compress: str = "deflate") -> None:
    """The dask writer: a COG from dask arrays by odc-geo (tiles compressed on the workers, written
    in place), then the provenance and band tags added to the header's GDAL_METADATA."""
    import dask.array as da
    import tifffile
    from odc.geo.cog import save_cog_with_dask
    from odc.geo.geobox import GeoBox
    from odc.geo.xr import wrap_xr

    path = str(path)
    h, w = arrays[0].shape
    gbox = GeoBox((h, w), result.transform, CRS.from_user_input(result.crs).to_wkt())
    stack = da.stack(arrays).rechunk((1, min(h, blocksize), min(w, blocksize)))
    xx = wrap_xr(stack, gbox, nodata=np.nan, axis=1, dims=("band", "y", "x"))
    xx = xx.assign_coords(band=[b.description for b in result.bands])
    save_cog_with_dask(xx, path, compression=compress, predictor=3, blocksize=blocksize,
                       overview_resampling="average").compute()
    with tifffile.TiffFile(path, mode="r+") as tf:
        tag = tf.pages.first.tags.get(42112)
        xml = cog_metadata_xml(tag.value if tag is not None else "", result)
        if tag is None:  # pragma: no cover - odc writes the tag whenever bands have names
            raise OutputError(f"{path} has no GDAL_METADATA tag to extend: report this as a bug")
        tag.overwrite(xml)


def write_cog_any(result: MapResult, arrays: list, path: Path, compress: str = "deflate",
                  blocksize: int = 512) -> None:
    """The dask writer for lazy bands, the eager one otherwise."""
    if any(hasattr(a, "dask") for a in arrays):
        write_cog_dask(result, arrays, path, blocksize=blocksize, compress=compress)
    else:
        write_cog_file(result, arrays, path, compress, blocksize)


def write_cog(result: MapResult, path: str | os.PathLike, overwrite: bool = False, compress: str = "deflate",
              blocksize: int = 512) -> Path:
    """Write ``result`` as a COG, staged and swapped into place (see :mod:`.staging`)."""
    if not is_local(path):
        raise OutputError(f"COG output {path} is not a local path: write it locally, then upload", option="out")
    arrays = check_result(result)
    cog_profile(compress, blocksize)
    stage = Stage(local_path(path), overwrite)
    staged_all([stage], lambda: write_cog_any(result, arrays, stage.tmp, compress, blocksize),
               need_bytes=raw_bytes(arrays))
    return stage.dst
