"""Map outputs: Cloud-Optimised GeoTIFF, Zarr, preview PNGs and an HTML page.

Everything here takes plain arrays (:class:`MapResult`) plus georeferencing, so it does not
depend on the model or the store. Every writer stages its output under a temporary name in the
destination folder and renames it into place; an existing output is kept unless
``overwrite=True``; a failure leaves nothing behind.

Zarr layout (chosen for xarray and QGIS/GDAL users): one 2-D ``float32`` variable per band,
dims ``(y, x)``, named from the band name with unsafe characters replaced by ``_`` (e.g.
``similarity_birds_chirping_z1``); each variable keeps ``band_name``, ``description``, ``kind``,
``query`` and ``zoom`` in its attributes and ``grid_mapping = "spatial_ref"``; ``x``/``y`` hold
pixel centres; ``spatial_ref`` carries the CRS (CF + ``crs_wkt``) and ``GeoTransform`` as
rioxarray writes them; the dataset attributes carry the provenance tags and the band order
(``band_names``, ``band_variables``, JSON lists). Metadata are consolidated.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import affine
import numpy as np
from pyproj import CRS, Transformer

from .errors import InputError, OutputError

log = logging.getLogger(__name__)

__all__ = [
    "MapBand",
    "MapResult",
    "MapInfo",
    "write_cog",
    "write_zarr",
    "write_previews",
    "write_outputs",
    "stage_outputs",
    "check_result",
    "check_format",
    "full_tags",
    "to_dataset",
    "write_preview_dir",
    "default_preview_dir",
    "read_info",
    "lonlat_bounds",
    "safe_name",
]

BAND_KINDS = ("similarity", "uncertainty", "score")
COLORMAPS = {"similarity": "viridis", "uncertainty": "magma", "score": "viridis"}
LEAFLET_JS = "https://unpkg.com/leaflet@1.9.4/dist/leaflet.js"
LEAFLET_CSS = "https://unpkg.com/leaflet@1.9.4/dist/leaflet.css"
#: largest side in pixels of the web-map overlay PNG (larger rasters are downsampled)
MAX_OVERLAY_PX = 2048


# --------------------------------------------------------------------------- data classes
@dataclass
class MapBand:
    """One output band: ``data`` float32 ``[H, W]``, NaN = nodata."""

    name: str  # e.g. "similarity:birds chirping:z1", "uncertainty:z3"
    data: np.ndarray
    description: str  # human text naming query and zoom
    kind: str  # "similarity" | "uncertainty" | "score"
    query: str | None = None
    zoom: int | None = None

    def band_tags(self) -> dict[str, str]:
        tags = {"name": self.name, "kind": self.kind}
        if self.query is not None:
            tags["query"] = str(self.query)
        if self.zoom is not None:
            tags["zoom"] = str(int(self.zoom))
        return tags


@dataclass
class MapResult:
    """The bands of a map on one grid: ``transform`` maps pixel (col, row) to ``crs``."""

    bands: list[MapBand]
    crs: CRS
    transform: affine.Affine
    tags: dict[str, str] = field(default_factory=dict)
    region_geojson: dict | None = None  # region outline in EPSG:4326

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.bands[0].data.shape) if self.bands else (0, 0)  # type: ignore[return-value]

    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs``."""
        h, w = self.shape
        xs, ys = zip(*(self.transform @ (c, r) for c, r in ((0, 0), (w, 0), (0, h), (w, h))))
        return min(xs), min(ys), max(xs), max(ys)


@dataclass
class MapInfo:
    """What a map file holds (``psm-map info``)."""

    path: str
    format: str  # "cog" | "zarr"
    width: int
    height: int
    crs: str  # e.g. "EPSG:32633"
    transform: tuple[float, ...]  # affine a, b, c, d, e, f
    bounds_lonlat: tuple[float, float, float, float] | None
    bands: list[dict[str, Any]]  # name, description, kind, query, zoom, valid_fraction?
    tags: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)  # compression, blocksize, overviews...

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "width": self.width,
            "height": self.height,
            "crs": self.crs,
            "transform": list(self.transform),
            "bounds_lonlat": list(self.bounds_lonlat) if self.bounds_lonlat else None,
            "bands": self.bands,
            "tags": self.tags,
            **self.extra,
        }

    def summary(self) -> str:
        a, _, c, _, e, f = self.transform
        lines = [
            f"{self.path} ({self.format}): {self.width} x {self.height} px, {self.crs}, "
            f"pixel {abs(a):g} x {abs(e):g}, origin ({c:.3f}, {f:.3f})",
        ]
        if self.bounds_lonlat:
            w, s, e_, n = self.bounds_lonlat
            lines.append(f"  lon/lat bounds: W {w:.6f} S {s:.6f} E {e_:.6f} N {n:.6f}")
        for k, v in self.extra.items():
            lines.append(f"  {k}: {v}")
        lines.append(f"  {len(self.bands)} band(s):")
        for i, b in enumerate(self.bands, 1):
            lines.append(f"    {i}. {b.get('name')}: {b.get('description', '')}")
        if self.tags:
            lines.append("  tags:")
            for k in sorted(self.tags):
                lines.append(f"    {k} = {self.tags[k]}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


# --------------------------------------------------------------------------- helpers
def safe_name(name: str, taken: set[str] | None = None) -> str:
    """A variable / file name from a band name: ``[A-Za-z0-9_]``, unique within ``taken``."""
    s = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or "band"
    if s[0].isdigit():
        s = "b_" + s
    if s in {"x", "y", "spatial_ref", "band"}:
        s = s + "_band"
    if taken is not None:
        base, i = s, 2
        while s in taken:
            s = f"{base}_{i}"
            i += 1
        taken.add(s)
    return s


def _software_version() -> str:
    try:
        from importlib.metadata import version

        return version("psm-mapping")
    except Exception:  # not installed (e.g. running from a checkout)
        return "unknown"


def full_tags(result: MapResult) -> dict[str, str]:
    """``result.tags`` as strings plus ``software``, ``created`` and ``band_names`` unless given."""
    tags = {str(k): str(v) for k, v in result.tags.items()}
    tags.setdefault("software", f"psm-mapping {_software_version()}")
    tags.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    tags.setdefault("band_names", json.dumps([b.name for b in result.bands]))
    return tags


def check_result(result: MapResult) -> list[np.ndarray]:
    """Validate ``result`` and return its band arrays as float32 (dask arrays stay lazy)."""
    if not result.bands:
        raise InputError("the map has no bands: give at least one query")
    names = [b.name for b in result.bands]
    if len(set(names)) != len(names):
        raise InputError(f"band names repeat in {names}: give each query/zoom band a unique name")
    shape = result.bands[0].data.shape
    arrays = []
    for b in result.bands:
        if b.kind not in BAND_KINDS:
            raise InputError(f"band {b.name!r} has kind {b.kind!r}: use one of {BAND_KINDS}")
        a = b.data if hasattr(b.data, "dask") else np.asarray(b.data)
        if a.ndim != 2 or a.shape != shape or 0 in a.shape:
            raise InputError(
                f"band {b.name!r} has shape {a.shape}, expected a 2-D array like the first band "
                f"{shape}: give all bands the grid's shape"
            )
        arrays.append(a.astype(np.float32, copy=False))
    if result.crs is None:
        raise InputError("the map has no CRS: give MapResult.crs")
    t = result.transform
    if t.b != 0 or t.d != 0 or t.a <= 0 or t.e >= 0:
        raise InputError(
            f"transform {tuple(t)[:6]} is not north-up: give a north-up grid transform"
        )
    return arrays


def lonlat_bounds(crs: CRS, bounds: tuple[float, float, float, float]) -> tuple[float, ...]:
    """(west, south, east, north) in degrees of ``bounds`` given in ``crs`` (densified)."""
    tr = Transformer.from_crs(CRS.from_user_input(crs), CRS.from_epsg(4326), always_xy=True)
    return tuple(float(v) for v in tr.transform_bounds(*bounds, densify_pts=21))


def _crs_label(crs: CRS) -> str:
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.name


# --------------------------------------------------------------------------- staging
def _is_local(url: str | os.PathLike) -> bool:
    s = os.fspath(url)
    return "://" not in s or s.startswith("file://")


def _local_path(url: str | os.PathLike) -> Path:
    s = os.fspath(url)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser().absolute()


def _exists_error(path: str) -> OutputError:
    return OutputError(f"output {path} exists: pass --overwrite to replace it or choose another --out")


def _prepare_local(dst: Path, overwrite: bool) -> None:
    """Check ``dst`` can be (re)placed: folder exists (created if missing) and is writable."""
    if dst.exists() and not overwrite:
        raise _exists_error(str(dst))
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create output folder {parent} ({exc.strerror or exc}): choose a writable --out"
        ) from None
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} is not a folder: choose another --out")
    probe = parent / f".{dst.name}.probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(
            f"output folder {parent} is not writable ({exc.strerror or exc}): "
            "choose a writable --out"
        ) from None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


class _LocalStage:
    """A temporary sibling of ``dst`` that is renamed into place by :meth:`commit`."""

    def __init__(self, dst: Path, overwrite: bool):
        self.dst = dst
        self.overwrite = overwrite
        _prepare_local(dst, overwrite)
        self.tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:8]}"

    def commit(self) -> None:
        dst = self.dst
        if dst.exists() and not self.overwrite:  # appeared while we were writing
            raise _exists_error(str(dst))
        if self.tmp.is_dir() or (dst.exists() and dst.is_dir()):
            # directories cannot be swapped atomically: move the old aside, then drop it
            old = None
            if dst.exists() or dst.is_symlink():
                old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(dst, old)
            try:
                os.replace(self.tmp, dst)
            except BaseException:
                if old is not None:
                    os.replace(old, dst)
                raise
            if old is not None:
                _remove(old)
        else:
            os.replace(self.tmp, dst)  # atomic for files

    def discard(self) -> None:
        _remove(self.tmp)


def _staged_all(stages: list[_LocalStage], write: Callable[[], None]) -> None:
    """Run ``write`` (which fills every ``stage.tmp``), then commit all; clean up on failure."""
    try:
        write()
        for s in stages:
            s.commit()
    except BaseException as exc:
        for s in stages:
            s.discard()
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise OutputError(f"cannot write outputs ({exc}): check free space and --out") from exc
        raise


# --------------------------------------------------------------------------- COG
def _cog_profile(compress: str, blocksize: int) -> dict[str, Any]:
    compress = compress.lower()
    if compress not in ("deflate", "zstd"):
        raise InputError(f"COG compression {compress!r} is not supported: use deflate or zstd")
    if blocksize % 16 or blocksize <= 0:
        raise InputError(f"COG block size {blocksize} is not a positive multiple of 16")
    return {
        "driver": "GTiff",
        "interleave": "pixel",
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
        "compress": compress.upper(),
        "predictor": 3,
        "BIGTIFF": "IF_SAFER",
    }


def _band_stats(arr: np.ndarray) -> dict[str, str]:
    """GDAL's statistics metadata (QGIS styles a band from these without a scan)."""
    finite = arr[np.isfinite(arr)]
    if finite.size == 0:
        return {"STATISTICS_VALID_PERCENT": "0"}
    f64 = finite.astype(np.float64)
    return {
        "STATISTICS_MINIMUM": repr(float(f64.min())),
        "STATISTICS_MAXIMUM": repr(float(f64.max())),
        "STATISTICS_MEAN": repr(float(f64.mean())),
        "STATISTICS_STDDEV": repr(float(f64.std())),
        "STATISTICS_VALID_PERCENT": repr(100.0 * finite.size / arr.size),
    }


def _write_cog_file(
    result: MapResult, arrays: list[np.ndarray], path: Path, compress: str, blocksize: int
) -> None:
    import rasterio
    from rasterio.io import MemoryFile
    from rio_cogeo.cogeo import cog_translate

    h, w = arrays[0].shape
    src_profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": len(arrays),
        "dtype": "float32",
        "crs": rasterio.crs.CRS.from_wkt(CRS.from_user_input(result.crs).to_wkt()),
        "transform": result.transform,
        "nodata": float("nan"),
        "tiled": True,
        "blockxsize": blocksize,
        "blockysize": blocksize,
    }
    tags = full_tags(result)
    with MemoryFile() as mem:
        with mem.open(**src_profile) as src:
            for i, (band, arr) in enumerate(zip(result.bands, arrays), 1):
                src.write(arr, i)
                src.set_band_description(i, band.description)
                src.update_tags(i, **band.band_tags(), **_band_stats(arr))
            src.update_tags(**tags)
        with mem.open() as src:
            cog_translate(
                src,
                str(path),
                _cog_profile(compress, blocksize),
                nodata=float("nan"),
                overview_resampling="average",
                forward_band_tags=True,
                quiet=True,
            )


def write_cog(
    result: MapResult,
    path: str | os.PathLike,
    overwrite: bool = False,
    compress: str = "deflate",
    blocksize: int = 512,
) -> Path:
    """Write ``result`` as a COG (float32, NaN nodata, ``blocksize`` tiles, PREDICTOR=3,
    average overviews, band descriptions and tags, provenance dataset tags)."""
    if not _is_local(path):
        raise OutputError(f"COG output {path} is not a local path: write it locally, then upload")
    arrays = check_result(result)
    _cog_profile(compress, blocksize)
    stage = _LocalStage(_local_path(path), overwrite)
    _staged_all([stage], lambda: _write_cog_file(result, arrays, stage.tmp, compress, blocksize))
    return stage.dst


# --------------------------------------------------------------------------- Zarr
def to_dataset(result: MapResult, arrays: list[np.ndarray] | None = None):
    """The xarray Dataset written by :func:`write_zarr` (see module docstring for the layout)."""
    import rioxarray  # noqa: F401  (registers the .rio accessor)
    import xarray as xr

    arrays = check_result(result) if arrays is None else arrays
    h, w = arrays[0].shape
    t = result.transform
    x = t.c + (np.arange(w) + 0.5) * t.a
    y = t.f + (np.arange(h) + 0.5) * t.e
    taken: set[str] = set()
    data_vars = {}
    for band, arr in zip(result.bands, arrays):
        var = safe_name(band.name, taken)
        attrs = {"band_name": band.name, "description": band.description, "long_name": band.description,
                 "kind": band.kind}
        if band.query is not None:
            attrs["query"] = str(band.query)
        if band.zoom is not None:
            attrs["zoom"] = int(band.zoom)
        data_vars[var] = xr.DataArray(arr, dims=("y", "x"), attrs=attrs)
    ds = xr.Dataset(data_vars, coords={"x": ("x", x), "y": ("y", y)})
    ds.x.attrs.update({"axis": "X", "standard_name": "projection_x_coordinate", "units": "m",
                       "long_name": "x coordinate of pixel centre"})
    ds.y.attrs.update({"axis": "Y", "standard_name": "projection_y_coordinate", "units": "m",
                       "long_name": "y coordinate of pixel centre"})
    crs = CRS.from_user_input(result.crs)
    ds = ds.rio.write_crs(crs.to_wkt(), grid_mapping_name="spatial_ref")
    ds = ds.rio.write_transform(t, grid_mapping_name="spatial_ref")
    ds = ds.rio.write_coordinate_system()
    tags = full_tags(result)
    ds.attrs.update(tags)
    ds.attrs["band_variables"] = json.dumps(list(data_vars))
    ds.attrs["Conventions"] = "CF-1.8"
    for var in data_vars:
        ds[var].encoding["grid_mapping"] = "spatial_ref"  # rioxarray keeps it in encoding
        # list spatial_ref as a coordinate so plain xr.open_zarr (decode_coords=True) keeps it
        ds[var].encoding["coordinates"] = "spatial_ref"
        # GDAL's Zarr driver (QGIS) reads the CRS from this attribute
        ds[var].attrs["_CRS"] = {"wkt": crs.to_wkt()}
        ds[var].encoding.update({"_FillValue": np.float32("nan"),
                                 "chunks": (min(h, 512), min(w, 512))})
    return ds


def write_zarr(
    result: MapResult,
    path_or_url: str | os.PathLike,
    overwrite: bool = False,
    zarr_format: int = 2,
) -> str:
    """Write ``result`` as a consolidated Zarr store at a local path or any fsspec URL."""
    arrays = check_result(result)
    ds = to_dataset(result, arrays)
    if _is_local(path_or_url):
        stage = _LocalStage(_local_path(path_or_url), overwrite)
        _staged_all([stage], lambda: _to_zarr(ds, str(stage.tmp), zarr_format))
        return str(stage.dst)
    return _write_zarr_remote(ds, os.fspath(path_or_url), overwrite, zarr_format)


def _to_zarr(ds, target, zarr_format: int) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        ds.to_zarr(target, mode="w-", consolidated=True, zarr_format=zarr_format, compute=True)


def _write_zarr_remote(ds, url: str, overwrite: bool, zarr_format: int) -> str:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/")
    if fs.exists(root) and not overwrite:
        raise _exists_error(url)
    parent, name = root.rsplit("/", 1) if "/" in root else ("", root)
    tmp = f"{parent}/.{name}.tmp-{uuid.uuid4().hex[:8]}" if parent else f".{name}.tmp"
    old = f"{parent}/.{name}.old-{uuid.uuid4().hex[:8]}" if parent else f".{name}.old"
    try:
        _to_zarr(ds, fs.get_mapper(tmp), zarr_format)
        moved_old = False
        if fs.exists(root):
            fs.mv(root, old, recursive=True)
            moved_old = True
        try:
            fs.mv(tmp, root, recursive=True)
        except BaseException:
            if moved_old:
                fs.mv(old, root, recursive=True)
            raise
        if moved_old:
            fs.rm(old, recursive=True)
    except BaseException as exc:
        if fs.exists(tmp):
            fs.rm(tmp, recursive=True)
        if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
            raise OutputError(f"cannot write Zarr {url} ({exc}): check the URL and credentials") from exc
        raise
    return url


# --------------------------------------------------------------------------- previews
def _color_range(band: MapBand, arr: np.ndarray) -> tuple[float, float]:
    finite = arr[np.isfinite(arr)]
    if band.kind == "score":
        return 0.0, 1.0
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [2, 98]))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _region_rings(region_geojson: dict | None, crs: CRS) -> list[np.ndarray]:
    """Exterior and interior rings of a lon/lat GeoJSON as arrays in ``crs``."""
    if not region_geojson:
        return []
    tr = Transformer.from_crs(CRS.from_epsg(4326), crs, always_xy=True)
    rings: list[np.ndarray] = []

    def geoms(obj: dict) -> Iterator[dict]:
        t = obj.get("type")
        if t == "FeatureCollection":
            for f in obj.get("features", []):
                yield from geoms(f)
        elif t == "Feature":
            if obj.get("geometry"):
                yield from geoms(obj["geometry"])
        elif t == "GeometryCollection":
            for g in obj.get("geometries", []):
                yield from geoms(g)
        else:
            yield obj

    for g in geoms(region_geojson):
        polys = {"Polygon": [g.get("coordinates", [])],
                 "MultiPolygon": g.get("coordinates", [])}.get(g.get("type"), [])
        for poly in polys:
            for ring in poly:
                a = np.asarray(ring, dtype=float)
                if a.ndim == 2 and len(a) >= 2:
                    xs, ys = tr.transform(a[:, 0], a[:, 1])
                    rings.append(np.column_stack([xs, ys]))
    return rings


#: largest side in pixels of the array drawn in a preview figure (block means above it)
MAX_FIGURE_PX = 1000


def _block_mean(arr: np.ndarray, max_px: int) -> np.ndarray:
    """NaN-aware k x k block mean so that no side exceeds ``max_px`` (display only)."""
    k = math.ceil(max(arr.shape) / max_px)
    if k <= 1:
        return arr
    h, w = arr.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    pad = np.full((hp, wp), np.nan, dtype=np.float32)
    pad[:h, :w] = arr
    blocks = pad.reshape(hp // k, k, wp // k, k)
    valid = np.isfinite(blocks)
    n = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (total / n).astype(np.float32)
    out[n == 0] = np.nan
    return out


def _figure_png(band: MapBand, arr: np.ndarray, result: MapResult, rings) -> bytes:
    """A titled PNG with a colour bar; NaN pixels are transparent."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import matplotlib as mpl

    h, w = arr.shape
    left, bottom, right, top = result.bounds()
    aspect = h / w
    fig = Figure(figsize=(7.5, max(3.0, min(10.0, 5.6 * aspect + 1.0))), dpi=100)
    FigureCanvasAgg(fig)
    fig.patch.set_facecolor("white")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("none")
    cmap = mpl.colormaps[COLORMAPS[band.kind]].with_extremes(bad=(0, 0, 0, 0))
    vmin, vmax = _color_range(band, arr)
    shown = _block_mean(arr, MAX_FIGURE_PX)
    k = math.ceil(max(arr.shape) / MAX_FIGURE_PX) if shown is not arr else 1
    # padded blocks reach past the raster's right/bottom edge; the axis limits clip them
    s_right = left + shown.shape[1] * k * result.transform.a
    s_bottom = top + shown.shape[0] * k * result.transform.e
    im = ax.imshow(np.ma.masked_invalid(shown), cmap=cmap, vmin=vmin, vmax=vmax,
                   extent=(left, s_right, s_bottom, top), interpolation="nearest", origin="upper")
    for r in rings:
        ax.plot(r[:, 0], r[:, 1], color="black", linewidth=0.8)
    ax.set_xlim(left, right)
    ax.set_ylim(bottom, top)
    ax.set_title(band.description, fontsize=10)
    ax.set_xlabel(f"x (m, {_crs_label(CRS.from_user_input(result.crs))})", fontsize=8)
    ax.set_ylabel("y (m)", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.ticklabel_format(style="plain", useOffset=False)
    label = {"similarity": "similarity (negative CSD)", "uncertainty": "uncertainty",
             "score": "normalised score (0-1)"}[band.kind]
    fig.colorbar(im, ax=ax, label=label, shrink=0.85)
    if not np.isfinite(arr).any():
        ax.text(0.5, 0.5, "no valid pixels", transform=ax.transAxes, ha="center", va="center")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor(), bbox_inches="tight",
                pad_inches=0.15)
    return buf.getvalue()


def _overlay(result: MapResult, arr: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """``arr`` reprojected to Web Mercator (so a Leaflet image overlay in lon/lat bounds is
    exact), at most :data:`MAX_OVERLAY_PX` on a side; returns (array, (W, S, E, N) degrees)."""
    from rasterio.crs import CRS as RCRS
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    h, w = arr.shape
    src_crs = RCRS.from_wkt(CRS.from_user_input(result.crs).to_wkt())
    dst_crs = RCRS.from_epsg(3857)
    left, bottom, right, top = result.bounds()
    tr, dw, dh = calculate_default_transform(src_crs, dst_crs, w, h, left, bottom, right, top)
    scale = max(dw, dh) / MAX_OVERLAY_PX
    if scale > 1:
        dw, dh = max(1, int(dw / scale)), max(1, int(dh / scale))
        tr = tr @ affine.Affine.scale(scale)
    dst = np.full((dh, dw), np.nan, dtype=np.float32)
    reproject(arr, dst, src_transform=result.transform, src_crs=src_crs, src_nodata=np.nan,
              dst_transform=tr, dst_crs=dst_crs, dst_nodata=np.nan, resampling=Resampling.nearest)
    l3, t3 = tr @ (0, 0)
    r3, b3 = tr @ (dw, dh)
    to_ll = Transformer.from_crs(3857, 4326, always_xy=True)
    (west, east), (north, south) = to_ll.transform([l3, r3], [t3, b3])
    return dst, (float(west), float(south), float(east), float(north))


def _rgba_png(band: MapBand, arr: np.ndarray, vrange: tuple[float, float]) -> bytes:
    """Raw pixels coloured with the band's colour map, NaN alpha 0, as an RGBA PNG."""
    import matplotlib as mpl
    from PIL import Image

    vmin, vmax = vrange
    cmap = mpl.colormaps[COLORMAPS[band.kind]]
    norm = np.clip((arr - vmin) / (vmax - vmin), 0, 1)
    rgba = cmap(np.nan_to_num(norm), bytes=True)
    rgba[..., 3] = np.where(np.isfinite(arr), 255, 0).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgba).save(buf, format="PNG", compress_level=4)
    return buf.getvalue()


def write_preview_dir(result: MapResult, arrays: list[np.ndarray], out: Path,
                      progress: bool) -> list[str]:
    """Fill the new folder ``out`` with the preview PNGs and ``index.html`` (no staging; see
    :func:`write_previews`). Returns the file names written."""
    from tqdm.auto import tqdm

    out.mkdir()
    crs = CRS.from_user_input(result.crs)
    rings = _region_rings(result.region_geojson, crs)
    taken: set[str] = set()
    entries = []
    names = []
    for band, arr in tqdm(list(zip(result.bands, arrays)), desc="previews", unit="band",
                          disable=not progress):
        stem = safe_name(band.name, taken)
        fig_png = _figure_png(band, arr, result, rings)
        ov, ov_bounds = _overlay(result, arr)
        vrange = _color_range(band, arr)
        ov_png = _rgba_png(band, ov, vrange)
        (out / f"{stem}.png").write_bytes(fig_png)
        (out / f"{stem}_overlay.png").write_bytes(ov_png)
        names += [f"{stem}.png", f"{stem}_overlay.png"]
        entries.append({
            "name": band.name, "description": band.description, "kind": band.kind,
            "query": band.query, "zoom": band.zoom, "file": f"{stem}.png",
            "vmin": vrange[0], "vmax": vrange[1], "cmap": COLORMAPS[band.kind],
            "valid": float(np.isfinite(arr).mean()),
            "figure": base64.b64encode(fig_png).decode("ascii"),
            "overlay": base64.b64encode(ov_png).decode("ascii"),
            "overlay_bounds": ov_bounds,
        })
    page = _html_page(result, entries)
    (out / "index.html").write_text(page, encoding="utf-8")
    names.append("index.html")
    return names


def write_previews(
    result: MapResult,
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    progress: bool = False,
) -> list[Path]:
    """Write ``out_dir/`` with one PNG per band (title + colour bar), a lon/lat overlay PNG per
    band and a self-contained ``index.html``. Returns the files written."""
    if not _is_local(out_dir):
        raise OutputError(f"preview folder {out_dir} is not a local path: give a local folder")
    arrays = check_result(result)
    stage = _LocalStage(_local_path(out_dir), overwrite)
    names: list[str] = []
    _staged_all([stage], lambda: names.extend(write_preview_dir(result, arrays, stage.tmp, progress)))
    return [stage.dst / n for n in names]


# --------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.2em;color:#222;max-width:1100px}
h1{font-size:1.4em;margin:.2em 0}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em;margin:.6em 0}
.row{display:flex;flex-wrap:wrap;gap:1.2em;align-items:flex-start}
#figure{max-width:100%;border:1px solid #ddd}
#map{width:100%;height:480px;border:1px solid #ddd;display:none}
#mapnote{color:#666;font-size:.9em}
table{border-collapse:collapse;font-size:.85em}
td,th{border:1px solid #ddd;padding:.2em .5em;text-align:left;vertical-align:top}
td.v{word-break:break-all;max-width:700px}
.legend{height:14px;width:260px;border:1px solid #999}
"""

_JS = """
(function(){
var B=JSON.parse(document.getElementById('bands').textContent);
var R=JSON.parse(document.getElementById('region').textContent);
var sel=document.getElementById('band'),img=document.getElementById('figure');
var info=document.getElementById('bandinfo'),op=document.getElementById('opacity');
var map=null,overlay=null;
function show(i){
  var b=B[i];
  img.src='data:image/png;base64,'+b.figure;img.alt=b.description;
  info.textContent=b.description+' | kind: '+b.kind+' | range shown: '+b.vmin.toPrecision(4)+
    ' .. '+b.vmax.toPrecision(4)+' | valid pixels: '+(100*b.valid).toFixed(1)+'%';
  document.getElementById('lmin').textContent=b.vmin.toPrecision(4);
  document.getElementById('lmax').textContent=b.vmax.toPrecision(4);
  document.getElementById('legend').style.background=
    'linear-gradient(to right,'+(b.cmap==='magma'?'#000004,#51127c,#b73779,#fc8961,#fcfdbf':
    '#440154,#3b528b,#21918c,#5ec962,#fde725')+')';
  if(map){
    if(overlay){map.removeLayer(overlay);}
    var o=b.overlay_bounds;
    overlay=L.imageOverlay('data:image/png;base64,'+b.overlay,[[o[1],o[0]],[o[3],o[2]]],
      {opacity:parseFloat(op.value),interactive:false}).addTo(map);
  }
}
sel.addEventListener('change',function(){show(sel.selectedIndex);});
op.addEventListener('input',function(){if(overlay){overlay.setOpacity(parseFloat(op.value));}});
function startMap(){
  if(typeof L==='undefined'){return;}
  try{
    document.getElementById('map').style.display='block';
    map=L.map('map');
    L.tileLayer('https://tile.openstreetmap.org/{z}/{x}/{y}.png',{maxZoom:19,
      attribution:'&copy; OpenStreetMap contributors'}).addTo(map);
    var o=B[0].overlay_bounds;map.fitBounds([[o[1],o[0]],[o[3],o[2]]]);
    if(R){L.geoJSON(R,{style:{color:'#000',weight:1.5,fill:false}}).addTo(map);}
    document.getElementById('mapnote').textContent='Basemap: OpenStreetMap (online).';
    show(sel.selectedIndex);
  }catch(e){document.getElementById('map').style.display='none';}
}
show(0);
window.psmStartMap=startMap;
if(typeof L!=='undefined'){startMap();}
})();
"""


def _html_page(result: MapResult, entries: list[dict]) -> str:
    esc = html.escape
    crs = CRS.from_user_input(result.crs)
    h, w = result.shape
    bounds = result.bounds()
    west, south, east, north = lonlat_bounds(crs, bounds)
    tags = full_tags(result)
    untrained = [k for k, v in tags.items()
                 if "untrained" in k.lower() and str(v).strip().lower() in ("1", "true", "yes")]
    options = "".join(f'<option value="{i}">{esc(e["description"])} [{esc(e["name"])}]</option>'
                      for i, e in enumerate(entries))

    def js_json(obj) -> str:
        return json.dumps(obj).replace("</", "<\\/")

    rows = "".join(f"<tr><th>{esc(k)}</th><td class='v'>{esc(str(tags[k]))}</td></tr>"
                   for k in sorted(tags))
    band_rows = "".join(
        f"<tr><td>{i + 1}</td><td>{esc(e['name'])}</td><td>{esc(e['description'])}</td>"
        f"<td>{esc(e['kind'])}</td><td>{esc(str(e['query'] or ''))}</td>"
        f"<td>{'' if e['zoom'] is None else e['zoom']}</td><td>{100 * e['valid']:.1f}%</td></tr>"
        for i, e in enumerate(entries))
    warn = ("<div class='warn'><b>Untrained weights:</b> this map was made with a checkpoint "
            "holding untrained weights (" + esc(", ".join(untrained)) + "); its values mean "
            "nothing.</div>") if untrained else ""
    geo = (f"<tr><th>CRS</th><td>{esc(_crs_label(crs))} ({esc(crs.name)})</td></tr>"
           f"<tr><th>size</th><td>{w} x {h} px, pixel {result.transform.a:g} m</td></tr>"
           f"<tr><th>bounds (CRS)</th><td>{bounds[0]:.2f}, {bounds[1]:.2f}, {bounds[2]:.2f}, "
           f"{bounds[3]:.2f}</td></tr>"
           f"<tr><th>bounds (lon/lat)</th><td>W {west:.6f}, S {south:.6f}, E {east:.6f}, "
           f"N {north:.6f}</td></tr>")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Soundscape map</title>
<style>{_CSS}</style>
<link rel="stylesheet" href="{LEAFLET_CSS}" crossorigin="">
</head><body>
<h1>Soundscape map</h1>
{warn}
<p><label for="band">Band: </label><select id="band">{options}</select></p>
<p id="bandinfo"></p>
<p>Legend: <span id="lmin"></span> <span id="legend" class="legend"
 style="display:inline-block;vertical-align:middle"></span> <span id="lmax"></span>
 (transparent = no data / outside the region)</p>
<div class="row"><img id="figure" alt=""></div>
<h2>Map</h2>
<p id="mapnote">Basemap unavailable (offline or blocked): the bands above work without it.</p>
<p><label for="opacity">Overlay opacity </label><input id="opacity" type="range" min="0" max="1"
 step="0.05" value="0.75"></p>
<div id="map"></div>
<h2>Grid</h2><table>{geo}</table>
<h2>Bands</h2><table><tr><th>#</th><th>name</th><th>description</th><th>kind</th><th>query</th>
<th>zoom</th><th>valid</th></tr>{band_rows}</table>
<h2>Provenance</h2><table>{rows}</table>
<script type="application/json" id="bands">{js_json(entries)}</script>
<script type="application/json" id="region">{js_json(result.region_geojson)}</script>
<script>{_JS}</script>
<script src="{LEAFLET_JS}" crossorigin="" async
 onload="window.psmStartMap&&window.psmStartMap()"></script>
</body></html>
"""


# --------------------------------------------------------------------------- all outputs
def default_preview_dir(out: str | os.PathLike) -> Path:
    """``map.tif`` -> ``map_preview/`` next to it."""
    p = _local_path(out)
    return p.with_name(p.name.rsplit(".", 1)[0] + "_preview" if "." in p.name else p.name + "_preview")


def write_outputs(
    result: MapResult,
    out: str | os.PathLike,
    fmt: str = "cog",
    previews: bool = True,
    overwrite: bool = False,
    preview_dir: str | os.PathLike | None = None,
    compress: str = "deflate",
    progress: bool = False,
) -> dict[str, Any]:
    """Write the map (``fmt`` "cog" or "zarr") and, if ``previews``, the preview folder
    (default ``<out stem>_preview/``). Every target is checked before anything is written and
    all are renamed into place together at the end. Returns ``{"map": ..., "previews": [...],
    "html": ...}``."""
    fmt = check_format(fmt)
    arrays = check_result(result)
    result = dataclasses.replace(result, tags=full_tags(result))  # one "created" for all
    return stage_outputs(
        out, fmt, previews=previews, overwrite=overwrite, preview_dir=preview_dir,
        write_cog=lambda tmp: _write_cog_file(result, arrays, tmp, compress, 512),
        dataset=lambda: to_dataset(result, arrays),
        write_preview=lambda tmp: write_preview_dir(result, arrays, tmp, progress))


def check_format(fmt: str) -> str:
    """``fmt`` lower-cased, if it is an output format ("cog" or "zarr")."""
    fmt = fmt.lower()
    if fmt not in ("cog", "zarr"):
        raise InputError(f"output format {fmt!r} is unknown: use --format cog or --format zarr")
    return fmt


def stage_outputs(
    out: str | os.PathLike,
    fmt: str,
    *,
    previews: bool,
    overwrite: bool,
    preview_dir: str | os.PathLike | None,
    write_cog: Callable[[Path], None],
    dataset: Callable[[], Any],
    write_preview: Callable[[Path], list[str]],
) -> dict[str, Any]:
    """Check every target, write the map and previews under temporary names and rename them all
    into place (a remote Zarr is written last, staged by the store itself). The local map and
    eager or dask writers share this: ``write_cog(tmp)`` writes the COG, ``dataset()`` gives
    the Zarr's xarray Dataset, ``write_preview(tmp_dir)`` fills the preview folder and returns
    its file names. Returns ``{"map": ..., "previews": [...], "html": ...}``."""
    local = _is_local(out)
    if fmt == "cog" and not local:
        raise OutputError(f"COG output {out} is not a local path: write it locally, then upload")
    if previews and preview_dir is None:
        if local:
            preview_dir = default_preview_dir(out)
        else:
            log.warning("previews skipped: --out %s is not local; give a local preview folder", out)
            previews = False

    map_stage = _LocalStage(_local_path(out), overwrite) if local else None
    prev_stage = _LocalStage(_local_path(preview_dir), overwrite) if previews else None
    stages = [s for s in (map_stage, prev_stage) if s is not None]
    if not local:  # remote Zarr: validate up-front, write it last
        import fsspec

        fs, root = fsspec.core.url_to_fs(os.fspath(out))
        if fs.exists(root.rstrip("/")) and not overwrite:
            raise _exists_error(os.fspath(out))

    names: list[str] = []
    outputs: dict[str, Any] = {}

    def write() -> None:
        if map_stage is not None:
            if fmt == "cog":
                write_cog(map_stage.tmp)
            else:
                _to_zarr(dataset(), str(map_stage.tmp), 2)
        if prev_stage is not None:
            names.extend(write_preview(prev_stage.tmp))
        if map_stage is None:  # remote Zarr last, so a failure discards the staged previews
            outputs["map"] = _write_zarr_remote(dataset(), os.fspath(out), overwrite, 2)

    _staged_all(stages, write)
    if map_stage is not None:
        outputs["map"] = map_stage.dst
    if prev_stage is not None:
        outputs["previews"] = [prev_stage.dst / n for n in names if n.endswith(".png")]
        outputs["html"] = prev_stage.dst / "index.html"
    return outputs


# --------------------------------------------------------------------------- info
def _looks_like_zarr(path: str) -> bool:
    if not _is_local(path):
        return True
    p = _local_path(path)
    return p.is_dir() or p.suffix.lower() == ".zarr"


def read_info(path: str | os.PathLike) -> MapInfo:
    """Describe a map file (COG/GeoTIFF or Zarr): size, CRS, transform, bands, tags.
    ``info.as_dict()`` is JSON-ready; ``info.summary()`` / ``str(info)`` is printable."""
    s = os.fspath(path)
    if _is_local(s) and not _local_path(s).exists():
        raise InputError(f"map {s} does not exist: give the path of a map written by psm-map")
    return _zarr_info(s) if _looks_like_zarr(s) else _cog_info(s)


def _cog_info(path: str) -> MapInfo:
    import rasterio
    from rasterio.errors import RasterioIOError

    try:
        src_ctx = rasterio.open(path)
    except RasterioIOError as exc:
        raise InputError(f"cannot read map {path} ({exc}): give a GeoTIFF or Zarr map") from None
    with src_ctx as src:
        bands = []
        for i in src.indexes:
            t = src.tags(i)
            b: dict[str, Any] = {"index": i, "name": t.get("name", f"band {i}"),
                                 "description": src.descriptions[i - 1] or ""}
            for k in ("kind", "query"):
                if k in t:
                    b[k] = t[k]
            if "zoom" in t:
                b["zoom"] = int(t["zoom"])
            if "STATISTICS_VALID_PERCENT" in t:
                b["valid_percent"] = float(t["STATISTICS_VALID_PERCENT"])
            bands.append(b)
        crs = CRS.from_wkt(src.crs.to_wkt()) if src.crs else None
        ll = lonlat_bounds(crs, tuple(src.bounds)) if crs else None
        ist = src.tags(ns="IMAGE_STRUCTURE")
        extra = {"dtype": src.dtypes[0], "nodata": src.nodata,
                 "blocksize": list(src.block_shapes[0]),
                 "compression": src.compression.name if src.compression else None,
                 "predictor": ist.get("PREDICTOR"), "overviews": src.overviews(1)}
        return MapInfo(path=path, format="cog", width=src.width, height=src.height,
                       crs=_crs_label(crs) if crs else "none", transform=tuple(src.transform)[:6],
                       bounds_lonlat=ll, bands=bands, tags=dict(src.tags()), extra=extra)


def _zarr_info(path: str) -> MapInfo:
    import rioxarray  # noqa: F401
    import xarray as xr

    try:
        ds = xr.open_zarr(path, consolidated=None)
    except Exception as exc:  # zarr raises many kinds
        raise InputError(f"cannot read Zarr map {path} ({exc}): give a map written by psm-map") from None
    with ds:
        variables = json.loads(ds.attrs.get("band_variables", "null")) or [
            v for v in ds.data_vars if set(ds[v].dims) == {"y", "x"}]
        bands = []
        for i, v in enumerate(variables, 1):
            a = ds[v].attrs
            b: dict[str, Any] = {"index": i, "variable": v, "name": a.get("band_name", v),
                                 "description": a.get("description", "")}
            for k in ("kind", "query", "zoom"):
                if k in a:
                    b[k] = a[k]
            bands.append(b)
        rcrs = ds.rio.crs
        crs = CRS.from_wkt(rcrs.to_wkt()) if rcrs else None
        transform = ds.rio.transform()
        w, h = ds.sizes["x"], ds.sizes["y"]
        bnds = (transform.c, transform.f + h * transform.e, transform.c + w * transform.a, transform.f)
        tags = {k: str(v) for k, v in ds.attrs.items() if k not in ("band_variables",)}
        return MapInfo(path=path, format="zarr", width=w, height=h,
                       crs=_crs_label(crs) if crs else "none", transform=tuple(transform)[:6],
                       bounds_lonlat=lonlat_bounds(crs, bnds) if crs else None, bands=bands,
                       tags=tags, extra={"variables": variables})
