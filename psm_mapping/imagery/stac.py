"""Sentinel-2 L2A true colour from a STAC API or a static STAC catalog.

Scenes are searched for the region (on first read or :meth:`STACSource.prepare`), filtered
by date range and cloud cover, sorted least cloudy first; each read warps the ``visual`` COG
assets (HTTP range requests through GDAL ``/vsicurl/``) to the requested grid and fills the
pixels still empty from the next scene. Catalogs that need signed URLs take a ``sign`` hook.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime as _dt
from datetime import time as _time
from datetime import timezone
from typing import Callable
from urllib.parse import urlsplit

import numpy as np
import rasterio
from rasterio.crs import CRS as RioCRS
from rasterio.enums import Resampling
from rasterio.errors import RasterioError
from rasterio.transform import from_bounds
from rasterio.vrt import WarpedVRT
from rasterio.warp import transform_bounds
from tqdm.auto import tqdm

from ..errors import ImageryError
from .base import ImagerySource, ImageryWindow, SourceInfo, check_window
from .http import DEFAULT_USER_AGENT

log = logging.getLogger(__name__)

S2_ATTRIBUTION = "Contains modified Copernicus Sentinel data {years}"
S2_LICENSE = "Copernicus Sentinel data terms (free, full and open; attribution required)"


@dataclass(frozen=True)
class Scene:
    """One STAC item reduced to what a read needs."""

    id: str
    href: str
    cloud_cover: float
    bbox: tuple[float, float, float, float]
    datetime: _dt | None = None


def _parse_datetime_range(value: str | None) -> tuple[_dt | None, _dt | None]:
    """``"2023-01-01/2023-12-31"`` (either end may be ``..`` or empty) -> UTC datetimes;
    a date-only end includes that whole day."""
    if not value:
        return None, None
    parts = value.split("/")
    if len(parts) == 1:
        parts = [parts[0], parts[0]]
    if len(parts) != 2:
        raise ImageryError(f"bad datetime range {value!r}: use START/END, e.g. "
                           "2023-01-01/2023-12-31")

    def one(text: str, end: bool) -> _dt | None:
        text = text.strip()
        if text in ("", ".."):
            return None
        try:
            d = _dt.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ImageryError(f"bad date {text!r} in {value!r}: use ISO dates like 2023-06-30"
                               ) from None
        if end and len(text) <= 10:
            d = _dt.combine(d.date(), _time.max)
        return d if d.tzinfo else d.replace(tzinfo=timezone.utc)

    return one(parts[0], False), one(parts[1], True)


def _boxes(b) -> list[tuple[float, float, float, float]]:
    """A lon/lat box as one or two boxes that do not cross the antimeridian."""
    w, s, e, n = b
    if w <= e:
        return [(w, s, e, n)]
    return [(w, s, 180.0, n), (-180.0, s, e, n)]


def bbox_intersects(a, b) -> bool:
    return any(a1[0] <= b1[2] and b1[0] <= a1[2] and a1[1] <= b1[3] and b1[1] <= a1[3]
               for a1 in _boxes(a) for b1 in _boxes(b))


def bbox_contains(outer, inner) -> bool:
    return all(any(o[0] <= i[0] and o[1] <= i[1] and i[2] <= o[2] and i[3] <= o[3]
                   for o in _boxes(outer)) for i in _boxes(inner))


def resolve_signer(sign) -> Callable[[str], str] | None:
    """A callable href -> signed href from ``sign``: None, a callable or ``"planetary-computer"``."""
    if sign is None or callable(sign):
        return sign
    if sign in ("planetary-computer", "planetary_computer", "pc"):
        try:
            import planetary_computer
        except ImportError:
            raise ImageryError(
                "sign='planetary-computer' needs the planetary-computer package: "
                "pip install planetary-computer") from None
        return planetary_computer.sign
    raise ImageryError(f"unknown sign hook {sign!r}: pass a callable href -> signed href "
                       "or 'planetary-computer'")


class STACSource(ImagerySource):
    """True-colour mosaic of the least cloudy Sentinel-2 L2A scenes of a STAC catalog."""

    def __init__(
        self,
        url: str,
        *,
        collection: str | None = "sentinel-2-l2a",
        datetime: str | None = "2023-01-01/2023-12-31",
        max_cloud: float = 20.0,
        max_items: int = 20,
        sign: Callable[[str], str] | str | None = None,
        asset: str = "visual",
        name: str | None = None,
        attribution: str | None = None,
        license: str = S2_LICENSE,
        resampling: str = "auto",
        stretch: tuple[float, float] = (0.0, 3000.0),
        user_agent: str | None = None,
        retries: int = 3,
        timeout: float = 30.0,
        gdal_options: dict[str, str] | None = None,
        progress: bool = False,
    ):
        if not url:
            raise ImageryError("empty STAC URL: pass stac:https://host/api or a catalog.json path")
        self.url = url
        self.collection = collection
        self.datetime = datetime
        self.start, self.end = _parse_datetime_range(datetime)
        self.max_cloud = float(max_cloud)
        self.max_items = int(max_items)
        self.sign = resolve_signer(sign)
        self.asset = asset
        self.resampling = resampling
        self.stretch = stretch
        self.progress = progress
        self.user_agent = user_agent or DEFAULT_USER_AGENT
        self.gdal_env = {
            "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
            "GDAL_HTTP_MAX_RETRY": str(retries),
            "GDAL_HTTP_RETRY_DELAY": "1",
            "GDAL_HTTP_TIMEOUT": str(int(timeout)),
            "GDAL_HTTP_USERAGENT": self.user_agent,
            "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
            "GDAL_HTTP_MULTIPLEX": "YES",
            "VSI_CACHE": "TRUE",
            **(gdal_options or {}),
        }
        self.scenes: list[Scene] = []
        self._searched: list[tuple[float, float, float, float]] = []
        host = urlsplit(url).hostname or os.path.basename(str(url).rstrip("/"))
        self._attribution = attribution
        self.info = SourceInfo(
            name=name or f"stac:{host}:{collection or 'items'}",
            kind="stac",
            attribution=attribution or S2_ATTRIBUTION.format(years=self._years_label()),
            license=license,
            native_resolution=10.0,
            extra={"sat_type": "sentinel", "collection": collection, "datetime": datetime,
                   "max_cloud": self.max_cloud, "asset": asset},
        )

    def _years_label(self) -> str:
        years = sorted({s.datetime.year for s in self.scenes if s.datetime})
        if not years and self.start and self.end:
            years = list(range(self.start.year, self.end.year + 1))
        return ", ".join(map(str, years)) if years else ""

    # -- search -------------------------------------------------------------------------
    def prepare(self, bounds_lonlat: tuple[float, float, float, float]) -> list[Scene]:
        """Search scenes for a region (west, south, east, north in degrees); returns them."""
        bounds_lonlat = tuple(float(v) for v in bounds_lonlat)
        if any(bbox_contains(done, bounds_lonlat) for done in self._searched):
            return self.scenes
        found = self.search(bounds_lonlat)
        known = {s.id for s in self.scenes}
        merged = self.scenes + [s for s in found if s.id not in known]
        self.scenes = sorted(merged, key=lambda s: (s.cloud_cover, s.id))
        self._searched.append(bounds_lonlat)
        if not self.scenes:
            raise ImageryError(
                f"no {self.collection or 'STAC'} scenes in {self.url} for bbox "
                f"{tuple(round(v, 4) for v in bounds_lonlat)}, datetime {self.datetime}, "
                f"cloud cover < {self.max_cloud:g}%: widen the date range (datetime=...) "
                "or raise the cloud limit (max_cloud=...)")
        if self._attribution is None:
            self.info.attribution = S2_ATTRIBUTION.format(years=self._years_label())
        log.info("%d scenes for %s (least cloudy %.1f%%)", len(self.scenes), bounds_lonlat,
                 self.scenes[0].cloud_cover)
        return self.scenes

    def search(self, bounds_lonlat) -> list[Scene]:
        """Scenes for ``bounds_lonlat``: least cloudy first, at most ``max_items``."""
        root = self._open_root()
        if root is not None and self._is_api(root):
            items = self._search_api(bounds_lonlat)
        else:
            items = self._walk_static(root, bounds_lonlat)
        scenes = []
        for item in items:
            scene = self._scene(item)
            if scene is not None:
                scenes.append(scene)
        scenes.sort(key=lambda s: (s.cloud_cover, s.id))
        return scenes[: self.max_items]

    def _open_root(self):
        import pystac

        try:
            return pystac.read_file(self.url)
        except Exception as exc:
            raise ImageryError(
                f"cannot open STAC catalog {self.url} ({type(exc).__name__}: {exc}): check the "
                "URL or path and your network") from exc

    @staticmethod
    def _is_api(root) -> bool:
        import pystac

        if not isinstance(root, pystac.Catalog):
            return False
        conforms = root.extra_fields.get("conformsTo", []) or []
        return any(l.rel == "search" for l in root.links) or any(
            "item-search" in c for c in conforms)

    def _search_api(self, bounds_lonlat):
        from pystac_client import Client, ConformanceClasses

        try:
            client = Client.open(self.url, headers={"User-Agent": self.user_agent})
            kwargs = {}
            if client.conforms_to(ConformanceClasses.QUERY):
                kwargs["query"] = {"eo:cloud_cover": {"lt": self.max_cloud}}
            if client.conforms_to(ConformanceClasses.SORT):
                kwargs["sortby"] = [{"field": "properties.eo:cloud_cover", "direction": "asc"}]
            search = client.search(
                collections=[self.collection] if self.collection else None,
                bbox=list(bounds_lonlat), datetime=self.datetime or None,
                max_items=max(self.max_items * 5, 50), **kwargs)
            items = list(search.items())
        except Exception as exc:
            raise ImageryError(
                f"STAC search at {self.url} failed ({type(exc).__name__}: {exc}): check the "
                "URL, the collection name and your network") from exc
        return [it for it in items if self._cloud(it) < self.max_cloud]

    def _walk_static(self, root, bounds_lonlat):
        import pystac

        if isinstance(root, pystac.Item):
            items = [root]
        elif isinstance(root, pystac.ItemCollection):
            items = list(root.items)
        elif isinstance(root, pystac.Catalog):
            start = root
            if self.collection and root.id != self.collection:
                child = root.get_child(self.collection)
                start = child if child is not None else root
            items = start.get_items(recursive=True)
        else:
            raise ImageryError(f"{self.url} is not a STAC catalog, collection or item: pass "
                               "the catalog.json of a static catalog or an API root")
        out = []
        for item in items:
            if self.collection and item.collection_id not in (None, self.collection):
                continue
            if item.bbox is None or not bbox_intersects(tuple(item.bbox), bounds_lonlat):
                continue
            if not self._in_dates(item):
                continue
            if self._cloud(item) >= self.max_cloud:
                continue
            out.append(item)
        return out

    def _in_dates(self, item) -> bool:
        from pystac.utils import str_to_datetime

        props = item.properties
        t0 = item.datetime or (str_to_datetime(props["start_datetime"])
                               if props.get("start_datetime") else None)
        t1 = item.datetime or (str_to_datetime(props["end_datetime"])
                               if props.get("end_datetime") else None)
        if t0 is None:
            return True
        if self.start and t1 < self.start:
            return False
        if self.end and t0 > self.end:
            return False
        return True

    @staticmethod
    def _cloud(item) -> float:
        value = item.properties.get("eo:cloud_cover")
        return float(value) if value is not None else 100.0

    def _scene(self, item) -> Scene | None:
        asset = item.assets.get(self.asset)
        if asset is None and self.asset == "visual":
            asset = item.assets.get("TCI") or item.assets.get("tci")
        if asset is None:
            log.warning("item %s has no %r asset; skipped", item.id, self.asset)
            return None
        return Scene(item.id, asset.get_absolute_href() or asset.href, self._cloud(item),
                     tuple(item.bbox), item.datetime)

    def identity(self) -> str:
        """The catalog and the search and mosaic settings that choose and shape the pixels."""
        return (f"stac:{self.url}|collection={self.collection}|datetime={self.datetime}|"
                f"max_cloud={self.max_cloud:g}|max_items={self.max_items}|asset={self.asset}|"
                f"resampling={self.resampling}|stretch={list(self.stretch)}")

    # -- reading ------------------------------------------------------------------------
    def read(self, bounds, crs, shape) -> ImageryWindow:
        bounds, crs, height, width = check_window(bounds, crs, shape)
        rio_crs = RioCRS.from_user_input(crs.to_wkt())
        lonlat = transform_bounds(rio_crs, "EPSG:4326", *bounds, densify_pts=21)
        self.prepare(lonlat)
        data = np.zeros((3, height, width), np.uint8)
        mask = np.zeros((height, width), bool)
        dst_transform = from_bounds(*bounds, width, height)
        candidates = [s for s in self.scenes if bbox_intersects(s.bbox, lonlat)]
        faults, errors, failed = 0, [], []
        with rasterio.Env(**self.gdal_env):
            for scene in tqdm(candidates, desc="scenes", unit="scene", leave=False,
                              disable=not self.progress):
                if mask.all():
                    break
                try:
                    d, m = self._read_scene(scene, rio_crs, dst_transform, (height, width))
                except (RasterioError, OSError) as exc:
                    faults += 1
                    errors.append(f"{scene.id}: {exc}")
                    failed.append(scene)
                    continue
                fill = m & ~mask
                data[:, fill] = d[:, fill]
                mask |= fill
        if candidates and faults == len(candidates):
            raise ImageryError(
                f"cannot read any {self.asset!r} asset from {self.url} ({errors[0]}): check "
                "your network, or pass sign=... if the catalog needs signed URLs")
        fault_mask = None
        if faults:
            log.warning("%d of %d scenes could not be read (%s); their footprints are masked and "
                        "retried by the next run", faults, len(candidates), "; ".join(errors)[:300])
            # a failed scene would have filled (or, less cloudy, replaced) pixels in its
            # footprint: all of them are faults, never silently another scene's
            fault_mask = _footprints_mask(failed, rio_crs, dst_transform, (height, width))
            mask &= ~fault_mask
            data[:, fault_mask] = 0
        return ImageryWindow(data, mask, bounds, crs, faults=faults, fault_mask=fault_mask)

    def _read_scene(self, scene: Scene, dst_crs, dst_transform, shape):
        href = self.sign(scene.href) if self.sign else scene.href
        height, width = shape
        with rasterio.open(href) as ds:
            if ds.count < 3:
                raise ImageryError(
                    f"asset {self.asset!r} of {scene.id} has {ds.count} band(s): pick a "
                    "true-colour asset with asset=...")
            level, ratio = self._overview_level(ds, dst_crs, dst_transform, shape)
        opts = {"overview_level": level} if level >= 0 else {}
        with rasterio.open(href, **opts) as ds:
            has_mask = ds.nodata is not None or any(
                ci.name == "alpha" for ci in [*ds.colorinterp])
            with WarpedVRT(ds, crs=dst_crs, transform=dst_transform, width=width,
                           height=height, resampling=self._resampling(ratio),
                           add_alpha=not has_mask) as vrt:
                raw = vrt.read(indexes=[1, 2, 3])
                valid = vrt.dataset_mask() > 0
        if raw.dtype != np.uint8:
            lo, hi = self.stretch
            raw = np.clip((raw.astype(np.float32) - lo) * (255.0 / (hi - lo)), 0, 255)
            raw = np.round(raw).astype(np.uint8)
        return raw, valid

    @staticmethod
    def _overview_level(ds, dst_crs, dst_transform, shape) -> tuple[int, float]:
        """Coarsest overview not coarser than the request (-1: full resolution), and the
        ratio of requested to chosen pixel size."""
        height, width = shape
        left, top = dst_transform.c, dst_transform.f
        right, bottom = left + dst_transform.a * width, top + dst_transform.e * height
        l, b, r, t = transform_bounds(dst_crs, ds.crs, left, bottom, right, top,
                                      densify_pts=21)
        want = min((r - l) / width, (t - b) / height)
        native = min(abs(ds.transform.a), abs(ds.transform.e))
        level, chosen = -1, native
        for i, factor in enumerate(ds.overviews(1)):
            if native * factor <= want * 1.0001:
                level, chosen = i, native * factor
        return level, want / chosen

    def _resampling(self, ratio: float) -> Resampling:
        if self.resampling != "auto":
            return Resampling[self.resampling]
        return Resampling.average if ratio > 1.01 else Resampling.bilinear


def _footprints_mask(scenes, dst_crs, dst_transform, shape) -> np.ndarray:
    """bool ``shape``: pixels inside any of the scenes' lon/lat bounding boxes."""
    from rasterio.features import geometry_mask
    from rasterio.warp import transform_geom
    from shapely.geometry import box, mapping

    geoms = [transform_geom("EPSG:4326", dst_crs, mapping(box(*s.bbox).segmentize(0.01)))
             for s in scenes]
    return geometry_mask(geoms, out_shape=shape, transform=dst_transform, invert=True,
                         all_touched=True)
