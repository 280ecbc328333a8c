"""Values at sites from a store: exactly ``psm-map points`` (chips centred on the sites), one call
into :mod:`psm_mapping.places` (:func:`score_points` for a map's embedding store, with its
checkpoint, zoom levels, text setup and metadata options; :func:`score_point_store` for a point
store of the same sites). Each site is fused at its own month and hour where it has them.

The point store lands beside the map store (in its folder), so a second assessment of the same
sites runs no image inference. Presence-only background points are drawn over the store's DONE
pixels (of its finest zoom grid) and scored in the same call.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, StoreError
from .sample import NO_IMAGERY, Band, SiteValues, apply_affine

__all__ = ["is_store", "score_from_store", "store_background"]


def is_store(path) -> str | None:
    """"points" (a point store), "store" (a map's embedding store) or None."""
    from ..storeformat import POINT_FORMAT, store_format

    fmt = store_format(path)
    if fmt == POINT_FORMAT:
        return "points"
    return "store" if fmt and fmt.startswith("psm-mapping-store") else None


def store_background(url: str, n: int, seed) -> tuple[np.ndarray, np.ndarray]:
    """``n`` lon/lat points uniform over the DONE pixels of the store's finest zoom grid."""
    from affine import Affine
    from pyproj import CRS, Transformer

    from ..store import DONE, EmbeddingStore

    st = EmbeddingStore.open(url)
    spec = st.spec
    status = st.status()
    k = int(np.argmin(spec.factors))
    f = spec.factors[k]
    h, w = -(-spec.height // f), -(-spec.width // f)
    done = status[k, :h, :w] == DONE
    flat = np.flatnonzero(done)
    if len(flat) == 0:
        raise InputError(f"store {url} has no computed pixel to draw background points from: run psm-map on "
                         "its region first", option="map")
    rng = np.random.default_rng(seed)
    pick = flat[rng.integers(0, len(flat), n)]
    row, col = np.divmod(pick, w)
    t = Affine(*spec.transform) @ Affine.scale(f)
    x, y = apply_affine(t, col + rng.random(n), row + rng.random(n))
    lon, lat = Transformer.from_crs(CRS.from_wkt(spec.crs_wkt), "EPSG:4326", always_xy=True).transform(x, y)
    return np.asarray(lon), np.asarray(lat)


def _points_config(url: str, kind: str, sites, opts: dict):
    from ..places import PointsConfig

    cfg = PointsConfig(sites=sites, queries=list(opts.get("queries") or ()), audio=list(opts.get("audio") or ()),
                       combine=bool(opts.get("combine")),
                       checkpoint=opts.get("checkpoint"), clap_config=opts.get("clap_config"),
                       tokenizer=opts.get("tokenizer"), device=opts.get("device", "auto"),
                       batch_size=opts.get("batch_size", 64), progress=opts.get("progress", False),
                       offline=opts.get("offline", False), imagery=opts.get("imagery"))
    if kind == "points":
        return cfg
    from ..session import reuse_text_setup
    from ..store import EmbeddingStore

    st = EmbeddingStore.open(url)
    reuse_text_setup(st, cfg)
    if not cfg.checkpoint and not os.environ.get("PSM_CHECKPOINT"):
        cfg.checkpoint = st.attrs.get("checkpoint_path")
    md = dict(st.attrs.get("metadata_options", {}))
    cfg.month, cfg.hour = md.get("month"), md.get("hour")
    cfg.audio_source, cfg.caption_source = md.get("audio_source"), md.get("caption_source")
    cfg.fuse = md.get("fuse", True)
    cfg.zoom_levels = tuple(st.spec.zoom_levels)
    cfg.min_valid = st.spec.min_valid
    cfg.store = str(Path(url).absolute().parent)  # point stores beside the map store
    if not cfg.imagery:
        built = st.attrs.get("provenance", {}).get("imagery_source", "see psm-map info")
        raise InputError(f"scoring sites from the store {url} needs its imagery (chips centred on the sites): pass "
                         f"--imagery with the imagery it was built from ({built})", option="imagery")
    from ..imagery import open_source

    with open_source(cfg.imagery, **(opts.get("imagery_options") or {})) as src:
        if src.identity() != st.spec.imagery:
            raise StoreError(f"{cfg.imagery} is not the imagery the store {url} was built from: pass that imagery "
                             "to --imagery")
    return cfg


def score_from_store(url: str, sites, opts: dict, log_fn=None):
    """``(SiteValues, run)`` of ``sites`` (:class:`~psm_mapping.places.Sites`) from a store."""
    from ..places import score_point_store, score_points

    kind = is_store(url)
    if kind is None:
        raise InputError(f"{url} is neither a map nor a store psm-map wrote: give a .tif/.zarr map or a store",
                         option="map")
    if not opts.get("queries") and not opts.get("audio"):
        raise InputError("assessing a store needs the queries to score: pass --query TEXT and/or --audio FILE",
                         option="queries")
    cfg = _points_config(url, kind, sites, opts)
    quiet = log_fn or (lambda *a: None)
    run = score_point_store(url, cfg, log_fn=quiet) if kind == "points" else score_points(cfg, log_fn=quiet)
    from ..places import PointStore

    tags = dict(PointStore.open(run.store).attrs.get("provenance", {}))
    return site_values(run.table, {"kind": "store" if kind == "store" else "point store", "path": str(url),
                                   "point_store": run.store, "tags": tags}), run


def site_values(table, source: dict) -> SiteValues:
    """The similarity columns of a ``psm-map points`` table as :class:`SiteValues`."""
    bands, values, reasons, unc = [], [], [], {}
    for c in table.columns:
        c = str(c)
        if c.startswith("similarity:"):
            q, z = c[len("similarity:"):].rsplit(":z", 1)
            v = table[c].to_numpy(np.float64)
            bands.append(Band(c, q, int(z)))
            values.append(v)
            reasons.append(np.where(np.isfinite(v), "", NO_IMAGERY).astype(object))
        elif c.startswith("uncertainty:z"):
            unc[int(c[len("uncertainty:z"):])] = table[c].to_numpy(np.float64)
    if not bands:
        raise StoreError("the points table has no similarity column: this is a bug, please report it")
    return SiteValues(bands, values, reasons, unc, source)
