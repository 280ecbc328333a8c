"""A month x hour cube as a result: its variables (per query, and uncertainty), its settings,
bands per setting, and the provenance tags (built by :func:`build_cube_result`, written by
:mod:`psm_mapping.outputs.cube`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import affine
import numpy as np
from pyproj import CRS

from .results import MapBand, MapResult

CUBE_SOURCE = ("fusion and heads re-run from the pre-fusion z_img of one embedding store, per month/hour "
               "setting (no image inference)")


@dataclass
class CubeVariable:
    """One cube variable: ``data`` float32 ``[S, Z, H, W]`` (settings month-major), NaN nodata."""

    name: str  # "similarity:birds chirping", "score:...", "uncertainty"
    kind: str  # "similarity" | "score" | "uncertainty"
    description: str
    data: np.ndarray
    query: str | None = None


@dataclass
class SettingBand(MapBand):
    """A band of one cube setting: its band tags also name ``month`` and ``hour``."""

    month: int | None = None
    hour: int | None = None

    def band_tags(self) -> dict[str, str]:
        tags = super().band_tags()
        if self.month is not None:
            tags["month"] = str(int(self.month))
        if self.hour is not None:
            tags["hour"] = str(int(self.hour))
        return tags


@dataclass
class CubeResult:
    """A cube on one grid: variables, the axes (``months``/``hours``, None: absent, then
    ``month``/``hour`` is the fixed value), zooms and georeferencing."""

    variables: list[CubeVariable]
    months: tuple[int, ...] | None
    hours: tuple[int, ...] | None
    month: int | None
    hour: int | None
    zoom_levels: tuple[int, ...]
    crs: CRS
    transform: affine.Affine
    tags: dict[str, str] = field(default_factory=dict)
    region_geojson: dict | None = None

    @property
    def settings(self) -> list[tuple[int | None, int | None]]:
        ms = self.months if self.months is not None else (self.month,)
        hs = self.hours if self.hours is not None else (self.hour,)
        return [(m, h) for m in ms for h in hs]

    @property
    def dims(self) -> tuple[str, ...]:
        return tuple(d for d, v in (("month", self.months), ("hour", self.hours)) if v is not None)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.variables[0].data.shape[-2:])  # type: ignore[return-value]

    def setting_text(self, s: int) -> str:
        """``"month 5, hour 14"`` for setting ``s`` (a fixed item in parentheses is left out)."""
        m, h = self.settings[s]
        return ", ".join(t for t, on in ((f"month {m}", self.months is not None),
                                         (f"hour {h}", self.hours is not None)) if on)

    def setting_stem(self, s: int) -> str:
        """``"m05_h14"`` (an absent axis left out)."""
        m, h = self.settings[s]
        return "_".join(t for t, on in ((f"m{m:02d}" if m is not None else "", self.months is not None),
                                        (f"h{h:02d}" if h is not None else "", self.hours is not None)) if on)

    def slice_result(self, s: int) -> MapResult:
        """The single-setting map of setting ``s``: the bands :func:`build_map_result` makes
        (per query and zoom, similarity then score, then uncertainty per zoom), its tags with
        that month and hour."""
        m, h = self.settings[s]
        axes = (m if self.months is not None else None, h if self.hours is not None else None)
        bands = []
        sims = [v for v in self.variables if v.kind != "uncertainty"]
        by_query: dict[str, list[CubeVariable]] = {}
        for v in sims:
            by_query.setdefault(v.query, []).append(v)
        for q, vs in by_query.items():
            for k, z in enumerate(self.zoom_levels):
                for v in vs:
                    bands.append(SettingBand(f"{v.kind}:{q}:z{z}", v.data[s, k],
                                             f"{v.description} at zoom {z}", v.kind, q, z, *axes))
        for v in self.variables:
            if v.kind == "uncertainty":
                for k, z in enumerate(self.zoom_levels):
                    bands.append(SettingBand(f"uncertainty:z{z}", v.data[s, k], f"{v.description} at zoom {z}",
                                             "uncertainty", None, z, *axes))
        tags = dict(self.tags)
        tags.update(cube_tags(self))
        tags.update({"month": "" if m is None else str(m), "hour": "" if h is None else str(h),
                     "metadata": _with_setting(tags.get("metadata", ""), m, h)})
        return MapResult(bands, self.crs, self.transform, tags, self.region_geojson)


def _with_setting(metadata: str, month, hour) -> str:
    """The ``metadata`` tag (``"month=5, fuse=True"``) with this setting's month and hour."""
    items = [p for p in (x.strip() for x in metadata.split(",")) if p and not p.startswith(("month=", "hour="))]
    if hour is not None:
        items.insert(0, f"hour={hour}")
    if month is not None:
        items.insert(0, f"month={month}")
    return ", ".join(items)


def cube_tags(result: CubeResult) -> dict[str, str]:
    """The provenance a cube adds: which months and hours, and how they were made."""
    return {"cube_dims": ",".join(result.dims),
            "cube_months": ",".join(str(m) for m in result.months) if result.months is not None else "",
            "cube_hours": ",".join(str(h) for h in result.hours) if result.hours is not None else "",
            "cube_settings": str(len(result.settings)), "cube_source": CUBE_SOURCE}


def build_cube_result(cube, grid_or_store, tags: dict, region=None, score: bool = False) -> CubeResult:
    """Variables of a :class:`~psm_mapping.cube.QueryCube`, NaN outside the region (a grid's
    ``mask``). ``score``: similarity rescaled to 0..1 per zoom over the whole cube (one scale
    across settings, so changes between settings stay visible)."""
    if hasattr(grid_or_store, "mask") and hasattr(grid_or_store, "transform"):
        crs, transform, mask = grid_or_store.crs, grid_or_store.transform, grid_or_store.mask
    else:
        spec = grid_or_store.spec
        crs, transform, mask = CRS.from_wkt(spec.crs_wkt), affine.Affine(*spec.transform), None

    def masked(a):
        if hasattr(a, "dask"):  # a streamed cube stays lazy
            import dask.array as da

            a = a.astype(np.float32)
            return a if mask is None else da.where(np.asarray(mask), a, np.float32(np.nan)).astype(np.float32)
        a = np.asarray(a, np.float32)
        return a if mask is None else np.where(mask, a, np.nan).astype(np.float32)

    probabilistic = any(q.embedding.logvar is not None for q in cube.queries)
    what = "similarity (negative csd)" if probabilistic else "similarity (cosine)"
    variables = []
    for q, sim in zip(cube.queries, cube.similarity):
        data = masked(sim)
        variables.append(CubeVariable(f"similarity:{q.label}", "similarity",
                                      f"{what} to {q.kind} query '{q.label}'", data, q.label))
        if score:
            with np.errstate(all="ignore"):
                if hasattr(data, "dask"):  # one streamed pass for the range, the score stays lazy
                    import dask
                    import dask.array as da

                    lo, hi = (np.asarray(x) for x in dask.compute(da.nanmin(data, axis=(0, 2, 3), keepdims=True),
                                                                   da.nanmax(data, axis=(0, 2, 3), keepdims=True)))
                else:
                    lo = np.nanmin(data, axis=(0, 2, 3), keepdims=True)
                    hi = np.nanmax(data, axis=(0, 2, 3), keepdims=True)
            sc = ((data - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)
            variables.append(CubeVariable(f"score:{q.label}", "score", f"0-1 score for '{q.label}' (one scale "
                                          "over the cube)", sc, q.label))
    if probabilistic:
        variables.append(CubeVariable("uncertainty", "uncertainty", "image embedding uncertainty (std norm)",
                                      masked(cube.uncertainty)))
    t = {str(k): str(v) for k, v in tags.items()}
    t["queries"] = " | ".join(f"{q.kind}:{q.label}" for q in cube.queries)
    geojson = None
    if region is not None:
        from shapely.geometry import mapping

        geojson = mapping(region.geometry)
    ax = cube.axes
    return CubeResult(variables, ax.months, ax.hours, ax.month, ax.hour, tuple(cube.zoom_levels),
                      CRS.from_user_input(crs), transform, t, geojson)


def preview_data(a, max_px: int = 256) -> np.ndarray:
    """``a`` ``[S, Z, H, W]`` for previews and colour ranges: NumPy as it is; a streamed (dask)
    cube as NaN-aware block means whose longer side is at most ``max_px`` (one pass, small)."""
    if not hasattr(a, "dask"):
        return a
    import math

    import dask.array as da

    f = max(1, math.ceil(max(a.shape[-2:]) / max_px))
    if f == 1:
        return np.asarray(a.compute(), np.float32)
    ok = da.isfinite(a)
    s = da.coarsen(np.sum, da.where(ok, a, 0.0), {2: f, 3: f}, trim_excess=True)
    n = da.coarsen(np.sum, ok.astype(np.float32), {2: f, 3: f}, trim_excess=True)
    return np.asarray(da.where(n > 0, s / da.maximum(n, 1), np.nan).astype(np.float32).compute())



def _as_map(result: CubeResult) -> MapResult:
    """A MapResult with the cube's tags and georeferencing (for the shared tag helpers)."""
    bands = [MapBand(v.name, v.data[0, 0], v.description, v.kind, v.query) for v in result.variables]
    return MapResult(bands, result.crs, result.transform, dict(result.tags), result.region_geojson)
