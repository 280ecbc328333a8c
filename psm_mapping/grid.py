"""The output pixel grid: pixel size = stride metres in a projected CRS (UTM of the region's
centroid, UPS beyond the UTM latitudes, or a given CRS), pixel edges on multiples of the
stride so that runs over overlapping regions share pixels, and square blocks of work.

A pixel is in the map when its centre is inside the region (``OutputGrid.mask``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry.base import BaseGeometry

from . import constants
from .errors import InputError, RegionError
from .region import Region, wrap_lon

__all__ = [
    "Block", "GridEstimate", "OutputGrid", "iter_blocks", "make_grid", "utm_crs_for",
    "DEFAULT_MAX_PIXELS", "DEFAULT_BLOCK_SIZE",
]

from .config import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_PIXELS, check_stride, check_zoom_levels  # noqa: E402
#: rough chips/s of the full-size ViT-B/16 image path, for the time estimate only (CPU: measured
#: 4.4/s on 2 cores, benchmarks/bench_model.py; GPU: an assumption, not yet measured)
ROUGH_CHIPS_PER_S = {"gpu": 400.0, "cpu": 4.0}
#: densify lon/lat edges to this many degrees before projecting (straight lon/lat edges
#: are curves in a projected CRS)
_DENSIFY_DEG = 0.01


@dataclass(frozen=True)
class Block:
    """A square-ish piece of the grid (clipped at the right and bottom edges)."""

    index: tuple[int, int]  # (block row, block column), as a Zarr chunk index
    row_off: int
    col_off: int
    height: int
    width: int
    #: zoom indices ``(first, stop)`` this block holds on their own zoom grid (scale-true
    #: sampling, :mod:`psm_mapping.zoomgrid`); None: every zoom on the output grid
    zooms: tuple[int, int] | None = None

    @property
    def zoom_slice(self) -> slice:
        """The block's zoom planes in the store's ``[zoom, y, x]`` arrays."""
        return slice(None) if self.zooms is None else slice(*self.zooms)

    @property
    def slices(self) -> tuple[slice, slice]:
        return (slice(self.row_off, self.row_off + self.height),
                slice(self.col_off, self.col_off + self.width))


def iter_blocks(height: int, width: int, block_size: int) -> Iterator[Block]:
    """Every block of a ``height`` x ``width`` grid in row-major order (the last row and column
    of blocks clipped): the grid's blocks and the store's Zarr chunks."""
    for bi, r in enumerate(range(0, height, block_size)):
        for bj, c in enumerate(range(0, width, block_size)):
            yield Block((bi, bj), r, c, min(block_size, height - r), min(block_size, width - c))


@dataclass
class GridEstimate:
    """What a run over a grid will cost, stated before work starts."""

    pixels: int
    zoom_levels: tuple[int, ...]
    chips: int
    blocks: int
    seconds_gpu: float
    seconds_cpu: float
    #: per zoom the zoom grid's cell size in output pixels (scale-true sampling); None: dense
    zoom_factors: tuple[int, ...] | None = None

    def __str__(self) -> str:
        scale = self.zoom_factors is not None and any(f > 1 for f in self.zoom_factors)
        how = (f" on their own grids (cells of {'/'.join(str(f) for f in self.zoom_factors)} px): "
               f"{self.chips:,} chips ({self.chips / max(1, self.pixels):.2f} per pixel)") if scale \
            else f" = {self.chips:,} chips"
        return (f"{self.pixels:,} pixels x {len(self.zoom_levels)} zoom levels "
                f"{tuple(self.zoom_levels)}{how} in {self.blocks} block{'' if self.blocks == 1 else 's'}; "
                f"with a full-size ViT-B/16 roughly {_fmt_s(self.seconds_gpu)} on a GPU, "
                f"{_fmt_s(self.seconds_cpu)} on CPU")


def _fmt_s(s: float) -> str:
    if s < 90:
        return f"{s:.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


@dataclass
class OutputGrid:
    """Output pixels: ``transform`` maps (col, row) to ``crs`` coordinates of pixel corners;
    ``mask`` [height, width] is True where the pixel centre is inside the region."""

    crs: CRS
    stride: float
    transform: Affine
    width: int
    height: int
    mask: np.ndarray
    sat_type: str = "sentinel"
    zoom_levels: tuple[int, ...] = constants.DEFAULT_ZOOM_LEVELS
    region_name: str = "region"
    #: the region in ``crs`` (densified before projection)
    region_geometry: BaseGeometry | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.height, self.width)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(left, bottom, right, top) in ``crs``."""
        left, top = self.transform.c, self.transform.f
        return (left, top - self.height * self.stride, left + self.width * self.stride, top)

    @property
    def pixel_count(self) -> int:
        return int(self.mask.sum())

    @property
    def geobox(self):
        """The grid as an ``odc.geo.geobox.GeoBox``."""
        from odc.geo.geobox import GeoBox

        return GeoBox((self.height, self.width), self.transform, self.crs.to_wkt())

    def blocks(self, block_size: int = DEFAULT_BLOCK_SIZE,
               skip_empty: bool = True) -> Iterator[Block]:
        """Blocks in row-major order; with ``skip_empty`` only those with region pixels."""
        if block_size <= 0:
            raise InputError(f"block size {block_size} must be a positive number of pixels")
        for b in iter_blocks(self.height, self.width, block_size):
            if not skip_empty or self.mask[b.slices].any():
                yield b

    def n_blocks(self, block_size: int = DEFAULT_BLOCK_SIZE) -> int:
        return sum(1 for _ in self.blocks(block_size))

    def _full_block(self) -> Block:
        return Block((0, 0), 0, 0, self.height, self.width)

    def pixel_centers(self, block: Block | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) of pixel centres in ``crs``, each float64 [h, w]; ``block``: anything with
        ``row_off``, ``col_off``, ``height`` and ``width`` (default: the whole grid)."""
        b = block or self._full_block()
        cols = b.col_off + np.arange(b.width) + 0.5
        rows = b.row_off + np.arange(b.height) + 0.5
        x = self.transform.c + cols * self.transform.a
        y = self.transform.f + rows * self.transform.e
        return np.broadcast_to(x[None, :], (b.height, b.width)).copy(), \
            np.broadcast_to(y[:, None], (b.height, b.width)).copy()

    def to_lonlat(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        """Grid CRS coordinates -> (lon in [-180, 180), lat) degrees."""
        tr = Transformer.from_crs(self.crs, "EPSG:4326", always_xy=True)
        lon, lat = tr.transform(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
        return wrap_lon(lon), np.asarray(lat)

    def pixel_lonlat(self, block: Block | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(lon, lat) in degrees of pixel centres, each float64 [h, w]."""
        return self.to_lonlat(*self.pixel_centers(block))

    def estimate(self, block_size: int = DEFAULT_BLOCK_SIZE, zoom_factors=None) -> GridEstimate:
        """Pixel count, chip count (pixels x zooms; with ``zoom_factors``, the cells each zoom's
        own grid needs, :mod:`psm_mapping.zoomgrid`) and a rough time."""
        px = self.pixel_count
        chips = px * len(self.zoom_levels)
        blocks = self.n_blocks(block_size)
        if zoom_factors is not None and any(int(f) > 1 for f in zoom_factors):
            from .zoomgrid import chips_needed, zoom_groups

            chips = sum(chips_needed(self.mask, zoom_factors))
            blocks = blocks + sum(-(-g.height // block_size) * -(-g.width // block_size)
                                  for g in zoom_groups(self.height, self.width, zoom_factors)[1:])
        return GridEstimate(px, tuple(self.zoom_levels), chips, blocks,
                            chips / ROUGH_CHIPS_PER_S["gpu"], chips / ROUGH_CHIPS_PER_S["cpu"],
                            tuple(int(f) for f in zoom_factors) if zoom_factors is not None else None)


def utm_crs_for(lon: float, lat: float) -> CRS:
    """UTM zone CRS (WGS 84) for a point; UPS North/South beyond 84N / 80S."""
    if lat > 84.0:
        return CRS.from_epsg(32661)
    if lat < -80.0:
        return CRS.from_epsg(32761)
    lon = wrap_lon(lon)
    zone = int(math.floor((lon + 180.0) / 6.0)) + 1
    zone = min(max(zone, 1), 60)
    # the Norway and Svalbard exceptions of the UTM standard
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        zone = 32
    elif 72.0 <= lat <= 84.0 and lon >= 0.0:
        if lon < 9.0:
            zone = 31
        elif lon < 21.0:
            zone = 33
        elif lon < 33.0:
            zone = 35
        elif lon < 42.0:
            zone = 37
    return CRS.from_epsg((32600 if lat >= 0 else 32700) + zone)


def _check_crs(crs) -> CRS:
    try:
        out = CRS.from_user_input(crs)
    except Exception:
        raise InputError(f"unknown --crs {crs!r}: give e.g. EPSG:32633 or a WKT/PROJ string") \
            from None
    if not out.is_projected:
        raise InputError(f"--crs {crs!r} is not a projected CRS: the stride is in metres, "
                         "pick a projected CRS such as a UTM zone (e.g. EPSG:32633)")
    unit = (out.axis_info[0].unit_name or "").lower() if out.axis_info else ""
    if unit not in ("metre", "meter", "m"):
        raise InputError(f"--crs {crs!r} has units of {unit or 'unknown'}, not metres: "
                         "pick a metric projected CRS (e.g. a UTM zone)")
    return out


def project_region(region: Region, crs: CRS) -> BaseGeometry:
    """The region geometry in ``crs``, lon/lat edges densified first."""
    geom = region.unwrapped()
    geom = shapely.segmentize(geom, _DENSIFY_DEG)
    tr = Transformer.from_crs("EPSG:4326", crs, always_xy=True)

    def fwd(xy):
        x, y = tr.transform(xy[:, 0], xy[:, 1])
        return np.column_stack([x, y])

    out = shapely.transform(geom, fwd)
    if not np.all(np.isfinite(shapely.get_coordinates(out))):
        raise RegionError(f"region {region.name!r} cannot be projected to {crs.name}: "
                          "pass a --crs that covers it (e.g. its UTM zone)")
    return shapely.make_valid(out)


def make_grid(region: Region, stride: float | None = None, crs=None,
              sat_type: str = "sentinel",
              zoom_levels: tuple[int, ...] | list[int] = constants.DEFAULT_ZOOM_LEVELS,
              max_pixels: int = DEFAULT_MAX_PIXELS) -> OutputGrid:
    """Build the output grid of ``region``; default stride = zoom-1 footprint / 4."""
    if sat_type not in constants.GSD:
        raise InputError(f"unknown sat type {sat_type!r}: use one of {', '.join(constants.GSD)}")
    zoom_levels = check_zoom_levels(zoom_levels, upper=None)
    stride = check_stride(stride)
    if stride is None:
        stride = constants.footprint_m(sat_type, 1) / 4.0
    if crs is None:
        crs_obj = utm_crs_for(*region.centroid_lonlat())
    else:
        crs_obj = _check_crs(crs)
    geom = project_region(region, crs_obj)
    if geom.is_empty or geom.area <= 0:
        raise RegionError(f"region {region.name!r} is empty in {crs_obj.name}: "
                          "give a polygon with an area")

    est_pixels = geom.area / stride**2
    minx, miny, maxx, maxy = geom.bounds
    eps = 1e-9
    x0 = math.floor(minx / stride + eps) * stride
    y0 = math.floor(miny / stride + eps) * stride
    x1 = math.ceil(maxx / stride - eps) * stride
    y1 = math.ceil(maxy / stride - eps) * stride
    width = max(1, int(round((x1 - x0) / stride)))
    height = max(1, int(round((y1 - y0) / stride)))
    if est_pixels > max_pixels or width * height > 20 * max_pixels + 1_000_000:
        raise InputError(
            f"region {region.name!r} at stride {stride:g} m needs about {est_pixels:,.0f} "
            f"pixels (grid {width} x {height}), above the limit of {max_pixels:,}: raise it with "
            f"--max-pixels {int(est_pixels * 1.1) + 1} or use a larger --stride")
    transform = Affine(stride, 0.0, x0, 0.0, -stride, y1)

    from rasterio.features import geometry_mask

    mask = geometry_mask([geom], out_shape=(height, width), transform=transform, invert=True)
    if not mask.any():
        # a region smaller than one pixel: keep the pixel holding its centroid
        c = geom.centroid
        col = min(width - 1, int((c.x - x0) // stride))
        row = min(height - 1, int((y1 - c.y) // stride))
        mask[row, col] = True
    return OutputGrid(crs=crs_obj, stride=stride, transform=transform, width=width,
                      height=height, mask=mask, sat_type=sat_type, zoom_levels=zoom_levels,
                      region_name=region.name, region_geometry=geom)
