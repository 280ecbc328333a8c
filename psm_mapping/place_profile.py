"""One place through the day and the year: ``psm-map query STORE --point LON,LAT``.

The month x hour cube (:mod:`psm_mapping.cube`) at the one store pixel holding a place: the same
numbers as the cube there (:func:`psm_mapping.cube.tile_cube` over a 1 x 1 window), written as a
CSV and its heatmap (:mod:`psm_mapping.outputs.profile`).

* :class:`PointProfile`   similarity ``[Q, S, Z]`` and uncertainty ``[S, Z]`` of one pixel
* :func:`point_profile`   computes it from an open store and model
* :func:`profile_from_store`  the command: checks, session, profile, files
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .cube import TimeAxes, check_cube_model, setting_refusions, tile_cube
from .embed import MetadataOptions
from .engine import Window, query_matrix
from .errors import InputError
from .model.fusion import metadata_items
from .query import Query
from .store import DONE, EmbeddingStore


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
    qmat = query_matrix(list(queries), spec.probabilistic)
    sim, unc = tile_cube(store, qmat, setting_refusions(store, model, metadata, axes), Window(row, col, 1, 1))
    sim, unc = sim[..., 0, 0], unc[..., 0, 0]  # [Q, S, Z], [S, Z]
    tr = Affine(*spec.transform)
    cx, cy = tr @ (col + 0.5, row + 0.5)
    return PointProfile(float(lon), float(lat), row, col, float(cx), float(cy), axes, tuple(spec.zoom_levels),
                        list(queries), sim, unc)


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
