"""What an assessment writes: the JSON (every figure, interval, count, unscored site and the
provenance), the per-site table (the observations with the value of each band and why a site
was not scored; CSV/GeoParquet/GPKG/GeoJSON via :mod:`psm_mapping.places.tables`) and a
self-contained HTML report (PNGs embedded as base64). Every file is staged and renamed into place.
"""
from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
from pathlib import Path

import numpy as np

from .evaluate import NAMES

__all__ = ["provenance", "site_table", "result_dict", "write_outputs", "render_html", "SETTINGS_TEXT"]

#: how the figures are computed (in the JSON and the HTML report)
SETTINGS_TEXT = {
    "auc": "ROC AUC = Mann-Whitney U / (n_present x n_absent), ties counted half (as scikit-learn's roc_auc_score)",
    "auc_presence_only": "presences vs background points drawn uniformly over the valid area (seeded); from a "
                         "store each background point is fused at the month and hour of a presence drawn at "
                         "random (seeded), so presences and background share one distribution in time",
    "boyce": "continuous Boyce index (Hirzel et al. 2006) as ecospat.boyce defaults: fit = background values, "
             "moving window width = (max - min of fit) / 10, 101 window positions (res = 100), P/E rounded to "
             "10 digits, 0/0 windows dropped, successive duplicate P/E removed, Spearman rho of P/E vs window "
             "position (ecospat prints it rounded to 3 decimals)",
    "spearman": "Pearson r of mid-ranks (ties averaged)",
    "intervals": "percentile intervals from a spatial block bootstrap: square blocks of block_km in an "
                 "azimuthal equidistant projection centred on the sites, blocks drawn with replacement",
}


def _clean(x):
    """JSON-safe: NaN/inf -> None, NumPy -> Python."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def provenance(cfg, obs, values, blocks, bg, n_blocks: int) -> dict:
    from .. import __version__

    tags = dict(values.source.get("tags", {}))
    md_type = str(tags.get("metadata_type", ""))
    # a map is one month and hour; a store's sites are fused at theirs when the checkpoint fuses them
    event_used = bool(obs.event_time and values.source.get("kind") != "map"
                      and ("month" in md_type or "time" in md_type) and tags.get("fusion", "on") != "off")
    return {
        "software": f"psm-mapping {__version__}",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {k: v for k, v in values.source.items() if k != "tags"},
        "checkpoint": tags.get("checkpoint"), "checkpoint_sha256": tags.get("checkpoint_sha256"),
        "map_provenance": tags,
        "queries": sorted({b.query for b in values.bands}),
        "observations": {"path": obs.path, "sha256": obs.sha256, "rows": obs.n_rows, "used": len(obs.value),
                         "without_outcome": obs.dropped, "column": obs.column, "kind": obs.kind,
                         "event_time": obs.event_time, "event_time_used": event_used},
        "settings": {"kind": cfg.kind, "bootstrap": int(cfg.bootstrap), "seed": cfg.seed, "level": 0.95,
                     "block_km": blocks.block_km, "block_km_default": cfg.block_km is None, "blocks": n_blocks,
                     "background": None if bg is None else len(bg["lon"]),
                     "event_time": cfg.event_time, "methods": SETTINGS_TEXT},
    }


def site_table(obs, values):
    """The observations (their rows and columns) with ``assess:outcome``, ``assess:row``, per band
    its value column (the band's name) and ``assess:status:<band>`` ("" scored, else the reason),
    and ``uncertainty:z<zoom>`` covariates."""
    import geopandas as gpd
    import pandas as pd

    frame = obs.sites.frame
    cols = {"assess:row": obs.rows + 1, "assess:outcome": obs.value}
    for b, v, r in zip(values.bands, values.values, values.reasons):
        cols[b.name] = v
        cols[f"assess:status:{b.name}"] = r.astype(str)
    for z, u in sorted(values.uncertainty.items()):
        cols[f"uncertainty:z{z}"] = u
    extra = pd.DataFrame(cols, index=frame.index)
    if isinstance(frame, gpd.GeoDataFrame):
        base = frame.drop(columns=frame.geometry.name)
        clash = [c for c in extra.columns if c in base.columns]
        out = gpd.GeoDataFrame(pd.concat([base.drop(columns=clash), extra], axis=1), geometry=frame.geometry,
                               crs=frame.crs)
        out.attrs["psm:geometry_in_csv"] = True
    else:
        clash = [c for c in extra.columns if c in frame.columns]
        out = gpd.GeoDataFrame(pd.concat([frame.drop(columns=clash), extra], axis=1),
                               geometry=gpd.points_from_xy(obs.sites.lon, obs.sites.lat), crs="EPSG:4326")
        out.attrs["psm:geometry_in_csv"] = False
    return out


def result_dict(res) -> dict:
    bands = []
    for b in res.bands:
        bands.append({"band": b.band.name, "query": b.band.query, "zoom": b.band.zoom, "kind": b.kind,
                      "summary": b.line(), "skipped": b.skipped, "n": b.n, "n_present": b.n_present,
                      "n_absent": b.n_absent, "n_background": b.n_background,
                      "figures": {k: vars(f) for k, f in b.figures.items()},
                      "unscored": {k: {"count": len(v), "rows": [i + 1 for i in v]} for k, v in b.unscored.items()},
                      "uncertainty_covariate": b.uncertainty, "curves": b.curves})
    return _clean({"format": "psm-assess/1", "kind": res.kind, "provenance": res.provenance, "bands": bands})


def _pngs(res, values) -> list[tuple[str, bytes]]:
    from .figures import band_png

    out = []
    table = res.table
    lon = table.geometry.to_crs("EPSG:4326").x.to_numpy() if table.crs is not None else table.geometry.x.to_numpy()
    lat = table.geometry.to_crs("EPSG:4326").y.to_numpy() if table.crs is not None else table.geometry.y.to_numpy()
    outcome = table["assess:outcome"].to_numpy(np.float64)
    for i, b in enumerate(res.bands):
        if b.skipped:
            continue
        bg = res.background["values"][i] if res.background else None
        out.append((b.band.name, band_png(b, values.values[i], outcome, lon, lat, bg, _preview(values, b.band.name))))
    return out


def _preview(values, name):
    m = values.rasters.get(name)
    return None if m is None else m.preview(name)


def render_html(res, pngs) -> str:
    p = res.provenance
    o = p["observations"]
    rows = []
    for b in res.bands:
        figs = "".join(f"<td>{f.value:.3f} [{f.low:.3f}, {f.high:.3f}]</td>" if b.figures.get(k) else "<td>-</td>"
                       for k in _figure_names(res.kind) for f in [b.figures.get(k)])
        uns = ", ".join(f"{k} {len(v)}" for k, v in b.unscored.items()) or "none"
        rows.append(f"<tr><td>{html.escape(b.band.query)}</td><td>{b.band.zoom}</td>{figs}<td>{b.n}</td>"
                    f"<td>{b.n_present or ''}</td><td>{html.escape(uns)}</td></tr>")
    head = "".join(f"<th>{NAMES[k]} [95% CI]</th>" for k in _figure_names(res.kind))
    imgs = "".join(f"<h3>{html.escape(name)}</h3><img alt=\"{html.escape(name)}\" "
                   f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">" for name, png in pngs)
    meth = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in p["settings"]["methods"].items())
    s = p["settings"]
    column = ", column " + html.escape(o["column"]) if o["column"] else ""
    untrained = any("UNTRAINED" in str(v) for v in p.get("map_provenance", {}).values())
    warn = ("<p class=warn>The map comes from a checkpoint with untrained weights: these figures mean "
            "nothing about soundscapes.</p>") if untrained else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>psm-map assess</title>
<style>body{{font-family:sans-serif;margin:24px;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;font-size:14px}}img{{max-width:100%}}.warn{{color:#b00}}</style>
</head><body><h1>How good is this map here?</h1>{warn}
<p>{html.escape(str(p['source'].get('kind')))} <code>{html.escape(str(p['source'].get('path')))}</code> against
<code>{html.escape(str(o['path']))}</code> (sha256 {html.escape(str(o['sha256'])[:16])}&hellip;):
{o['used']} observations of kind <b>{html.escape(o['kind'])}</b>{column}.
Checkpoint {html.escape(str(p.get('checkpoint')))}. Block bootstrap: {s['bootstrap']} replicates, blocks of
{s['block_km']:.3g} km ({s['blocks']} blocks), seed {s['seed']}.</p>
<table><tr><th>query</th><th>zoom</th>{head}<th>n</th><th>present</th><th>not scored</th></tr>{''.join(rows)}</table>
{imgs}<h2>Methods</h2><ul>{meth}</ul><p>{html.escape(p['software'])}, {html.escape(p['created'])}</p>
</body></html>
"""


def _figure_names(kind: str) -> tuple[str, ...]:
    return {"presence-absence": ("auc",), "presence-only": ("auc", "boyce")}.get(kind, ("spearman", "pearson"))


def write_outputs(res, outs, overwrite: bool, values) -> dict:
    """Write each path of ``outs`` by suffix; returns ``{path: kind}``."""
    from ..outputs.staging import Stage, staged_all
    from ..places.tables import table_paths, table_stages
    from . import REPORT_SUFFIXES

    doc = result_dict(res)
    stages, texts, tables = [], [], []
    pngs = None
    for o in outs:
        suf = Path(o).suffix.lower()
        if suf == ".json":
            texts.append(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        elif suf in REPORT_SUFFIXES:
            pngs = _pngs(res, values) if pngs is None else pngs
            texts.append(render_html(res, pngs))
        else:
            tables.append(o)
            continue
        stages.append(Stage(Path(o).expanduser().absolute(), overwrite))

    prov = {**res.provenance, "kind": res.kind, "summary": res.lines()}
    table_parts = [table_stages(res.table, t, prov, overwrite) for t in tables]

    def write():
        for st, text in zip(stages, texts):
            st.tmp.write_text(text, encoding="utf-8")
        for _, write_one in table_parts:
            write_one()

    # the report, its JSON and the per-site tables are committed together: a failing one leaves none
    every = stages + [s for parts, _ in table_parts for s in parts]
    staged_all(every, write, where=", ".join(str(s.dst) for s in every) or None)
    written = {str(s.dst): Path(str(s.dst)).suffix.lstrip(".") for s in stages}
    for parts, _ in table_parts:
        written.update({str(v): k for k, v in table_paths(parts).items()})
    return written
