"""``psm-map assess``: how good is a map where the user has field observations?

:func:`assess` scores a psm-map map (COG/Zarr: the pixel containing each site) or a store (sites
scored as ``psm-map points`` does, at each site's month and hour) against observations, and
returns an :class:`AssessResult`: per band (query x zoom) the figures of the observations' kind
with spatial block bootstrap intervals.

* :mod:`.observations`  the observations file -> sites, outcome, kind, event time
* :mod:`.sample`        map values at sites; background points over the map's valid area
* :mod:`.fromstore`     site values from a store through :mod:`psm_mapping.places`
* :mod:`.metrics`       AUC, ROC, Spearman, Pearson, the continuous Boyce index (NumPy)
* :mod:`.bootstrap`     the spatial block bootstrap
* :mod:`.evaluate`      per band figures
* :mod:`.report`        JSON, per-site table, HTML report (:mod:`.figures`: its PNGs)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .evaluate import MIN_SITES, BandResult, Figure

__all__ = ["AssessConfig", "AssessResult", "assess", "BandResult", "Figure"]

#: --out suffixes: the JSON report, the HTML report, else a per-site table (psm_mapping.places.tables)
REPORT_SUFFIXES = (".json", ".html", ".htm")


@dataclass
class AssessConfig:
    """Settings of :func:`assess`. ``source``: a psm-map map (.tif/.zarr) or a store (a map's
    embedding store, or a point store); ``observations``: a path (see
    :mod:`.observations`); ``queries``/``audio``: the queries to score from a store, or the map's
    query bands to assess (default all); ``out``: paths by suffix (.json, .html, .csv, .parquet,
    .gpkg, .geojson); ``block_km`` None: a tenth of the sites' extent (at least 1 km)."""

    source: str = ""
    observations: Any = None
    queries: Sequence[str] = ()
    audio: Sequence[str] = ()
    combine: bool = False
    column: str | None = None
    kind: str = "auto"
    background: int = 10_000
    block_km: float | None = None
    bootstrap: int = 1000
    seed: int = 0
    out: Sequence[str] = ()
    overwrite: bool = False
    crs: str | None = None
    event_time: bool = True
    imagery: str | None = None
    imagery_options: dict = field(default_factory=dict)
    checkpoint: str | None = None
    clap_config: str | None = None
    tokenizer: str | None = None
    device: str = "auto"
    batch_size: int = 64
    offline: bool = False
    progress: bool = False

    def validate(self) -> "AssessConfig":
        from .observations import KINDS

        if self.kind not in KINDS:
            raise InputError(f"--kind {self.kind}: choose one of {', '.join(KINDS)}", option="kind")
        if int(self.background) < 100:
            raise InputError(f"--background {self.background}: draw at least 100 background points "
                             "(SDM practice: 10,000)", option="background")
        if int(self.bootstrap) < 0:
            raise InputError(f"--bootstrap {self.bootstrap}: give 0 (no intervals) or more replicates, e.g. 1000",
                             option="bootstrap")
        if self.block_km is not None and not (np.isfinite(self.block_km) and self.block_km > 0):
            raise InputError(f"--block-km {self.block_km}: give a positive block size in km", option="block_km")
        if isinstance(self.out, (str, Path)):
            self.out = [str(self.out)]
        for o in self.out:
            if Path(o).suffix.lower() not in REPORT_SUFFIXES:
                from ..places.tables import table_format

                try:
                    table_format(o)
                except InputError:
                    raise InputError(f"--out {o}: name it *.json (figures), *.html (report) or *.csv / "
                                     "*.parquet / *.gpkg / *.geojson (per-site table)", option="out") from None
        return self


@dataclass
class AssessResult:
    """What :func:`assess` found: per band results, the per-site table, provenance, outputs."""

    kind: str
    bands: list[BandResult]
    table: Any  # geopandas.GeoDataFrame: the scored observations with a value column per band
    provenance: dict
    outputs: dict = field(default_factory=dict)
    background: dict = field(default_factory=dict)  # lon, lat, values per band (presence-only)

    def lines(self) -> list[str]:
        return [b.line() for b in self.bands]

    def as_dict(self) -> dict:
        from .report import result_dict

        return result_dict(self)


def _check_outputs(cfg: AssessConfig) -> None:
    from ..checks import _check_output

    for o in cfg.out:
        if Path(o).suffix.lower() in REPORT_SUFFIXES:
            _check_output(str(o), cfg.overwrite)
        else:
            from ..places.tables import check_table_out

            check_table_out(o, cfg.overwrite)


def assess(cfg: AssessConfig | None = None, log_fn=None, **kw) -> AssessResult:
    """Assess ``cfg.source`` against ``cfg.observations``; ``kw``: :class:`AssessConfig` fields."""
    from .bootstrap import default_block_km, spatial_blocks
    from .evaluate import evaluate_band
    from .observations import load_observations

    cfg = cfg or AssessConfig(**kw)
    cfg.validate()
    _check_outputs(cfg)
    obs = load_observations(cfg.observations, cfg.column, cfg.kind, cfg.crs, cfg.event_time)
    sites = obs.sites
    if len(sites) < MIN_SITES:
        raise InputError(f"{obs.path}: {len(sites)} observation{'s' if len(sites) != 1 else ''} with an outcome, "
                         f"fewer than {MIN_SITES}: give at least {MIN_SITES} sites", option="observations")
    if obs.kind == "presence-absence" and (not obs.present.any() or obs.present.all()):
        what = "presences" if not obs.present.any() else "absences"
        raise InputError(f"{obs.path}: no {what} in column {obs.column!r}: an AUC needs presences and absences "
                         "(for presences only pass --kind presence-only)", option="kind")
    values, bg = _site_values(cfg, obs, log_fn)
    n = len(sites)
    if all((r == "outside").all() for r in values.reasons):
        raise InputError(f"every one of the {n} sites of {obs.path} is outside {cfg.source}: check the "
                         "observations' coordinates and CRS, or assess a map that covers them", option="observations")
    lon, lat = sites.lon, sites.lat
    scored = np.any([r == "" for r in values.reasons], axis=0)  # the default block size: their extent
    if bg is not None:
        lon, lat = np.concatenate([lon, bg["lon"]]), np.concatenate([lat, bg["lat"]])
        scored = np.concatenate([scored, np.ones(len(bg["lon"]), bool)])
    block_km = cfg.block_km if cfg.block_km is not None else default_block_km(lon[scored], lat[scored])
    blocks = spatial_blocks(lon, lat, block_km)
    results = []
    for i, band in enumerate(values.bands):
        results.append(evaluate_band(band, obs.kind, values.values[i], values.reasons[i], obs.value, obs.rows, blocks,
                                     int(cfg.bootstrap), cfg.seed,
                                     background=None if bg is None else bg["values"][i],
                                     uncertainty=values.uncertainty.get(band.zoom)))
    if all(r.skipped for r in results):
        raise InputError(f"no band could be assessed: {results[0].line()}: give more sites inside the map "
                         f"(at least {MIN_SITES} with a value)", option="observations")
    from .report import provenance, site_table, write_outputs

    prov = provenance(cfg, obs, values, blocks, bg, int(len(np.unique(blocks.ids[scored]))))
    res = AssessResult(obs.kind, results, site_table(obs, values), prov,
                       background={} if bg is None else bg)
    if cfg.out:
        res.outputs = write_outputs(res, cfg.out, cfg.overwrite, values)
    return res


def _site_values(cfg: AssessConfig, obs, log_fn):
    """``(SiteValues, background dict or None)`` from a map or a store."""
    from .fromstore import is_store

    src = str(cfg.source)
    if not Path(src).exists():
        raise InputError(f"{src} does not exist: give a map written by psm-map (.tif/.zarr) or a store",
                         option="map")
    kind = is_store(src)
    presence_only = obs.kind == "presence-only"
    if kind is None:
        from .mapread import open_map
        from .sample import draw_background, sample_map

        if cfg.audio:
            raise InputError("--audio scores a store; a map's bands are picked by their query label with --query",
                             option="audio")
        m = open_map(src)
        values = sample_map(m, obs.sites.lon, obs.sites.lat, tuple(cfg.queries))
        bg = None
        if presence_only:
            lon, lat, vals = draw_background(m, values.bands, int(cfg.background), cfg.seed)
            bg = {"lon": lon, "lat": lat, "values": vals}
        return values, bg
    from .fromstore import score_from_store, store_background

    opts = {k: getattr(cfg, k) for k in ("queries", "audio", "combine", "checkpoint", "clap_config", "tokenizer",
                                         "device", "batch_size", "progress", "offline", "imagery", "imagery_options")}
    sites, n = obs.sites, len(obs.sites)
    if presence_only:
        if kind == "points":
            raise InputError("presence-only observations need background points over an area: assess a map or "
                             "a map's store, not a point store", option="kind")
        blon, blat = store_background(src, int(cfg.background), cfg.seed)
        sites = _with_background(sites, blon, blat, cfg.seed)
    values, _run = score_from_store(src, sites, opts, log_fn)
    if not presence_only:
        return values, None
    bg_vals = np.stack([v[n:] for v in values.values])
    keep = np.isfinite(bg_vals).all(0)  # background chips without imagery are not drawn
    bg = {"lon": sites.lon[n:][keep], "lat": sites.lat[n:][keep], "values": bg_vals[:, keep]}
    for k in ("month", "hour"):
        if getattr(sites, k) is not None:
            bg[k] = getattr(sites, k)[n:][keep]
    values.values = [v[:n] for v in values.values]
    values.reasons = [r[:n] for r in values.reasons]
    values.uncertainty = {z: u[:n] for z, u in values.uncertainty.items()}
    return values, bg


def _with_background(sites, lon, lat, seed):
    """``sites`` followed by background points. Each background point takes the metadata (month,
    hour, sources) of a presence drawn at random (seeded): the background follows the presences'
    distribution in time, so the figures measure where the sound is, not when it was recorded (a
    background fused at one fixed month and hour would differ from presences by their dates alone)."""
    import pandas as pd

    from ..places.sites import Sites

    m = len(lon)
    frame = pd.DataFrame({"lon": np.concatenate([sites.lon, lon]), "lat": np.concatenate([sites.lat, lat])})
    pick = np.random.default_rng([int(seed), 1]).integers(0, len(sites), m)

    def ext(a):
        return None if a is None else np.concatenate([a, np.asarray(a)[pick]])

    return Sites(frame=frame, lon=frame["lon"].to_numpy(), lat=frame["lat"].to_numpy(), name=sites.name,
                 month=ext(sites.month), hour=ext(sites.hour), audio_source=ext(sites.audio_source),
                 caption_source=ext(sites.caption_source))
