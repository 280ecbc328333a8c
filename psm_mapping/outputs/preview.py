"""Previews: a titled PNG with a colour bar per band, a Web-Mercator RGBA overlay PNG per band,
and one self-contained ``index.html`` (the page is ``assets/preview.html``, package data).

Drawn with PIL and a 256-entry colour lookup table (``assets/colormaps.json``: matplotlib's
viridis and magma), so a small map's previews take milliseconds, not a matplotlib figure each."""
from __future__ import annotations

import base64
import functools
import html
import io
import json
import math
import os
from importlib import resources
from pathlib import Path
from string import Template
from typing import Iterator

import affine
import numpy as np
from pyproj import CRS, Transformer

from ..errors import OutputError
from .results import COLORMAPS, MapBand, MapResult, check_result, crs_label, full_tags, lonlat_bounds, safe_name
from .staging import Stage, is_local, local_path, staged_all

LEAFLET_JS = "https://unpkg.com/leaflet@1.9.4/dist/leaflet.js"
LEAFLET_CSS = "https://unpkg.com/leaflet@1.9.4/dist/leaflet.css"
#: largest side in pixels of the web-map overlay PNG (larger rasters are downsampled)
MAX_OVERLAY_PX = 2048
#: largest side in pixels of the array drawn in a preview figure (block means above it)
MAX_FIGURE_PX = 1000
#: the figure's raster is scaled up (nearest) to about this many pixels on its longer side
FIGURE_PX = 560
_KIND_LABEL = {"similarity": "similarity (negative CSD)", "uncertainty": "uncertainty",
               "score": "normalised score (0-1)"}


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath("assets", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def colormap_lut(name: str) -> np.ndarray:
    """``[256, 3]`` uint8 colours of ``name`` (viridis or magma)."""
    hexes = json.loads(_asset("colormaps.json"))[name]
    return np.frombuffer(bytes.fromhex(hexes), dtype=np.uint8).reshape(256, 3)


def colorize(arr: np.ndarray, cmap: str, vrange: tuple[float, float]) -> np.ndarray:
    """``[H, W, 4]`` uint8: ``arr`` through the lookup table, NaN transparent."""
    vmin, vmax = vrange
    ok = np.isfinite(arr)
    with np.errstate(invalid="ignore"):
        idx = np.clip((np.where(ok, arr, vmin) - vmin) / (vmax - vmin) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    rgba = np.empty(arr.shape + (4,), np.uint8)
    rgba[..., :3] = colormap_lut(cmap)[idx]
    rgba[..., 3] = np.where(ok, 255, 0)
    return rgba


def color_range(band: MapBand, arr: np.ndarray) -> tuple[float, float]:
    return value_range(band.kind, arr)


def value_range(kind: str, arr: np.ndarray) -> tuple[float, float]:
    """The colour range of ``arr``: 2nd..98th percentile of the finite values; 0..1 for scores."""
    finite = arr[np.isfinite(arr)]
    if kind == "score" or finite.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(finite, [2, 98]))
    if not hi > lo:
        lo, hi = float(finite.min()), float(finite.max())
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def region_rings(region_geojson: dict | None, crs: CRS) -> list[np.ndarray]:
    """Exterior and interior rings of a lon/lat GeoJSON as arrays in ``crs``."""
    if not region_geojson:
        return []
    tr = Transformer.from_crs(CRS.from_epsg(4326), crs, always_xy=True)
    rings: list[np.ndarray] = []

    def geoms(obj: dict) -> Iterator[dict]:
        t = obj.get("type")
        if t == "FeatureCollection":
            for f in obj.get("features", []):
                yield from geoms(f)
        elif t == "Feature":
            if obj.get("geometry"):
                yield from geoms(obj["geometry"])
        elif t == "GeometryCollection":
            for g in obj.get("geometries", []):
                yield from geoms(g)
        else:
            yield obj

    for g in geoms(region_geojson):
        polys = {"Polygon": [g.get("coordinates", [])], "MultiPolygon": g.get("coordinates", [])}.get(g.get("type"), [])
        for poly in polys:
            for ring in poly:
                a = np.asarray(ring, dtype=float)
                if a.ndim == 2 and len(a) >= 2:
                    xs, ys = tr.transform(a[:, 0], a[:, 1])
                    rings.append(np.column_stack([xs, ys]))
    return rings


def block_mean(arr: np.ndarray, max_px: int) -> np.ndarray:
    """NaN-aware k x k block mean so that no side exceeds ``max_px`` (display only)."""
    k = math.ceil(max(arr.shape) / max_px)
    if k <= 1:
        return arr
    h, w = arr.shape
    hp, wp = -(-h // k) * k, -(-w // k) * k
    pad = np.full((hp, wp), np.nan, dtype=np.float32)
    pad[:h, :w] = arr
    blocks = pad.reshape(hp // k, k, wp // k, k)
    valid = np.isfinite(blocks)
    n = valid.sum(axis=(1, 3))
    total = np.where(valid, blocks, 0).sum(axis=(1, 3), dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (total / n).astype(np.float32)
    out[n == 0] = np.nan
    return out


@functools.lru_cache(maxsize=None)
def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _figure_png(band: MapBand, arr: np.ndarray, result: MapResult, rings) -> bytes:
    """A titled PNG with a colour bar and the region outline; NaN pixels show the background."""
    from PIL import Image, ImageDraw

    shown = block_mean(arr, MAX_FIGURE_PX)
    k_data = arr.shape[1] / shown.shape[1]  # source pixels per shown pixel
    h, w = shown.shape
    s = max(1, FIGURE_PX // max(h, w))
    vrange = color_range(band, arr)
    img = Image.fromarray(colorize(shown, COLORMAPS[band.kind], vrange), "RGBA").resize((w * s, h * s), Image.NEAREST)
    font = _font()
    ml, mt, mr, mb = 14, 34, 130, 34
    W, H = ml + img.width + mr, mt + img.height + mb
    canvas = Image.new("RGBA", (W, H), (255, 255, 255, 255))
    canvas.alpha_composite(img, (ml, mt))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([ml - 1, mt - 1, ml + img.width, mt + img.height], outline=(80, 80, 80, 255))
    inv = ~(result.transform @ affine.Affine.scale(k_data / s))
    for r in rings:
        cols, rows = inv @ (r[:, 0], r[:, 1])
        draw.line([(ml + c, mt + q) for c, q in zip(cols, rows)], fill=(0, 0, 0, 255), width=1)
    draw.text((ml, 8), band.description, fill=(0, 0, 0, 255), font=font)
    draw.text((ml, mt + img.height + 8), f"x (m, {crs_label(CRS.from_user_input(result.crs))}), "
              f"{result.transform.a:g} m pixels", fill=(60, 60, 60, 255), font=font)
    # colour bar: top = vmax
    bx, bh = ml + img.width + 16, img.height
    ramp = np.linspace(vrange[1], vrange[0], bh, dtype=np.float32)[:, None].repeat(18, axis=1)
    canvas.alpha_composite(Image.fromarray(colorize(ramp, COLORMAPS[band.kind], vrange), "RGBA"), (bx, mt))
    draw.rectangle([bx - 1, mt - 1, bx + 18, mt + bh], outline=(80, 80, 80, 255))
    draw.text((bx + 24, mt - 2), f"{vrange[1]:.4g}", fill=(0, 0, 0, 255), font=font)
    draw.text((bx + 24, mt + bh - 14), f"{vrange[0]:.4g}", fill=(0, 0, 0, 255), font=font)
    draw.text((bx + 24, mt + bh // 2 - 7), _KIND_LABEL[band.kind].split(" (")[0], fill=(60, 60, 60, 255), font=font)
    if not np.isfinite(arr).any():
        draw.text((ml + img.width // 2 - 45, mt + img.height // 2), "no valid pixels", fill=(0, 0, 0, 255), font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def overlay(result: MapResult, arr: np.ndarray) -> tuple[np.ndarray, tuple[float, ...]]:
    """``arr`` reprojected to Web Mercator (so a Leaflet image overlay in lon/lat bounds is
    exact), at most :data:`MAX_OVERLAY_PX` on a side; returns (array, (W, S, E, N) degrees)."""
    from rasterio.crs import CRS as RCRS
    from rasterio.warp import Resampling, calculate_default_transform, reproject

    h, w = arr.shape
    src_crs = RCRS.from_wkt(CRS.from_user_input(result.crs).to_wkt())
    dst_crs = RCRS.from_epsg(3857)
    left, bottom, right, top = result.bounds()
    tr, dw, dh = calculate_default_transform(src_crs, dst_crs, w, h, left, bottom, right, top)
    scale = max(dw, dh) / MAX_OVERLAY_PX
    if scale > 1:
        dw, dh = max(1, int(dw / scale)), max(1, int(dh / scale))
        tr = tr @ affine.Affine.scale(scale)
    dst = np.full((dh, dw), np.nan, dtype=np.float32)
    reproject(arr, dst, src_transform=result.transform, src_crs=src_crs, src_nodata=np.nan,
              dst_transform=tr, dst_crs=dst_crs, dst_nodata=np.nan, resampling=Resampling.nearest)
    l3, t3 = tr @ (0, 0)
    r3, b3 = tr @ (dw, dh)
    to_ll = Transformer.from_crs(3857, 4326, always_xy=True)
    (west, east), (north, south) = to_ll.transform([l3, r3], [t3, b3])
    return dst, (float(west), float(south), float(east), float(north))


def rgba_png(band: MapBand, arr: np.ndarray, vrange: tuple[float, float]) -> bytes:
    """Raw pixels coloured with the band's colour map, NaN alpha 0, as an RGBA PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(colorize(arr, COLORMAPS[band.kind], vrange), "RGBA").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def html_page(result: MapResult, entries: list[dict]) -> str:
    """The page (``assets/preview.html``) filled in for ``result``."""
    esc = html.escape
    crs = CRS.from_user_input(result.crs)
    h, w = result.shape
    bounds = result.bounds()
    west, south, east, north = lonlat_bounds(crs, bounds)
    tags = full_tags(result)
    untrained = [k for k, v in tags.items()
                 if "untrained" in k.lower() and str(v).strip().lower() in ("1", "true", "yes")]

    def js_json(obj) -> str:
        return json.dumps(obj).replace("</", "<\\/")

    warn = ("<div class='warn'><b>Untrained weights:</b> this map was made with a checkpoint holding untrained "
            "weights (" + esc(", ".join(untrained)) + "); its values mean nothing.</div>") if untrained else ""
    geo = (f"<tr><th>CRS</th><td>{esc(crs_label(crs))} ({esc(crs.name)})</td></tr>"
           f"<tr><th>size</th><td>{w} x {h} px, pixel {result.transform.a:g} m</td></tr>"
           f"<tr><th>bounds (CRS)</th><td>{bounds[0]:.2f}, {bounds[1]:.2f}, {bounds[2]:.2f}, {bounds[3]:.2f}</td></tr>"
           f"<tr><th>bounds (lon/lat)</th><td>W {west:.6f}, S {south:.6f}, E {east:.6f}, N {north:.6f}</td></tr>")
    return Template(_asset("preview.html")).substitute(
        leaflet_css=LEAFLET_CSS, leaflet_js=LEAFLET_JS, warn=warn, geo=geo,
        options="".join(f'<option value="{i}">{esc(e["description"])} [{esc(e["name"])}]</option>'
                        for i, e in enumerate(entries)),
        band_rows="".join(
            f"<tr><td>{i + 1}</td><td>{esc(e['name'])}</td><td>{esc(e['description'])}</td>"
            f"<td>{esc(e['kind'])}</td><td>{esc(str(e['query'] or ''))}</td>"
            f"<td>{'' if e['zoom'] is None else e['zoom']}</td><td>{100 * e['valid']:.1f}%</td></tr>"
            for i, e in enumerate(entries)),
        rows="".join(f"<tr><th>{esc(k)}</th><td class='v'>{esc(str(tags[k]))}</td></tr>" for k in sorted(tags)),
        bands_json=js_json(entries), region_json=js_json(result.region_geojson))


def write_preview_dir(result: MapResult, arrays: list[np.ndarray], out: Path, progress: bool = False) -> list[str]:
    """Fill the new folder ``out`` with the preview PNGs and ``index.html`` (no staging; see
    :func:`write_previews`). Returns the file names written."""
    from tqdm.auto import tqdm

    out.mkdir()
    rings = region_rings(result.region_geojson, CRS.from_user_input(result.crs))
    taken: set[str] = set()
    entries, names = [], []
    for band, arr in tqdm(list(zip(result.bands, arrays)), desc="previews", unit="band", disable=not progress):
        stem = safe_name(band.name, taken)
        fig_png = _figure_png(band, arr, result, rings)
        ov, ov_bounds = overlay(result, arr)
        vrange = color_range(band, arr)
        ov_png = rgba_png(band, ov, vrange)
        (out / f"{stem}.png").write_bytes(fig_png)
        (out / f"{stem}_overlay.png").write_bytes(ov_png)
        names += [f"{stem}.png", f"{stem}_overlay.png"]
        entries.append({
            "name": band.name, "description": band.description, "kind": band.kind, "query": band.query,
            "zoom": band.zoom, "file": f"{stem}.png", "vmin": vrange[0], "vmax": vrange[1],
            "cmap": COLORMAPS[band.kind], "valid": float(np.isfinite(arr).mean()),
            "figure": base64.b64encode(fig_png).decode("ascii"),
            "overlay": base64.b64encode(ov_png).decode("ascii"), "overlay_bounds": ov_bounds,
        })
    (out / "index.html").write_text(html_page(result, entries), encoding="utf-8")
    names.append("index.html")
    return names


def write_previews(result: MapResult, out_dir: str | os.PathLike, overwrite: bool = False,
                   progress: bool = False) -> list[Path]:
    """Write ``out_dir/`` with one PNG per band (title + colour bar), a lon/lat overlay PNG per
    band and a self-contained ``index.html``. Returns the files written."""
    if not is_local(out_dir):
        raise OutputError(f"preview folder {out_dir} is not a local path: give a local folder")
    arrays = check_result(result)
    stage = Stage(local_path(out_dir), overwrite)
    names: list[str] = []
    staged_all([stage], lambda: names.extend(write_preview_dir(result, arrays, stage.tmp, progress)))
    return [stage.dst / n for n in names]
