"""One place's month x hour profile (``psm-map query STORE --point LON,LAT``): a CSV and a
heatmap PNG beside it, staged and swapped into place together.

CSV ``<out>`` (long form, one row per query, zoom and setting; pandas / a spreadsheet pivots it):
``query,kind,zoom,month,hour,similarity,uncertainty,lon,lat`` (a masked month or hour: empty).
PNG ``<out>.heatmap.png``: one panel per query and zoom, months down and hours across, with the
panel's value range on its colour bar."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from .preview import _font, colorize
from .staging import Stage, is_local, local_path, staged_all

HEATMAP_SUFFIX = ".heatmap.png"
CSV_COLUMNS = ("query", "kind", "zoom", "month", "hour", "similarity", "uncertainty", "lon", "lat")


def heatmap_path(out: str | os.PathLike) -> Path:
    p = local_path(out)
    return p.with_name(p.name + HEATMAP_SUFFIX)


def profile_csv(profile) -> str:
    """The CSV text of a :class:`~psm_mapping.place_profile.PointProfile`."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    ax = profile.axes
    for q, query in enumerate(profile.queries):
        for k, z in enumerate(profile.zoom_levels):
            for s, (m, h) in enumerate(ax.settings):
                w.writerow([query.label, query.kind, z, "" if m is None else m, "" if h is None else h,
                            _num(profile.similarity[q, s, k]), _num(profile.uncertainty[s, k]),
                            f"{profile.lon:.6f}", f"{profile.lat:.6f}"])
    return buf.getvalue()


def _num(v) -> str:
    v = float(v)
    return "" if not np.isfinite(v) else repr(v)


def heatmap_png(profile, title: str = "") -> bytes:
    """Panels (query x zoom) of similarity over months (rows) x hours (columns)."""
    from PIL import Image, ImageDraw

    from .labels import MONTH_NAMES

    ax = profile.axes
    months = ax.months if ax.months is not None else (ax.month,)
    hours = ax.hours if ax.hours is not None else (ax.hour,)
    nr, nc = len(months), len(hours)
    cell = max(14, min(40, 520 // nc))
    font = _font()
    pw, ph = 44 + nc * cell + 90, 40 + nr * cell + 24
    panels = [(q, k) for q in range(len(profile.queries)) for k in range(len(profile.zoom_levels))]
    ncol = min(2, len(panels))
    nrow = -(-len(panels) // ncol)
    canvas = Image.new("RGBA", (ncol * pw + 10, 30 + nrow * ph), (255, 255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0, 255), font=font)
    for i, (q, k) in enumerate(panels):
        ox, oy = 10 + (i % ncol) * pw, 30 + (i // ncol) * ph
        grid = profile.similarity[q, :, k].reshape(nr, nc)
        finite = grid[np.isfinite(grid)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        img = Image.fromarray(colorize(grid.astype(np.float32), "viridis", (lo, hi)), "RGBA").resize(
            (nc * cell, nr * cell), Image.NEAREST)
        x0, y0 = ox + 34, oy + 32
        canvas.alpha_composite(img, (x0, y0))
        draw.text((ox, oy + 2), f"'{profile.queries[q].label}', zoom {profile.zoom_levels[k]}",
                  fill=(0, 0, 0, 255), font=font)
        for c, h in enumerate(hours):
            if h is not None and (nc <= 12 or c % 3 == 0):
                draw.text((x0 + c * cell + 1, y0 - 14), f"{h}", fill=(0, 0, 0, 255), font=font)
        for r, m in enumerate(months):
            draw.text((ox, y0 + r * cell + cell // 2 - 7), MONTH_NAMES[m - 1][:3] if m is not None else "-",
                      fill=(0, 0, 0, 255), font=font)
        bx = x0 + nc * cell + 10
        ramp = np.linspace(hi, lo, nr * cell, dtype=np.float32)[:, None].repeat(12, axis=1)
        canvas.alpha_composite(Image.fromarray(colorize(ramp, "viridis", (lo, hi)), "RGBA"), (bx, y0))
        draw.text((bx + 16, y0 - 2), f"{hi:.4g}", fill=(0, 0, 0, 255), font=font)
        draw.text((bx + 16, y0 + nr * cell - 12), f"{lo:.4g}", fill=(0, 0, 0, 255), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def write_profile(profile, out: str | os.PathLike, overwrite: bool = False) -> dict[str, Any]:
    """``out`` (CSV) and ``<out>.heatmap.png``, staged together. Returns ``{"csv", "heatmap"}``."""
    if not is_local(out):
        raise OutputError(f"profile output {out} is not a local path: write it locally", option="out")
    if not str(out).lower().endswith(".csv"):
        raise OutputError(f"--out {out}: a --point profile is a CSV: name it *.csv", option="out")
    stages = [Stage(local_path(out), overwrite), Stage(heatmap_path(out), overwrite)]
    title = (f"month x hour profile at {profile.lon:.5f}, {profile.lat:.5f} (store pixel row {profile.row}, "
             f"column {profile.col}); similarity, fusion re-runs")

    def write() -> None:
        stages[0].tmp.write_text(profile_csv(profile), encoding="utf-8")
        stages[1].tmp.write_bytes(heatmap_png(profile, title))

    staged_all(stages, write)
    return {"csv": stages[0].dst, "heatmap": stages[1].dst}
