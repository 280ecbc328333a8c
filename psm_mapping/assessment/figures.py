"""The report's pictures (matplotlib, Agg backend, PNG bytes): per band a ROC curve, the score
distributions of presences vs absences or background, the Boyce P/E curve (presence-only) or a
scatter (numeric), and the sites over the band."""
from __future__ import annotations

import io

import numpy as np

__all__ = ["band_png"]

#: the longest side of a band raster drawn under the sites, pixels
MAX_RASTER_PX = 800


def _raster_panel(ax, raster, lon, lat, colour, label, binary: bool):
    from pyproj import Transformer

    if raster is None:
        sc = ax.scatter(lon, lat, c=colour, s=12, cmap="viridis", edgecolors="k", linewidths=0.2)
        ax.set_xlabel("longitude")
        ax.set_ylabel("latitude")
        ax.set_title("sites (coloured by the band's value)")
        ax.figure.colorbar(sc, ax=ax, shrink=0.8, label=label)
        return
    arr, transform, crs = raster
    step = max(1, int(np.ceil(max(arr.shape) / MAX_RASTER_PX)))
    a = arr[::step, ::step]
    H, W = arr.shape
    left, top = transform.c, transform.f
    right, bottom = left + W * transform.a, top + H * transform.e
    im = ax.imshow(a, extent=(left, right, bottom, top), cmap="magma", interpolation="nearest")
    x, y = Transformer.from_crs("EPSG:4326", crs, always_xy=True).transform(lon, lat)
    lim = {"vmin": 0, "vmax": 1} if binary else {}
    ax.scatter(x, y, c=colour, s=14, cmap="coolwarm", edgecolors="w", linewidths=0.4, **lim)
    ax.set_title("sites over the band (red: present / high)")
    ax.set_xlabel(f"x ({crs.to_string()})")
    ax.tick_params(labelsize=7)
    ax.figure.colorbar(im, ax=ax, shrink=0.8, label=label)


def band_png(res, values: np.ndarray, outcome: np.ndarray, lon, lat, background=None, raster=None) -> bytes:
    """One PNG (2 x 2 panels) for band result ``res`` with the site ``values`` and ``outcome``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 8.5), dpi=80)
    axs = fig.subplots(2, 2)
    ok = np.isfinite(values)
    v, y = values[ok], outcome[ok]
    fig.suptitle(res.line(), fontsize=11)
    ax = axs[0, 0]
    if "roc_fpr" in res.curves:
        ax.plot(res.curves["roc_fpr"], res.curves["roc_tpr"], color="C0", lw=2)
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1)
        ax.set_xlabel("false positive rate" + (" (background)" if res.kind == "presence-only" else ""))
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC: AUC {res.figures['auc'].value:.3f}")
    else:
        ax.scatter(v, y, s=8, alpha=0.6)
        ax.set_xlabel("map value")
        ax.set_ylabel("observed value")
        f = res.figures
        ax.set_title(f"Spearman {f['spearman'].value:.3f}, Pearson {f['pearson'].value:.3f}")
    ax = axs[0, 1]
    bins = 30
    if res.kind == "presence-absence":
        ax.hist(v[y <= 0], bins=bins, alpha=0.6, density=True, label=f"absent ({int((y <= 0).sum())})")
        ax.hist(v[y > 0], bins=bins, alpha=0.6, density=True, label=f"present ({int((y > 0).sum())})")
    elif res.kind == "presence-only":
        ax.hist(background, bins=bins, alpha=0.6, density=True, label=f"background ({len(background)})")
        ax.hist(v, bins=bins, alpha=0.6, density=True, label=f"present ({len(v)})")
    else:
        ax.hist(v, bins=bins, alpha=0.8, label=f"sites ({len(v)})")
    ax.set_xlabel("map value")
    ax.set_title("score distributions")
    ax.legend(fontsize=8)
    ax = axs[1, 0]
    if res.kind == "presence-only" and res.curves.get("boyce_suitability"):
        pe = np.array([np.nan if p is None else p for p in res.curves["boyce_pe"]], float)
        ax.plot(res.curves["boyce_suitability"], pe, "o-", ms=2.5, color="C2")
        ax.axhline(1, color="grey", ls="--", lw=1)
        ax.set_xlabel("map value (moving window centre)")
        ax.set_ylabel("predicted / expected")
        ax.set_title(f"Boyce index {res.figures['boyce'].value:.3f} (window {res.curves['boyce_window_width']:.3g})")
    elif res.kind == "numeric":
        order = np.argsort(v)
        ax.plot(np.arange(len(v)) / max(1, len(v) - 1), y[order], ".", ms=3)
        ax.set_xlabel("sites by map value (quantile)")
        ax.set_ylabel("observed value")
        ax.set_title("observed value along the map's ranking")
    else:
        qs = np.linspace(0, 1, 11)
        edges = np.unique(np.quantile(v, qs))
        idx = np.clip(np.searchsorted(edges, v, "right") - 1, 0, max(0, len(edges) - 2))
        share = [float(np.mean(y[idx == k] > 0)) if (idx == k).any() else np.nan for k in range(len(edges) - 1)]
        ax.bar(np.arange(len(share)), share, color="C1")
        ax.set_xlabel("map value decile")
        ax.set_ylabel("share present")
        ax.set_title("presence rate by map value decile")
    _raster_panel(axs[1, 1], raster, np.asarray(lon)[ok], np.asarray(lat)[ok],
                  y if res.kind != "numeric" else v, res.band.name, res.kind != "numeric")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
