"""Soundscapes through the day and the year: month x hour cubes from one embedding store.

PSM fuses month and hour into every image embedding (PSM_SPEC.md section 3), so a cube needs no
image inference: per block the store's pre-fusion ``z_img`` (float16) is read once, and the
fusion transformer and heads run batched over every (pixel-zoom, month, hour) of the block, in
rows of :data:`FUSION_ROWS` (on the model's device and under its dtype rules, as embedding).

* :class:`TimeAxes`     the cube's axes (months and/or hours) and its settings, month-major
* :func:`cube_store`    similarity ``[S, Z, H, W]`` per query and uncertainty, as :class:`QueryCube`
* :func:`point_profile` one pixel's month x hour profile (``psm-map query --point LON,LAT``)
* :func:`check_cube_model`  the refusals (no metadata fuser, ``--no-fusion``, an axis the
  checkpoint's metadata lack)

Every slice equals the single-setting map of :func:`psm_mapping.query.query_store` re-run
from ``z_img`` with that month and hour (the same fusion, heads and csd, batched differently).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .embed import MetadataOptions
from .errors import InputError, StoreError
from .model.heads import csd_from_parts
from .model import Metadata
from .model.fusion import metadata_items
from .query import Query, _LonLat, prepare_query
from .store import DONE, EmbeddingStore

log = logging.getLogger(__name__)

#: (pixel-zoom, setting) rows per fusion forward pass: large enough to fill the matrix units,
#: small enough that activations (7 tokens x 2048 features x 4 bytes a row) stay ~0.5 GB
FUSION_ROWS = 8192
#: a cube held in memory larger than this is refused (fewer settings, a smaller region)
MAX_CUBE_BYTES = 16 << 30
from .outputs.labels import MONTH_NAMES, setting_label  # noqa: E402,F401  (public here too)


@dataclass(frozen=True)
class TimeAxes:
    """The axes of a cube: ``months`` (1..12) and/or ``hours`` (0..23), None: no such axis
    (then ``month`` / ``hour`` is the one value every setting has, None: masked)."""

    months: tuple[int, ...] | None = None
    hours: tuple[int, ...] | None = None
    month: int | None = None
    hour: int | None = None

    def __post_init__(self):
        if self.months is None and self.hours is None:
            raise InputError("a cube needs --months and/or --hours (e.g. --months 1-12 --hours 0-23/3)",
                             option="months")

    @classmethod
    def from_config(cls, cfg) -> "TimeAxes":
        """The axes of a checked :class:`~psm_mapping.config.MapConfig` (``cfg.check_time()``)."""
        return cls(tuple(cfg.months) if cfg.months is not None else None,
                   tuple(cfg.hours) if cfg.hours is not None else None, cfg.month, cfg.hour)

    @property
    def dims(self) -> tuple[str, ...]:
        """``("month", "hour")``, absent axes left out."""
        return tuple(d for d, v in (("month", self.months), ("hour", self.hours)) if v is not None)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(v) for v in (self.months, self.hours) if v is not None)

    @property
    def settings(self) -> list[tuple[int | None, int | None]]:
        """``(month, hour)`` of every setting, month-major (the order of ``[S, ...]`` arrays)."""
        ms = self.months if self.months is not None else (self.month,)
        hs = self.hours if self.hours is not None else (self.hour,)
        return [(m, h) for m in ms for h in hs]

    def __len__(self) -> int:
        return len(self.settings)



def check_cube_model(model_config, metadata: MetadataOptions, axes: TimeAxes) -> None:
    """Refuse a cube that fusion cannot make: a checkpoint without metadata, ``--no-fusion``, or
    an axis the checkpoint's metadata lack. One line each, before anything is written."""
    items = metadata_items(model_config.metadata_type)
    if not items:
        raise InputError(f"this checkpoint has no metadata fusion (metadata_type "
                         f"{model_config.metadata_type!r}), so month and hour change nothing: a month x hour "
                         "cube needs a metadata checkpoint (e.g. GeoSound_pcmepp_metadata_sentinel); leave out "
                         "--months/--hours", option="months")
    if not metadata.fuse:
        raise InputError("--no-fusion skips the metadata fusion that month and hour go through: drop "
                         "--no-fusion to make a cube, or leave out --months/--hours", option="months")
    for axis, item, flag in (("months", "month", "--months"), ("hours", "time", "--hours")):
        if getattr(axes, axis) is not None and item not in items:
            raise InputError(f"this checkpoint's metadata ({model_config.metadata_type}) have no "
                             f"{axis[:-1]}: leave out {flag}", option=axis)


@dataclass
class QueryCube:
    """``similarity[q]`` float32 ``[S, Z, H, W]`` per query (S settings of ``axes``, month-major);
    ``uncertainty`` ``[S, Z, H, W]``; NaN where the store has nothing done."""

    axes: TimeAxes
    zoom_levels: tuple[int, ...]
    queries: list[Query]
    similarity: list[np.ndarray]
    uncertainty: np.ndarray
    metadata: MetadataOptions
    seconds: dict[str, float] = field(default_factory=dict)

    def setting_index(self, month: int | None = None, hour: int | None = None) -> int:
        """The index into ``S`` of (month, hour); an absent axis takes its one value."""
        m = month if self.axes.months is not None else self.axes.month
        h = hour if self.axes.hours is not None else self.axes.hour
        try:
            return self.axes.settings.index((m, h))
        except ValueError:
            raise InputError(f"month {month}, hour {hour} is not a setting of this cube") from None


def settings_metadata(metadata: MetadataOptions, settings: Sequence[tuple], n: int,
                      lon: np.ndarray | None, lat: np.ndarray | None) -> Metadata:
    """:class:`Metadata` of ``len(settings) x n`` rows, setting-major (row ``s * n + i`` is pixel
    ``i`` at setting ``s``): month and hour per setting, location per pixel, sources as given."""
    S = len(settings)
    ms = [m for m, _ in settings]
    hs = [h for _, h in settings]
    month = None if all(m is None for m in ms) else np.repeat(np.asarray([m or 0 for m in ms], np.int64), n)
    hour = None if all(h is None for h in hs) else np.repeat(
        np.asarray([-1 if h is None else h for h in hs], np.int64), n)
    use = metadata.use_location and lon is not None
    return Metadata(lat=np.tile(lat, S) if use else None, lon=np.tile(lon, S) if use else None,
                    month=month, hour=hour, audio_source=metadata.audio_source,
                    caption_source=metadata.caption_source)


def fuse_settings(model, z_img: np.ndarray, lon: np.ndarray, lat: np.ndarray, metadata: MetadataOptions,
                  settings: Sequence[tuple], qm: torch.Tensor, qvs: torch.Tensor | None,
                  rows: int = FUSION_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Similarity ``[Q, S, N]`` and uncertainty ``[S, N]`` (float32) of ``N`` stored ``z_img`` rows
    ``[N, D]`` at every setting: one fusion + heads pass per ``rows`` (pixel, setting) rows, the
    similarity (csd, or cosine with ``qvs`` None) on the model's device. Rows whose ``z_img`` is
    not finite (no chip) stay NaN."""
    N, S, Q = z_img.shape[0], len(settings), qm.shape[0]
    sim = np.full((Q, S, N), np.nan, np.float32)
    unc = np.full((S, N), np.nan, np.float32)
    ok = np.isfinite(z_img).all(1)
    idx = np.flatnonzero(ok)
    if idx.size == 0:
        return sim, unc
    dev = model.device
    z_all = torch.from_numpy(np.ascontiguousarray(z_img[idx]).astype(np.float32, copy=False))
    qt = qm.float().T.contiguous().to(dev)
    qv = qvs.float().to(dev) if qvs is not None else None
    step = max(1, rows // S)
    for p in range(0, idx.size, step):
        sel = idx[p:p + step]
        n = sel.size
        z = z_all[p:p + n].to(dev).repeat(S, 1)  # setting-major rows
        md = settings_metadata(metadata, settings, n, lon[sel], lat[sel])
        emb = model.embed_image_features(z, md, fuse=True)
        with torch.inference_mode():
            dot = emb.mean.float() @ qt  # [S*n, Q]
            if qv is not None and emb.logvar is not None:
                vs = emb.var_sum().float()
                s = csd_from_parts(dot, vs[:, None], qv[None, :])
                u = emb.uncertainty().float()
                unc[:, sel] = u.reshape(S, n).cpu().numpy()
            else:
                s = dot
                if emb.logvar is not None:
                    unc[:, sel] = emb.uncertainty().float().reshape(S, n).cpu().numpy()
            sim[:, :, sel] = s.T.reshape(Q, S, n).cpu().numpy()
    return sim, unc


def cube_bytes(store: EmbeddingStore, n_queries: int, n_settings: int) -> int:
    s = store.spec
    return (n_queries + 1) * n_settings * len(s.zoom_levels) * s.height * s.width * 4


def check_dense_store(store: EmbeddingStore) -> None:
    """Cubes read every zoom of a block at once on the output grid: a store built with
    ``--zoom-sampling scale`` (each zoom on its own grid) is refused with the fix."""
    if not store.spec.dense:
        raise StoreError(f"{store.url} holds scale-true zoom grids (--zoom-sampling scale); month x hour cubes "
                         "need a dense store: rerun the map with --zoom-sampling dense (the default)")


def cube_store(store: EmbeddingStore, queries: Sequence[Query], model, metadata: MetadataOptions,
               axes: TimeAxes, progress: Callable[[int, int], None] | None = None,
               rows: int = FUSION_ROWS) -> QueryCube:
    """The month x hour cube of ``queries`` over every done block of ``store``: per block
    ``z_img`` is read once (all zooms), then fusion and heads run for every setting of ``axes``
    (``metadata`` gives the sources and ``fuse``; its month/hour are the fixed values of absent
    axes). ``progress(done, total)`` after each block."""
    check_dense_store(store)
    import time

    check_cube_model(model.config, metadata, axes)
    t0 = time.perf_counter()
    spec = store.spec
    qm, qvs, _ = prepare_query(store, queries, None)
    settings = axes.settings
    S, Z, H, W, bs = len(settings), len(spec.zoom_levels), spec.height, spec.width, spec.block_size
    need = cube_bytes(store, len(queries), S)
    if need > MAX_CUBE_BYTES:
        raise InputError(f"this cube ({S} settings x {Z} zooms x {H} x {W} px, {len(queries)} queries) needs "
                         f"{need / 2**30:.1f} GiB of memory, over the {MAX_CUBE_BYTES / 2**30:.0f} GiB limit: "
                         "give fewer --months/--hours (e.g. --hours 0-23/3) or a smaller region", option="months")
    sims = [np.full((S, Z, H, W), np.nan, np.float32) for _ in queries]
    unc = np.full((S, Z, H, W), np.nan, np.float32)
    done = store.done_mask()
    status = store.status()
    lonlat = _LonLat(store)
    blocks = [b for b in store.iter_blocks() if done[b.row_off // bs, b.col_off // bs]]
    t_read = t_fuse = 0.0
    for k, b in enumerate(blocks):
        ys, xs = b.slices
        t1 = time.perf_counter()
        z = store.read("z_img", ys, xs, where=f"block {b.index}")  # [Z, h, w, D], once for all settings
        lon, lat = lonlat(b)
        t2 = time.perf_counter()
        zz = z.reshape(-1, z.shape[-1])
        lon_all = np.broadcast_to(lon, (Z, b.height, b.width)).reshape(-1)
        lat_all = np.broadcast_to(lat, (Z, b.height, b.width)).reshape(-1)
        sim, u = fuse_settings(model, zz, lon_all, lat_all, metadata, settings, qm, qvs, rows)
        shape = (S, Z, b.height, b.width)
        for q in range(len(queries)):
            sims[q][:, :, ys, xs] = sim[q].reshape(shape)
        unc[:, :, ys, xs] = u.reshape(shape)
        t_read += t2 - t1
        t_fuse += time.perf_counter() - t2
        if progress is not None:
            progress(k + 1, len(blocks))
    nd = status != DONE  # never computed, or a read fault: NaN at every setting
    if nd.any():
        unc[:, nd] = np.nan
        for s in sims:
            s[:, nd] = np.nan
    secs = {"read_z_img": t_read, "fusion": t_fuse, "cube_total": time.perf_counter() - t0}
    return QueryCube(axes, tuple(spec.zoom_levels), list(queries), sims, unc, metadata, secs)


# ---------------------------------------------------------------------------- one place
@dataclass
class PointProfile:
    """The month x hour profile of one pixel: ``similarity`` ``[Q, S, Z]``, ``uncertainty``
    ``[S, Z]`` (float32), at the store pixel (``row``, ``col``) holding (``lon``, ``lat``)."""

    lon: float
    lat: float
    row: int
    col: int
    x: float
    y: float
    axes: TimeAxes
    zoom_levels: tuple[int, ...]
    queries: list[Query]
    similarity: np.ndarray
    uncertainty: np.ndarray


def default_profile_axes(model_config, cfg) -> TimeAxes:
    """A profile's axes: those given, else every month and hour the checkpoint's metadata have
    (an item given as one value, ``--month 5``, stays fixed)."""
    items = metadata_items(model_config.metadata_type)
    months, hours = cfg.months, cfg.hours
    if months is None and hours is None:
        months = tuple(range(1, 13)) if "month" in items and cfg.month is None else None
        hours = tuple(range(24)) if "time" in items and cfg.hour is None else None
    if months is None and hours is None:
        raise InputError(f"this checkpoint's metadata ({model_config.metadata_type!r}) have no month or hour "
                         "to profile: --point needs a metadata checkpoint", option="point")
    return TimeAxes(tuple(months) if months is not None else None, tuple(hours) if hours is not None else None,
                    cfg.month, cfg.hour)


def parse_point(text) -> tuple[float, float]:
    """``"LON,LAT"`` in degrees."""
    try:
        parts = [float(v) for v in str(text).split(",")] if isinstance(text, str) else [float(v) for v in text]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2 or not np.isfinite(parts).all():
        raise InputError(f"--point {text!r} is not LON,LAT: give two numbers in degrees, e.g. --point 6.63,46.52",
                         option="point")
    lon, lat = parts
    if not (-180 <= lon <= 180 and -90 <= lat <= 90):
        raise InputError(f"--point {text!r} is out of range: give LON in -180..180 and LAT in -90..90 (LON first)",
                         option="point")
    return lon, lat


def point_profile(store: EmbeddingStore, queries: Sequence[Query], model, metadata: MetadataOptions,
                  axes: TimeAxes, lon: float, lat: float) -> PointProfile:
    """The cube at the one store pixel that holds (``lon``, ``lat``): the same numbers as
    :func:`cube_store` there (the pixel's centre gives the location metadata, as in the map)."""
    check_dense_store(store)
    from affine import Affine
    from pyproj import CRS, Transformer

    check_cube_model(model.config, metadata, axes)
    spec = store.spec
    t = Transformer.from_crs("EPSG:4326", CRS.from_wkt(spec.crs_wkt), always_xy=True)
    x, y = t.transform(lon, lat)
    col, row = (~Affine(*spec.transform)) @ (x, y)
    row, col = int(np.floor(row)), int(np.floor(col))
    if not (0 <= row < spec.height and 0 <= col < spec.width):
        raise InputError(f"--point {lon:g},{lat:g} is outside the store (its grid covers {spec.width} x "
                         f"{spec.height} px): give a place inside it (psm-map info STORE shows the bounds)",
                         option="point")
    st = store.status()[:, row, col]
    if not (st == DONE).any():
        raise InputError(f"--point {lon:g},{lat:g} falls on a store pixel that was never computed (row {row}, "
                         f"column {col}): give a place inside the mapped region", option="point")
    qm, qvs, _ = prepare_query(store, queries, None)
    z = store.read("z_img", slice(row, row + 1), slice(col, col + 1))  # [Z, 1, 1, D]
    Z = z.shape[0]
    plon, plat = _LonLat(store)(_PixelBlock(row, col))
    sim, unc = fuse_settings(model, z.reshape(Z, -1), np.repeat(plon.reshape(-1), Z), np.repeat(plat.reshape(-1), Z),
                             metadata, axes.settings, qm, qvs)
    sim[:, :, st != DONE] = np.nan
    unc[:, st != DONE] = np.nan
    tr = Affine(*spec.transform)
    cx, cy = tr @ (col + 0.5, row + 0.5)
    return PointProfile(float(lon), float(lat), row, col, float(cx), float(cy), axes, tuple(spec.zoom_levels),
                        list(queries), sim, unc)


@dataclass
class _PixelBlock:
    """A one-pixel block for :class:`~psm_mapping.query._LonLat`."""

    row_off: int
    col_off: int
    height: int = 1
    width: int = 1


# ---------------------------------------------------------------------------- the drivers' hooks
def check_cube_run(cfg, model_config, metadata: MetadataOptions, zooms: int | None = None) -> TimeAxes:
    """The early checks of a cube run (after the model loads, before the store or any output is
    touched): the model can make it, a multi-band COG stays within the band limit (``zooms``:
    the store's zoom count, default ``cfg.zoom_levels``), and the cube's own output names are free."""
    from .checks import _check_output
    from .outputs.cube import folder_for

    axes = TimeAxes.from_config(cfg)
    check_cube_model(model_config, metadata, axes)
    if cfg.format == "cog" and cfg.cube_layout == "folder":
        folder = folder_for(cfg.out)
        _check_output(str(folder), cfg.overwrite, cfg.previews)
    elif cfg.format == "cog":
        from .outputs.cube import check_band_limit

        nt, na = len(cfg.queries or ()), len(cfg.audio or ())
        nq = nt * na if (cfg.combine and nt and na) else nt + na
        nvar = nq * (2 if cfg.score else 1) + (1 if model_config.probabilistic else 0)
        check_band_limit(len(axes), zooms or len(cfg.zoom_levels), nvar, cfg.cube_layout)
    return axes


def cube_maps(store: EmbeddingStore, queries, model, metadata: MetadataOptions, cfg) -> QueryCube:
    """:func:`cube_store` for a run's config (what ``map_region`` and ``map_from_store`` call),
    with a progress bar over the blocks unless ``cfg.progress`` is off."""
    from tqdm.auto import tqdm

    axes = TimeAxes.from_config(cfg)
    bar = tqdm(total=int(store.done_mask().sum()), unit="block", desc=f"cube ({len(axes)} settings)",
               disable=not cfg.progress)

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        return cube_store(store, queries, model, metadata, axes, progress=progress)
    finally:
        bar.close()


def write_cube(cube: QueryCube, grid_or_store, tags: dict, region, cfg) -> dict:
    """The cube's outputs for a run's config (format, layout, previews, overwrite, score)."""
    from .outputs.cube import build_cube_result, write_cube_outputs

    result = build_cube_result(cube, grid_or_store, tags, region, score=cfg.score)
    return write_cube_outputs(result, cfg.out, fmt=cfg.format, layout=cfg.cube_layout, previews=cfg.previews,
                              overwrite=cfg.overwrite, progress=cfg.progress)


def profile_from_store(store_url: str, cfg, point) -> tuple[PointProfile, dict]:
    """``psm-map query STORE --point LON,LAT``: the month x hour profile of one place (every
    month and hour the checkpoint has unless ``cfg.months`` / ``cfg.hours`` say), written as
    ``cfg.out`` (CSV) and its heatmap. Returns the profile and the files written."""
    from .checks import _check_output
    from .offline import set_offline
    from .outputs.profile import heatmap_path, write_profile
    from .query import build_queries
    from .session import open_session

    lon, lat = parse_point(point)
    cfg.check_time()
    if not str(cfg.out).lower().endswith(".csv"):
        raise InputError(f"--out {cfg.out}: a --point profile is written as CSV: name it *.csv", option="out")
    if cfg.offline:
        set_offline()
    store = EmbeddingStore.open(store_url, storage_options=cfg.store_options or None)
    _check_output(cfg.out, cfg.overwrite)
    if heatmap_path(cfg.out).exists() and not cfg.overwrite:
        raise InputError(f"{heatmap_path(cfg.out)} exists: pass --overwrite to replace it, or choose another --out",
                         option="out")
    session = open_session(store_url, cfg.checkpoint, encoders=("text", "audio") if cfg.audio else ("text",),
                           clap_config=cfg.clap_config, tokenizer=cfg.tokenizer, device=cfg.device, dtype=cfg.dtype,
                           storage_options=cfg.store_options or None, levels=False)
    store, model = session.store, session.model
    cfg.tokenizer = session.tokenizer
    md = MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)
    axes = default_profile_axes(model.config, cfg)
    check_cube_model(model.config, md, axes)
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    prof = point_profile(store, queries, model, md, axes, lon, lat)
    return prof, write_profile(prof, cfg.out, overwrite=cfg.overwrite)
