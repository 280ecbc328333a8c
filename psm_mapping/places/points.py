"""Soundscape scores at sites: :func:`score_points` (sites + imagery -> point store -> table) and
:func:`score_point_store` (a further query over a point store: no imagery, no image inference).

Columns added to the input's (stable; the band names of a map of the same queries):

* ``similarity:<query>:z<zoom>``  negative closed-form sampled distance (cosine for infonce);
* ``score:<query>:z<zoom>``       0-1: the similarity min-max rescaled over the valid sites of the
  table, per zoom (as a map's score over its pixels);
* ``uncertainty:z<zoom>``         image embedding std norm (probabilistic checkpoints);
* ``valid_fraction:z<zoom>``      valid imagery fraction of the site's chip;
* ``valid``                        True when the site has a value at every zoom; sites outside the
  imagery, with too little valid imagery (``min_valid``) or a failed read are False and empty.

The arithmetic is :mod:`psm_mapping.query`'s: the means are rounded to float16 as the map store
keeps them, so a site at a pixel centre gets that pixel's map values.
"""
from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import ScoringSettings
from ..constants import AUDIO_SOURCES, CAPTION_SOURCES
from ..errors import InputError, StoreError
from .sites import Sites, check_sites_on_imagery, load_sites
from .store import POINT_FORMAT, PointSpec, PointStore, coords_sha256

log = logging.getLogger(__name__)


@dataclass
class PointsConfig(ScoringSettings):
    """Everything a points run needs: :class:`~psm_mapping.config.ScoringSettings` (the fields it
    shares with :class:`~psm_mapping.config.MapConfig`, with their meaning) and the sites.
    ``sites``: a path, a (Geo)DataFrame or :class:`Sites`; ``out``: a table path or None (the table
    is returned only); ``store``: the folder for point stores (default ``psm-store`` next to
    ``out``, else the current folder); ``crs`` None: each site in its UTM zone."""

    sites: Any = None
    lon_col: str | None = None
    lat_col: str | None = None
    out: str | None = None

    def validate(self) -> "PointsConfig":
        self.check_settings()
        if not self.queries and not self.audio:
            raise InputError("no query given: pass --query TEXT and/or --audio FILE")
        if self.out is not None:
            from .tables import check_table_out

            check_table_out(self.out, self.overwrite)
        return self


@dataclass
class PointsRun:
    """What a points run produced: the table, where it went, and what it cost."""

    table: Any  # geopandas.GeoDataFrame
    store: str
    outputs: dict = field(default_factory=dict)
    sites: int = 0
    distinct_sites: int = 0
    invalid_sites: int = 0
    chips: int = 0
    image_model_calls: int = 0
    seconds: dict = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"sites {self.sites:,} ({self.distinct_sites:,} distinct); chips embedded {self.chips:,}; "
                 f"image model calls {self.image_model_calls}",
                 "time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.seconds.items()),
                 f"store: {self.store}"]
        lines += [f"{k}: {v}" for k, v in self.outputs.items()]
        if self.invalid_sites:
            lines.append(invalid_message(self.invalid_sites, self.sites))
        return "\n".join(lines)


def invalid_message(n: int, total: int) -> str:
    return (f"warning: {n:,} of {total:,} sites have empty values (valid=false): outside the imagery, too "
            "little valid imagery in their chip (--min-valid), or a failed read (rerun to retry those)")


def _sites(cfg: PointsConfig) -> Sites:
    if isinstance(cfg.sites, Sites):
        return cfg.sites
    if cfg.sites is None:
        raise InputError("no sites given: pass a CSV with lon/lat columns or a point vector file")
    if hasattr(cfg.sites, "columns"):
        from .sites import sites_from_frame

        return sites_from_frame(cfg.sites, cfg.lon_col, cfg.lat_col)
    return load_sites(cfg.sites, cfg.lon_col, cfg.lat_col)


def _store_url(cfg: PointsConfig, spec: PointSpec) -> str:
    """The point store of ``spec`` under ``cfg.store`` (a folder of stores), or ``cfg.store`` itself
    when it is that store (another point store there is refused, never written into)."""
    from ..checks import _check_store_root, default_store_dir
    from ..storepath import check_store_as_root

    root = str(cfg.store or (default_store_dir(cfg.out) if cfg.out else "psm-store"))
    if check_store_as_root(root, spec, POINT_FORMAT):
        return root.rstrip("/")
    _check_store_root(root)
    return str(Path(root) / f"points-{spec.key()}.zarr")


def score_points(cfg: PointsConfig | None = None, log_fn=print, **kw) -> PointsRun:
    """Score ``cfg.sites`` for ``cfg.queries``: chips centred on each distinct site per zoom,
    embedded once into a point store (reused by further runs), then the table (written to
    ``cfg.out`` when given). ``kw``: :class:`PointsConfig` fields, instead of ``cfg``."""
    from ..checks import _warn_imagery_mismatch
    from ..config import default_imagery
    from ..imagery import open_source
    from ..model.checkpoint import file_sha256
    from ..offline import set_offline
    from ..query import build_queries
    from ..session import load_model, record_text_setup
    from .embed import ChipSource, ImageModel, PointTimings, fill_point_store

    cfg = cfg or PointsConfig(**kw)
    t0 = time.perf_counter()
    cfg.validate()
    if cfg.offline:
        set_offline()
    sites = _sites(cfg)
    if cfg.crs is not None:
        from ..grid import _check_crs

        _check_crs(cfg.crs)
    if not cfg.imagery:
        cfg.imagery = default_imagery()
        log_fn(f"imagery: {cfg.imagery} (the default)")
    md = _metadata_options(cfg)
    model, ckpt, device = load_model(cfg)  # duck-typed: the MapConfig fields it reads
    queries = build_queries(model, cfg.queries, cfg.audio, tokenizer=cfg.tokenizer, combine=cfg.combine)
    keys, inverse = sites.unique()
    timings = PointTimings()
    image_model = ImageModel(model, device, cfg.batch_size)
    with open_source(cfg.imagery, **cfg.imagery_options) as source:
        _warn_imagery_mismatch(source, model.config.sat_type, cfg.zoom_levels)
        check_sites_on_imagery(source, keys, model.config.sat_type, cfg.zoom_levels)
        if callable(getattr(source, "prepare", None)):  # searching sources (STAC) find their scenes
            source.prepare(_sites_bounds(keys, model.config.sat_type, cfg.zoom_levels))
        sha = file_sha256(ckpt)
        spec = PointSpec(coords_sha256=coords_sha256(keys), n_sites=len(keys),
                         zoom_levels=tuple(cfg.zoom_levels), sat_type=model.config.sat_type,
                         checkpoint_sha256=sha, imagery=source.identity(),
                         chip_crs="utm" if cfg.crs is None else _crs_wkt(cfg.crs),
                         min_valid=float(cfg.min_valid), fc_dim=model.config.fc_dim,
                         probabilistic=model.config.probabilistic)
        tags = _provenance(model, sha, source, cfg, md)
        store = PointStore.open_or_create(_store_url(cfg, spec), spec, keys, attrs={
            "provenance": tags, "checkpoint_path": str(Path(ckpt).resolve()), "sites_name": sites.name})
        record_text_setup(store, cfg, model)
        t_setup = time.perf_counter()
        chip_source = ChipSource(source, model.config.sat_type, keys, cfg.crs)
        fill_point_store(store, chip_source, image_model, progress=cfg.progress, timings=timings,
                         log_fn=log_fn)
    t_embed = time.perf_counter()
    table, invalid = site_table(sites, inverse, store, model, queries, md)
    prov = {**tags, **_table_tags(store, queries, cfg.zoom_levels, model)}
    outputs = {}
    if cfg.out is not None:
        from .tables import write_table

        outputs = {k: str(v) for k, v in write_table(table, cfg.out, prov, cfg.overwrite).items()}
    t_end = time.perf_counter()
    return PointsRun(table=table, store=store.url, outputs=outputs, sites=len(sites), distinct_sites=len(keys),
                     invalid_sites=invalid, chips=timings.chips, image_model_calls=image_model.calls,
                     seconds={"setup": t_setup - t0, "read": timings.read_s, "model": timings.model_s,
                              "embed_total": t_embed - t_setup, "query": t_end - t_embed, "total": t_end - t0})


def score_point_store(store_url: str, cfg: PointsConfig, log_fn=print) -> PointsRun:
    """A further query over a point store: its sites (with the store's coordinates; ``cfg.sites``
    optional, to keep a table's columns and per-site metadata), no imagery, no image inference."""
    import pandas as pd

    from ..offline import set_offline
    from ..session import open_session

    t0 = time.perf_counter()
    cfg.validate()
    if cfg.offline:
        set_offline()
    store = PointStore.open(store_url)
    keys = store.lonlat
    if cfg.sites is not None:
        sites = _sites(cfg)
        skeys, inverse = sites.unique()
        if coords_sha256(skeys) != store.spec.coords_sha256:
            raise StoreError(f"these sites are not the sites of the point store {store_url}: pass the sites "
                             "file it was built from, or run psm-map points")
    else:
        sites = Sites(frame=pd.DataFrame({"lon": keys[:, 0], "lat": keys[:, 1]}), lon=keys[:, 0], lat=keys[:, 1],
                      name=store.attrs.get("sites_name", "sites"))
        inverse = np.arange(len(keys))
    cfg.zoom_levels = tuple(store.spec.zoom_levels)
    # the answering preamble of every store: the checkpoint the store names (refused when not the
    # store's), its tokenizer and CLAP config, only the query towers (fusion reads the stored z_img)
    session = open_session(store, cfg.checkpoint, encoders=("text", "audio") if cfg.audio else ("text",),
                           clap_config=cfg.clap_config, tokenizer=cfg.tokenizer, device=cfg.device,
                           dtype=getattr(cfg, "dtype", "auto"), progress=cfg.progress, log_fn=log_fn)
    model = session.model
    cfg.checkpoint, cfg.tokenizer = str(session.checkpoint), session.tokenizer
    md = _metadata_options(cfg)
    queries = session.queries(cfg.queries, cfg.audio, combine=cfg.combine)
    t1 = time.perf_counter()
    table, invalid = site_table(sites, inverse, store, model, queries, md)
    prov = {**dict(store.attrs.get("provenance", {})), **_table_tags(store, queries, store.spec.zoom_levels, model)}
    from ..session import metadata_tags

    prov.update(metadata_tags(model, md))
    outputs = {}
    if cfg.out is not None:
        from .tables import write_table

        outputs = {k: str(v) for k, v in write_table(table, cfg.out, prov, cfg.overwrite).items()}
    t2 = time.perf_counter()
    return PointsRun(table=table, store=store.url, outputs=outputs, sites=len(sites), distinct_sites=len(keys),
                     invalid_sites=invalid, seconds={"setup": t1 - t0, "query": t2 - t1, "total": t2 - t0})


def _sites_bounds(keys: np.ndarray, sat_type: str, zoom_levels) -> tuple[float, float, float, float]:
    """(W, S, E, N) degrees holding every site's largest chip."""
    from ..constants import footprint_m

    half = footprint_m(sat_type, max(zoom_levels)) / 2
    dlat = half / 111_000.0
    dlon = dlat / max(0.05, float(np.cos(np.radians(np.abs(keys[:, 1]).max()))))
    w, s = keys[:, 0].min() - dlon, keys[:, 1].min() - dlat
    e, n = keys[:, 0].max() + dlon, keys[:, 1].max() + dlat
    return (max(-180.0, w), max(-90.0, s), min(180.0, e), min(90.0, n))


# --------------------------------------------------------------------------- the table
def _metadata_options(cfg):
    from ..embed import MetadataOptions

    return MetadataOptions(cfg.month, cfg.hour, cfg.audio_source, cfg.caption_source, cfg.fuse)


def _option_index(value, names) -> int:
    if value is None:
        return -1
    if isinstance(value, str):
        return {k.lower(): i for k, i in names.items()}[value.strip().lower()]
    return int(value)


def site_metadata(sites: Sites, md) -> dict[str, np.ndarray | None]:
    """Per-site month (0 unknown), hour (-1 unknown), source indices (-1 unknown): a site's own
    column value where given, else the run-wide option (``--month`` ...), else unknown."""
    n = len(sites)

    def pick(col, opt, unknown):
        base = np.full(n, unknown if opt is None else opt, np.int64)
        if col is None:
            return base
        return np.where(col != unknown, col, base)

    return {"month": pick(sites.month, md.month, 0), "hour": pick(sites.hour, md.hour, -1),
            "audio_source": pick(sites.audio_source, None if md.audio_source is None
                                 else _option_index(md.audio_source, AUDIO_SOURCES), -1),
            "caption_source": pick(sites.caption_source, None if md.caption_source is None
                                   else _option_index(md.caption_source, CAPTION_SOURCES), -1)}


#: sites through fusion and heads at a time
FUSE_ROWS = 8192


def fuse_sites(model, z_img: np.ndarray, lon: np.ndarray, lat: np.ndarray, meta: dict, fuse: bool):
    """Fusion and heads per site from float32 ``z_img`` ``[N, D]`` (NaN rows stay NaN): the mean
    as float16 (as the map store keeps it), var sum and uncertainty float32 ``[N]``."""
    import torch

    from ..model import Metadata

    N, D = z_img.shape
    mean = np.full((N, model.config.fc_dim), np.nan, np.float16)
    vs = np.full(N, np.nan, np.float32)
    unc = np.full(N, np.nan, np.float32)
    ok = np.isfinite(z_img).all(1)
    month, hour = meta["month"], meta["hour"]
    # a source is a per-batch token: group the sites by their (audio, caption) source pair
    pairs = np.stack([meta["audio_source"], meta["caption_source"]], 1)
    for a, c in np.unique(pairs[ok], axis=0) if ok.any() else []:
        group = np.nonzero(ok & (pairs[:, 0] == a) & (pairs[:, 1] == c))[0]
        for s in range(0, len(group), FUSE_ROWS):
            idx = group[s:s + FUSE_ROWS]
            m = Metadata(lat=lat[idx], lon=lon[idx],
                         month=month[idx] if (month[idx] > 0).any() else None,
                         hour=hour[idx] if (hour[idx] >= 0).any() else None,
                         audio_source=int(a) if a >= 0 else None, caption_source=int(c) if c >= 0 else None)
            emb = model.embed_image_features(torch.from_numpy(np.ascontiguousarray(z_img[idx])), m, fuse=fuse)
            mean[idx] = emb.mean.cpu().numpy().astype(np.float16)
            if emb.logvar is not None:
                vs[idx] = emb.var_sum().cpu().numpy().astype(np.float32)
                unc[idx] = emb.uncertainty().cpu().numpy().astype(np.float32)
            else:
                vs[idx] = 0.0
    return mean, vs, unc


def site_table(sites: Sites, inverse: np.ndarray, store: PointStore, model, queries, md):
    """The input rows plus the columns of the module docstring; ``(GeoDataFrame, invalid count)``."""
    import geopandas as gpd

    from ..query import QueryMaps, ZoomArrays, prepare_query, zoom_similarity

    spec = store.spec
    data = store.read()
    zl = tuple(spec.zoom_levels)
    Z, N = len(zl), len(sites)
    meta = site_metadata(sites, md)
    qm, qvs, _ = prepare_query(store, queries)
    sims = [np.full((Z, 1, N), np.nan, np.float32) for _ in queries]
    unc = np.full((Z, 1, N), np.nan, np.float32)
    valid_frac = data["valid"][:, inverse]
    for k in range(Z):
        z = data["z_img"][k][inverse]
        mean, vs, u = fuse_sites(model, z, sites.lon, sites.lat, meta, md.fuse)
        za = ZoomArrays(k, mean[None], vs[None], u[None])
        s = zoom_similarity(za, qm, qvs)
        for q in range(len(queries)):
            sims[q][k] = s[q]
        unc[k, 0] = u
    maps = QueryMaps(zl, list(queries), sims, unc)
    cols: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN zooms
        for q, query in enumerate(queries):
            score = maps.score(q)
            for k, z in enumerate(zl):
                cols[f"similarity:{query.label}:z{z}"] = sims[q][k, 0]
                cols[f"score:{query.label}:z{z}"] = score[k, 0]
    if spec.probabilistic:
        for k, z in enumerate(zl):
            cols[f"uncertainty:z{z}"] = unc[k, 0]
    for k, z in enumerate(zl):
        cols[f"valid_fraction:z{z}"] = valid_frac[k]
    has = np.isfinite(np.stack([sims[0][k, 0] for k in range(Z)])).all(0)
    cols["valid"] = has
    frame = sites.frame
    taken = [c for c in cols if c in frame.columns]
    if taken:
        raise InputError(f"the sites table already has columns {', '.join(taken)}: rename them")
    extra = gpd.pd.DataFrame(cols, index=frame.index)
    if isinstance(frame, gpd.GeoDataFrame):
        out = gpd.GeoDataFrame(gpd.pd.concat([frame.drop(columns=frame.geometry.name), extra], axis=1),
                               geometry=frame.geometry, crs=frame.crs)
        out.attrs["psm:geometry_in_csv"] = True
    else:
        out = gpd.GeoDataFrame(gpd.pd.concat([frame, extra], axis=1),
                               geometry=gpd.points_from_xy(sites.lon, sites.lat), crs="EPSG:4326")
        out.attrs["psm:geometry_in_csv"] = False
    return out, int((~has).sum())


# --------------------------------------------------------------------------- provenance
def _crs_wkt(crs) -> str:
    from pyproj import CRS

    return CRS.from_user_input(crs).to_wkt()


def _provenance(model, sha: str, source, cfg: PointsConfig, md) -> dict:
    from .. import __version__
    from ..session import metadata_tags

    tags = {"software": f"psm-mapping {__version__}", "model": "PSM (Khanal et al., ACM MM 2024)",
            "checkpoint": Path(model.source.get("path", "")).name, "checkpoint_sha256": sha,
            "loss_type": model.config.loss_type, "sat_type": model.config.sat_type,
            "metadata_type": model.config.metadata_type,
            "zoom_levels": ",".join(str(z) for z in cfg.zoom_levels),
            "chip_crs": "UTM zone of each site" if cfg.crs is None else str(cfg.crs),
            "min_valid": f"{cfg.min_valid:g}", **metadata_tags(model, md)}
    if model.source.get("hyper_parameters", {}).get("untrained"):
        tags["weights"] = "UNTRAINED (demo checkpoint with random weights: the values are meaningless)"
    tags.update(source.info.tags())
    return tags


def _table_tags(store: PointStore, queries, zoom_levels, model) -> dict:
    import datetime as dt

    sim = "negative closed-form sampled distance (csd)" if store.spec.probabilistic else "cosine"
    return {"queries": " | ".join(f"{q.kind}:{q.label}" for q in queries), "point_store": store.url,
            "point_store_format": POINT_FORMAT,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "columns": {"similarity:<query>:z<zoom>": f"similarity ({sim}) of the site to the query",
                        "score:<query>:z<zoom>": "0-1: similarity min-max rescaled over the valid sites, per zoom",
                        "uncertainty:z<zoom>": "image embedding uncertainty (std norm)",
                        "valid_fraction:z<zoom>": "valid imagery fraction of the site's chip",
                        "valid": "the site has a value at every zoom level"}}


__all__ = ["PointsConfig", "PointsRun", "score_points", "score_point_store", "site_table", "fuse_sites",
           "invalid_message"]
