"""Run settings: :class:`MapConfig` with one :meth:`~MapConfig.validate`, and one checker per
kind of value (zoom levels, stride, whole-number sizes, min-valid, month, hour) that the grid,
the drivers, the CLI and training all call.

Checkers raise :class:`~psm_mapping.errors.InputError` with the option's field name in
``exc.option`` and a message that does not spell a command-line flag; the CLI adds the flag."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from .constants import DEFAULT_BATCH_SIZE, DEFAULT_MIN_VALID, DEFAULT_ZOOM_LEVELS, HOUR_RANGE, MONTH_RANGE
from .errors import InputError, OutputError

#: the largest zoom level a map accepts (chip = zoom x base tile; trained on 1, 3, 5)
MAX_ZOOM_LEVEL = 5
#: pixels of the region a run accepts unless told otherwise
DEFAULT_MAX_PIXELS = 2_000_000
#: side in pixels of a block (the unit of work and the store's chunk)
DEFAULT_BLOCK_SIZE = 64


# --------------------------------------------------------------------------- checkers
def check_zoom_levels(zoom_levels, upper: int | None = MAX_ZOOM_LEVEL, option: str = "zoom_levels") -> tuple[int, ...]:
    """Zoom levels as a tuple of positive ints (``"1,3,5"`` or a sequence), at most ``upper``."""
    text = zoom_levels
    try:
        if isinstance(zoom_levels, str):
            zoom_levels = [t for t in zoom_levels.split(",") if t.strip()]
        z = tuple(int(v) for v in zoom_levels)
    except (TypeError, ValueError):
        raise InputError(f"bad zoom levels {text!r}: give integers like 1,3,5", option=option) from None
    if not z or any(v < 1 for v in z):
        raise InputError(f"bad zoom levels {z or text!r}: give positive integers, e.g. 1,3,5", option=option)
    if upper is not None and any(v > upper for v in z):
        raise InputError(f"zoom levels {z} are outside the trained range: PSM zoom levels are chip-size "
                         f"multipliers 1..{upper} (trained on 1,3,5), not web-map zooms: give e.g. 1,3,5",
                         option=option)
    return z


def check_stride(stride) -> float | None:
    """The output pixel size in metres (None: the default for the sat type)."""
    if stride is None:
        return None
    try:
        s = float(stride)
    except (TypeError, ValueError):
        raise InputError(f"stride {stride!r} is not a number: give metres, e.g. 40", option="stride") from None
    if not math.isfinite(s) or s <= 0:
        raise InputError(f"stride {s:g} must be positive: give the pixel size in metres, e.g. 40", option="stride")
    return s


def check_count(option: str, value, lo: int = 1) -> int:
    """A whole number >= ``lo`` (batch size, block size, pixel limit, workers)."""
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{option.replace('_', ' ')} {value!r} is not a whole number: give one >= {lo}",
                         option=option) from None
    if v < lo:
        raise InputError(f"{option.replace('_', ' ')} {value} must be at least {lo}: give a positive whole number",
                         option=option)
    return v


def check_fraction(option: str, value) -> float:
    """A fraction in [0, 1] (min-valid)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = float("nan")
    if not 0.0 <= v <= 1.0:
        raise InputError(f"{option.replace('_', ' ')} {value} must be in [0, 1]: give the minimum valid fraction "
                         "of a chip, e.g. 0.5", option=option)
    return v


def check_month(month) -> int | None:
    """1..12, or None (masked)."""
    return _in_range("month", month, *MONTH_RANGE)


def check_hour(hour) -> int | None:
    """0..23, or None (masked)."""
    return _in_range("hour", hour, *HOUR_RANGE)


def _in_range(option: str, value, lo: int, hi: int) -> int | None:
    if value is None:
        return None
    try:
        v = int(value)
        ok = v == float(value)
    except (TypeError, ValueError):
        ok = False
    if not ok or not lo <= v <= hi:
        raise InputError(f"{option} {value} out of range: use {lo}..{hi} (leave it out: unknown/masked)",
                         option=option)
    return v


def check_months(months) -> tuple[int, ...] | None:
    """The months of a cube (1..12) from ``"3,6,9"``, ``"1-12"``, ``"1-12/3"`` or a sequence;
    None: no month axis."""
    return _time_list("months", months, *MONTH_RANGE, "3,6,9 or 1-12 or 1-12/3")


def check_hours(hours) -> tuple[int, ...] | None:
    """The hours of a cube (0..23) from ``"6,12,18"``, ``"0-23"``, ``"0-23/3"`` or a sequence;
    None: no hour axis."""
    return _time_list("hours", hours, *HOUR_RANGE, "6,12,18 or 0-23 or 0-23/3")


def _time_list(option: str, value, lo: int, hi: int, example: str) -> tuple[int, ...] | None:
    """Lists (``a,b``), ranges (``a-b``, both ends included) and steps (``a-b/s``) of whole
    numbers in ``lo..hi``, in the order given, repeats dropped."""
    if value is None:
        return None
    text = value if isinstance(value, str) else ",".join(str(v) for v in value)
    out: list[int] = []

    def bad(why: str) -> InputError:
        return InputError(f"{option} {text!r} {why}: give {lo}..{hi} as a list, a range or a range "
                          f"with a step, e.g. {example}", option=option)

    for tok in (t.strip() for t in text.split(",")):
        if not tok:
            continue
        m = re.fullmatch(r"(-?\d+)(?:\s*-\s*(-?\d+)(?:\s*/\s*(\d+))?)?", tok)
        if m is None:
            raise bad(f"has {tok!r}, which is not a number or range")
        a = int(m[1])
        b = int(m[2]) if m[2] is not None else a
        step = int(m[3]) if m[3] is not None else 1
        for v in (a, b):
            if not lo <= v <= hi:
                raise bad(f"is out of range ({v})")
        if b < a:
            raise bad(f"has the range {tok} running backwards (write it {b}-{a})")
        if step < 1:
            raise bad(f"has the step {step} in {tok}")
        out += [v for v in range(a, b + 1, step) if v not in out]
    if not out:
        raise bad("is empty")
    return tuple(out)


#: how zoom levels are sampled (:mod:`psm_mapping.zoomgrid`)
ZOOM_SAMPLINGS = ("scale", "dense")
DEFAULT_ZOOM_SAMPLING = "dense"


def check_zoom_sampling(value) -> str:
    """``scale`` or ``dense`` (None: the default)."""
    v = str(value or DEFAULT_ZOOM_SAMPLING).strip().lower()
    if v not in ZOOM_SAMPLINGS:
        raise InputError(f"zoom sampling {value!r} is not known: use scale (each zoom on its own grid) or "
                         "dense (every zoom at every output pixel)", option="zoom_sampling")
    return v


#: how a cube is written as COG: "auto" (one multi-band COG within the band limit), "bands", "folder"
CUBE_LAYOUTS = ("auto", "bands", "folder")


def default_imagery() -> str:
    """The imagery of a run that names none: the newest Sentinel-2 cloudless preset."""
    from .imagery.presets import EOX_YEARS

    return f"s2cloudless-{max(EOX_YEARS)}"


def imagery_sat_type(imagery: str | None) -> str:
    """The sat type a preset is meant for (the default imagery's for None); ``sentinel`` else."""
    from .imagery.presets import PRESETS

    p = PRESETS.get(str(imagery or default_imagery()))
    return p.sat_type if p is not None else "sentinel"


# --------------------------------------------------------------------------- the settings
@dataclass
class ScoringSettings:
    """The settings every scoring run shares (maps and sites: :class:`MapConfig`,
    :class:`~psm_mapping.places.PointsConfig`), written once. ``imagery``: a spec for
    :func:`psm_mapping.imagery.open_source` (path, ``xyz:URL``, ``stac:URL`` or preset; None: the
    newest Sentinel-2 cloudless preset); ``checkpoint`` None: ``$PSM_CHECKPOINT``, the cache, or the
    official checkpoint for the imagery's sat type, downloaded on first use."""

    imagery: str | None = None
    queries: Sequence[str] = ()
    audio: Sequence[str] = ()
    combine: bool = False
    checkpoint: str | None = None
    clap_config: str | dict | None = None
    tokenizer: str | None = None
    zoom_levels: Sequence[int] = DEFAULT_ZOOM_LEVELS
    crs: str | None = None
    month: int | None = None
    hour: int | None = None
    audio_source: str | None = None
    caption_source: str | None = None
    fuse: bool = True
    overwrite: bool = False
    store: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    #: chips per model call (maps also take ``"auto"``: from the device's free memory,
    #: :func:`~psm_mapping.embed.auto_batch_size`)
    batch_size: int | str = DEFAULT_BATCH_SIZE
    min_valid: float = DEFAULT_MIN_VALID
    progress: bool = True
    #: download nothing (checkpoint, tokenizer): a missing piece is an error at once
    offline: bool = False
    imagery_options: dict = field(default_factory=dict)

    def check_settings(self, auto_batch: bool = False) -> None:
        """The shared checks, normalising in place: zoom levels, batch size (``auto_batch``:
        ``"auto"`` allowed), min-valid, month and hour."""
        self.zoom_levels = check_zoom_levels(self.zoom_levels)
        if auto_batch and str(self.batch_size).strip().lower() == "auto":
            self.batch_size = "auto"
        else:
            self.batch_size = check_count("batch_size", self.batch_size)
        self.min_valid = check_fraction("min_valid", self.min_valid)
        self.month, self.hour = check_month(self.month), check_hour(self.hour)


# --------------------------------------------------------------------------- the run
@dataclass
class MapConfig(ScoringSettings):
    """Everything a map run needs: :class:`ScoringSettings` and the map's own. Paths are strings
    or Paths."""

    region: str | None = None
    bbox: str | Sequence[float] | None = None
    feature: str | None = None
    stride: float | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    out: str = "psm-map.tif"
    format: str = "cog"
    previews: bool = True
    score: bool = False
    #: cut chips on the device from one uploaded window per zoom (None: on CUDA only)
    device_cut: bool | None = None
    #: ``torch.compile`` the image encoder
    compile: bool = False
    block_size: int = DEFAULT_BLOCK_SIZE
    #: ``scale``: each zoom level on its own grid (cells of about a quarter chip), resampled to the
    #: output grid at query time; ``dense`` (the default, see README): every zoom at every output
    #: pixel (:mod:`psm_mapping.zoomgrid`)
    zoom_sampling: str = "dense"
    #: reader threads in front of the model (read, decode, warp, cut); None: a function of the
    #: cores (:func:`psm_mapping.pipeline.default_readers`); 0: the single prefetch thread of
    #: earlier versions (chips cut in the model's thread)
    readers: int | None = None
    extra_tags: dict = field(default_factory=dict)
    #: fsspec storage options for a remote ``store`` URL (e.g. S3 ``key``/``secret``/``client_kwargs``)
    store_options: dict = field(default_factory=dict)
    #: a month x hour cube (issue 13): the months / hours of its axes ("1-12", "0-23/3", [3, 6]);
    #: None: no such axis (then ``month`` / ``hour`` is the one value, or masked)
    months: Sequence[int] | str | None = None
    hours: Sequence[int] | str | None = None
    #: COG layout of a cube: one multi-band file ("bands", "auto" within the limit) or "folder"
    cube_layout: str = "auto"

    def validate(self) -> "MapConfig":
        """Cheap checks of every value, before the model loads; normalises the numbers in place."""
        self.check_output_name()
        if self.stride is not None:
            self.stride = check_stride(self.stride)
        self.check_settings(auto_batch=True)
        self.block_size = check_count("block_size", self.block_size)
        self.max_pixels = check_count("max_pixels", self.max_pixels)
        if self.readers is not None:
            self.readers = check_count("readers", self.readers, lo=0)
        self.check_time()
        self.zoom_sampling = check_zoom_sampling(self.zoom_sampling)
        if self.is_cube and self.zoom_sampling != "dense":
            raise InputError("month x hour cubes need --zoom-sampling dense (the default): each zoom's grid of "
                             "--zoom-sampling scale is not the output grid a cube is fused on", option="zoom_sampling")
        return self

    @property
    def is_cube(self) -> bool:
        """Whether this run makes a month x hour cube (``months`` or ``hours`` given)."""
        return self.months is not None or self.hours is not None

    def check_time(self) -> None:
        """Month, hour and the cube's axes in range; one value or an axis per item, not both."""
        self.month, self.hour = check_month(self.month), check_hour(self.hour)  # also when called alone
        self.months, self.hours = check_months(self.months), check_hours(self.hours)
        for one, many in (("month", "months"), ("hour", "hours")):
            if getattr(self, one) is not None and getattr(self, many) is not None:
                raise InputError(f"both --{one} and --{many} given: --{one} makes one map, --{many} a cube "
                                 f"axis; give one of them", option=many)
        if str(self.cube_layout) not in CUBE_LAYOUTS:
            raise InputError(f"cube layout {self.cube_layout!r} is unknown: use {', '.join(CUBE_LAYOUTS)}",
                             option="cube_layout")

    def check_output_name(self) -> None:
        """The output name must end as the format writes it (a COG named .png or .zarr misleads)."""
        from .outputs.results import FORMAT_SUFFIXES

        fmt, out = str(self.format).lower(), self.out
        if fmt not in FORMAT_SUFFIXES:
            raise InputError(f"--format {fmt!r} is not supported: use cog or zarr", option="format")
        name = str(out).rstrip("/").lower()
        if not name.endswith(FORMAT_SUFFIXES[fmt]):
            hint = " or pass --format zarr" if name.endswith(".zarr") else (
                " or pass --format cog" if name.endswith((".tif", ".tiff")) else "")
            raise OutputError(f"--out {out} does not match --format {fmt}: name it *{FORMAT_SUFFIXES[fmt][0]} for "
                              f"a {fmt.upper() if fmt == 'cog' else 'Zarr'} output{hint}", option="out")
