"""Soundscapes through the day and the year: month x hour cubes from one embedding store.

PSM fuses month and hour into every image embedding (PSM_SPEC.md section 3), so a cube needs no
image inference: it is a thin view over the engine (:mod:`psm_mapping.engine`), computed tile by
tile (the cube's Zarr chunk tiles, fused in pieces of :data:`PIECE_PX`): per setting the engine's
one fusion re-run (:class:`~psm_mapping.engine.Refusion`) over each zoom's window, scale-true
zooms resampled to the output grid as the single map. Held in memory up to :func:`eager_limit`
bytes (:func:`cube_store`), else streamed through a scratch Zarr (:func:`stream_cube`).

* :class:`TimeAxes`     the cube's axes (months and/or hours) and its settings, month-major
* :func:`cube_store` / :func:`stream_cube`  similarity ``[S, Z, H, W]`` per query and uncertainty,
  as :class:`QueryCube` (NumPy, or dask arrays over the scratch Zarr); :func:`answer_cube` writes it
* one pixel's month x hour profile (``psm-map query --point LON,LAT``): :mod:`psm_mapping.place_profile`
* :func:`check_cube_model`  the refusals (no metadata fuser, ``--no-fusion``, an axis the
  checkpoint's metadata lack)

Every slice equals the single-setting map of :func:`psm_mapping.query.query_store` re-run
from ``z_img`` with that month and hour (the same fusion, heads and csd, batched differently).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from .embed import MetadataOptions
from .errors import InputError
from .engine import QueryMatrix, Refusion, Window, query_matrix
from .model.fusion import metadata_items
from .query import Query
from .store import DONE, EmbeddingStore

log = logging.getLogger(__name__)

#: longest side of a piece fused in one model call (pixels x settings x zooms bounded: a piece
#: of 64 x 64 px is ~0.25 GB of fusion activations)
PIECE_PX = 64
#: cubes up to this many bytes are computed into memory; larger ones into a scratch Zarr beside
#: the output, read back lazily by the writers ($PSM_CUBE_EAGER_BYTES overrides it)
CUBE_EAGER_BYTES = 512 << 20
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


def cube_bytes(store: EmbeddingStore, n_queries: int, n_settings: int) -> int:
    s = store.spec
    return (n_queries + 1) * n_settings * len(s.zoom_levels) * s.height * s.width * 4


def eager_limit() -> int:
    """Bytes up to which a cube is held in memory (:data:`CUBE_EAGER_BYTES`, or the environment's)."""
    v = os.environ.get("PSM_CUBE_EAGER_BYTES")
    return int(v) if v not in (None, "") else CUBE_EAGER_BYTES


def setting_refusions(store: EmbeddingStore, model, metadata: MetadataOptions, axes: TimeAxes) -> list[Refusion]:
    """One :class:`~psm_mapping.engine.Refusion` per setting of ``axes`` (month-major): the
    engine's one fusion re-run, with that month and hour and ``metadata``'s sources."""
    return [Refusion(model, dataclasses.replace(metadata, month=m, hour=h), store) for m, h in axes.settings]


def chunk_tile(axes: TimeAxes, height: int, width: int) -> int:
    """The side of the cube's Zarr chunks (:func:`psm_mapping.outputs.cube.tile_side`)."""
    from .outputs.cube import tile_side

    return min(max(height, width), tile_side(len(axes.hours) if axes.hours is not None
                                             else (len(axes.months) if axes.months else 1)))


def cube_tiles(store: EmbeddingStore, tile: int) -> list[Window]:
    """Square windows of ``tile`` px (the cube's chunks), row-major."""
    H, W = store.spec.height, store.spec.width
    return [Window(r, c, min(tile, H - r), min(tile, W - c)) for r in range(0, H, tile) for c in range(0, W, tile)]


def tile_cube(store: EmbeddingStore, qmat: QueryMatrix, refusions: Sequence[Refusion], tile: Window,
              piece: int = PIECE_PX) -> tuple[np.ndarray, np.ndarray]:
    """Similarity ``[Q, S, Z, h, w]`` and uncertainty ``[S, Z, h, w]`` of one window at every
    setting: per setting the engine's :func:`psm_mapping.maps.window_maps` (fusion re-run from
    ``z_img``, scale-true zooms resampled to the output grid), in pieces of ``piece`` px."""
    from .maps import window_maps

    S, Z = len(refusions), len(store.spec.zoom_levels)
    sim = np.empty((len(qmat), S, Z, tile.height, tile.width), np.float32)
    unc = np.empty((S, Z, tile.height, tile.width), np.float32)
    for r in range(0, tile.height, piece):
        for c in range(0, tile.width, piece):
            w = Window(tile.row_off + r, tile.col_off + c, min(piece, tile.height - r), min(piece, tile.width - c))
            ys, xs = slice(r, r + w.height), slice(c, c + w.width)
            for s, ref in enumerate(refusions):
                sim[:, s, :, ys, xs], unc[s, :, ys, xs] = window_maps(store, qmat, w, ref)
    return sim, unc


#: ``runner(tiles)`` yields ``(window, similarity [Q, S, Z, h, w], uncertainty [S, Z, h, w])`` for
#: each of ``tiles``, in any order: :func:`local_runner` here, or
#: :func:`psm_mapping.distributed.cube_runner` on dask workers
TileRunner = Callable[[Sequence[Window]], Iterable[tuple[Window, np.ndarray, np.ndarray]]]


def local_runner(store: EmbeddingStore, queries: Sequence[Query], model, metadata: MetadataOptions,
                 axes: TimeAxes) -> TileRunner:
    """Tiles computed in this process, one after another (:func:`tile_cube`)."""
    qmat = query_matrix(list(queries), store.spec.probabilistic)
    refusions = setting_refusions(store, model, metadata, axes)

    def run(tiles):
        for w in tiles:
            yield (w, *tile_cube(store, qmat, refusions, w))
    return run


def _fill(store, queries, model, metadata, axes, put, progress, runner: TileRunner | None) -> dict[str, float]:
    """Compute the cube tile by tile (``runner``, default :func:`local_runner`) and hand each to
    ``put(window, sim, unc)``; empty tiles (no DONE pixel) are skipped (their cells stay NaN)."""
    import time

    check_cube_model(model.config, metadata, axes)
    t0 = time.perf_counter()
    spec = store.spec
    done = (store.status() == DONE).any(0)
    tiles = cube_tiles(store, chunk_tile(axes, spec.height, spec.width))
    todo = [w for w in tiles if done[w.slices].any()]
    n = len(tiles) - len(todo)
    if progress is not None and n:
        progress(n, len(tiles))
    for w, sim, unc in (runner or local_runner(store, queries, model, metadata, axes))(todo):
        put(w, sim, unc)
        n += 1
        if progress is not None:
            progress(n, len(tiles))
    return {"cube_total": time.perf_counter() - t0}


def cube_store(store: EmbeddingStore, queries: Sequence[Query], model, metadata: MetadataOptions,
               axes: TimeAxes, progress: Callable[[int, int], None] | None = None,
               runner: TileRunner | None = None) -> QueryCube:
    """The month x hour cube of ``queries`` over ``store``, in memory (NumPy): a thin view over the
    engine, computed tile by tile (:func:`tile_cube`); dense and scale-true stores alike.
    ``metadata`` gives the sources and ``fuse`` (its month/hour: the fixed values of absent axes).
    ``progress(done, total)`` after each tile; ``runner``: where tiles are computed (default here).
    :func:`stream_cube` for cubes past memory."""
    spec = store.spec
    S, Z, H, W = len(axes), len(spec.zoom_levels), spec.height, spec.width
    sims = [np.full((S, Z, H, W), np.nan, np.float32) for _ in queries]
    unc = np.full((S, Z, H, W), np.nan, np.float32)

    def put(w, sim, u):
        for q in range(len(sims)):
            sims[q][(..., *w.slices)] = sim[q]
        unc[(..., *w.slices)] = u

    secs = _fill(store, queries, model, metadata, axes, put, progress, runner)
    return QueryCube(axes, tuple(spec.zoom_levels), list(queries), sims, unc, metadata, secs)


def stream_cube(store: EmbeddingStore, queries: Sequence[Query], model, metadata: MetadataOptions,
                axes: TimeAxes, scratch: str | os.PathLike,
                progress: Callable[[int, int], None] | None = None, runner: TileRunner | None = None) -> QueryCube:
    """:func:`cube_store` computed tile by tile into the Zarr ``scratch`` (chunks = the cube's
    tiles, each written once, whole), returned as lazy dask arrays read from it: memory holds one
    tile, whatever the cube's size. The caller removes ``scratch`` after writing the outputs."""
    import dask.array as da
    import zarr

    spec = store.spec
    S, Z, H, W = len(axes), len(spec.zoom_levels), spec.height, spec.width
    t = chunk_tile(axes, H, W)
    g = zarr.open_group(str(scratch), mode="w-", zarr_format=2)
    names = [f"sim{q}" for q in range(len(queries))] + ["unc"]
    arrs = [g.create_array(n, shape=(S, Z, H, W), chunks=(S, 1, t, t), dtype="float32", fill_value=np.nan)
            for n in names]

    def put(w, sim, u):
        for q in range(len(queries)):
            arrs[q][(slice(None), slice(None), *w.slices)] = sim[q]
        arrs[-1][(slice(None), slice(None), *w.slices)] = u

    secs = _fill(store, queries, model, metadata, axes, put, progress, runner)
    lazy = [da.from_zarr(str(scratch), component=n) for n in names]
    return QueryCube(axes, tuple(spec.zoom_levels), list(queries), lazy[:-1], lazy[-1], metadata, secs)


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


def _bar(store: EmbeddingStore, axes: TimeAxes, cfg):
    from tqdm.auto import tqdm

    spec = store.spec
    n = len(cube_tiles(store, chunk_tile(axes, spec.height, spec.width)))
    bar = tqdm(total=n, unit="tile", desc=f"cube ({len(axes)} settings)", disable=not cfg.progress)
    return bar, (lambda done, total: bar.update(done - bar.n))


def write_cube(cube: QueryCube, grid_or_store, tags: dict, region, cfg) -> dict:
    """The cube's outputs for a run's config (format, layout, previews, overwrite, score)."""
    from .outputs.cube import build_cube_result, write_cube_outputs

    result = build_cube_result(cube, grid_or_store, tags, region, score=cfg.score)
    return write_cube_outputs(result, cfg.out, fmt=cfg.format, layout=cfg.cube_layout, previews=cfg.previews,
                              overwrite=cfg.overwrite, progress=cfg.progress)


def scratch_path(out) -> "os.PathLike":
    """The scratch Zarr of a streamed cube: hidden beside ``out`` (inside the user's folder)."""
    from .outputs.staging import local_path

    p = local_path(out)
    return p.with_name(f".{p.name.rstrip('/')}.cube-scratch-{os.getpid()}.zarr")


def answer_cube(store: EmbeddingStore, queries, model, metadata: MetadataOptions, cfg, grid_or_store,
                tags: dict, region=None, runner: TileRunner | None = None) -> tuple[dict, QueryCube, float]:
    """Compute and write the cube of a run's config: in memory up to :func:`eager_limit` bytes,
    else streamed tile by tile through a scratch Zarr beside ``cfg.out`` (removed afterwards) into
    the lazy writers; tiles computed by ``runner`` (default: here). Returns (outputs, the cube, the
    clock when the cube was computed)."""
    import shutil
    import time

    from .outputs.staging import is_local

    axes = TimeAxes.from_config(cfg)
    stream = cube_bytes(store, len(queries), len(axes)) > eager_limit() and is_local(cfg.out)
    scratch = scratch_path(cfg.out) if stream else None
    bar, progress = _bar(store, axes, cfg)
    try:
        try:
            cube = (stream_cube(store, queries, model, metadata, axes, scratch, progress, runner) if stream
                    else cube_store(store, queries, model, metadata, axes, progress, runner))
        finally:
            bar.close()
        t = time.perf_counter()
        return write_cube(cube, grid_or_store, tags, region, cfg), cube, t
    finally:
        if scratch is not None and os.path.exists(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
