"""Previews of a month x hour cube, in ``<out>.preview/``:

* ``<variable>_z<zoom>.gif``: an animated GIF per query (and uncertainty) and zoom, one frame per
  setting (hours step fastest, then months), each frame titled with its month and hour;
* ``<variable>_z<zoom>_grid.png``: small multiples, months down and hours across, one colour scale;
* ``index.html``: the page, with month and hour sliders (a time slider) and play / pause.

Colour scales are fixed per variable and zoom over the whole cube (2nd..98th percentile of
every setting's values), so what changes between frames is the place, not the scale."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from .labels import MONTH_NAMES, setting_label
from .preview import _asset, _font, block_mean, colorize, value_range
from .results import COLORMAPS, safe_name

#: longest side of a frame's raster (block means above it), and the size it is drawn at
FRAME_DATA_PX = 256
FRAME_PX = 320
#: frame time of the animation, milliseconds
FRAME_MS = 400


def cube_range(kind: str, data: np.ndarray) -> tuple[float, float]:
    """The one colour range of ``data`` (every setting), as the single maps' previews choose it."""
    return value_range(kind, data)


def _raster(arr: np.ndarray, cmap: str, vrange, px: int):
    """``arr`` coloured, scaled (nearest) so its longer side is about ``px``: an RGBA image."""
    from PIL import Image

    shown = block_mean(np.asarray(arr, np.float32), FRAME_DATA_PX)
    h, w = shown.shape
    s = max(1.0, px / max(h, w))
    return Image.fromarray(colorize(shown, cmap, vrange), "RGBA").resize(
        (max(1, round(w * s)), max(1, round(h * s))), Image.NEAREST)


def _colour_bar(draw, canvas, x: int, y: int, height: int, cmap: str, vrange) -> None:
    from PIL import Image

    ramp = np.linspace(vrange[1], vrange[0], height, dtype=np.float32)[:, None].repeat(14, axis=1)
    canvas.alpha_composite(Image.fromarray(colorize(ramp, cmap, vrange), "RGBA"), (x, y))
    draw.rectangle([x - 1, y - 1, x + 14, y + height], outline=(80, 80, 80, 255))
    draw.text((x + 20, y - 2), f"{vrange[1]:.4g}", fill=(0, 0, 0, 255), font=_font())
    draw.text((x + 20, y + height - 14), f"{vrange[0]:.4g}", fill=(0, 0, 0, 255), font=_font())


def frame_image(arr: np.ndarray, title: str, subtitle: str, cmap: str, vrange):
    """One animation frame: title, the raster, a fixed colour bar (RGB, white background)."""
    from PIL import Image, ImageDraw

    img = _raster(arr, cmap, vrange, FRAME_PX)
    ml, mt, mr, mb = 10, 46, 90, 10
    canvas = Image.new("RGBA", (ml + img.width + mr, mt + max(img.height, 60) + mb), (255, 255, 255, 255))
    canvas.alpha_composite(img, (ml, mt))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([ml - 1, mt - 1, ml + img.width, mt + img.height], outline=(80, 80, 80, 255))
    draw.text((ml, 6), title, fill=(0, 0, 0, 255), font=_font())
    draw.text((ml, 24), subtitle, fill=(0, 0, 0, 255), font=_font())
    _colour_bar(draw, canvas, ml + img.width + 12, mt, img.height, cmap, vrange)
    return canvas.convert("RGB")


def animation_gif(frames) -> bytes:
    """An endlessly looping GIF of ``frames`` (PIL images), one per setting."""
    buf = io.BytesIO()
    pal = [f.quantize(colors=255, method=2) for f in frames]  # fast octree, a palette per frame
    pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:], duration=FRAME_MS, loop=0,
                optimize=False, disposal=1)
    return buf.getvalue()


def grid_png(result, data: np.ndarray, k: int, title: str, cmap: str, vrange) -> bytes:
    """Small multiples of ``data[:, k]``: a row per month, a column per hour, one colour scale."""
    from PIL import Image, ImageDraw

    rows = len(result.months) if result.months is not None else 1
    cols = len(result.hours) if result.hours is not None else 1
    if result.hours is None and rows > 6:  # months only: a 4-wide grid reads better than a column
        cols, rows = 4, -(-rows // 4)
    panel = int(max(40, min(180, 1500 // max(cols, 1))))
    font = _font()
    ml, mt, gap = 74, 52, 4
    tiles = [_raster(data[s, k], cmap, vrange, panel) for s in range(data.shape[0])]
    tw = max(t.width for t in tiles)
    th = max(t.height for t in tiles)
    canvas = Image.new("RGBA", (ml + cols * (tw + gap) + 80, mt + rows * (th + gap) + 10), (255, 255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(0, 0, 0, 255), font=font)
    for s, t in enumerate(tiles):
        if result.hours is None and result.months is not None and cols == 4:
            r, c = divmod(s, cols)
        else:
            r, c = divmod(s, len(result.hours) if result.hours is not None else 1)
        x, y = ml + c * (tw + gap), mt + r * (th + gap)
        canvas.alpha_composite(t, (x, y))
        draw.rectangle([x - 1, y - 1, x + t.width, y + t.height], outline=(170, 170, 170, 255))
        m, h = result.settings[s]
        if result.hours is not None and r == 0:
            draw.text((x + 2, mt - 18), f"{h:02d}h", fill=(0, 0, 0, 255), font=font)
        if result.hours is None or c == 0:
            label = MONTH_NAMES[m - 1][:3] if result.months is not None else "(month fixed)"
            if result.hours is None:
                draw.text((x + 2, y + 2), label, fill=(255, 255, 255, 255), font=font)
            else:
                draw.text((8, y + th // 2 - 7), label, fill=(0, 0, 0, 255), font=font)
    _colour_bar(draw, canvas, ml + cols * (tw + gap) + 10, mt, min(rows * (th + gap) - gap, 300), cmap, vrange)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


#: bytes of frame PNGs the HTML page aims to stay under (larger cubes get smaller frames)
PAGE_FRAME_BYTES = 40 << 20


def page_frame_px(n_frames: int) -> int:
    """Longest side of the page's frames: 256 px, less for many frames (~2 bytes a pixel)."""
    return int(max(48, min(FRAME_DATA_PX, np.sqrt(PAGE_FRAME_BYTES / max(1, n_frames) / 2))))


def _frame_png(arr: np.ndarray, cmap: str, vrange, px: int = FRAME_DATA_PX) -> str:
    from PIL import Image

    buf = io.BytesIO()
    shown = block_mean(np.asarray(arr, np.float32), px)
    Image.fromarray(colorize(shown, cmap, vrange), "RGBA").save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def write_cube_previews(result, out: Path, progress: bool = False) -> list[str]:
    """Fill the new folder ``out`` with the GIFs, the small multiples and ``index.html`` (no
    staging: :func:`~psm_mapping.outputs.cube.write_cube_outputs` stages it). Returns the names."""
    from tqdm.auto import tqdm

    from .cube_result import cube_tags, preview_data
    from .results import full_tags

    out.mkdir()
    taken: set[str] = set()
    names, entries = [], []
    jobs = [(v, k, z) for v in result.variables if v.kind != "score" for k, z in enumerate(result.zoom_levels)]
    px = page_frame_px(len(jobs) * len(result.settings))
    small: dict[int, np.ndarray] = {}  # per variable: as is, or a streamed cube's block means
    for v, k, z in tqdm(jobs, desc="cube previews", unit="panel", disable=not progress):
        cmap = COLORMAPS[v.kind]
        if id(v) not in small:
            small.clear()
            small[id(v)] = preview_data(v.data, FRAME_DATA_PX)
        data = small[id(v)]
        vrange = cube_range(v.kind, data[:, k])
        stem = safe_name(f"{v.name}_z{z}", taken)
        title = f"{v.description} at zoom {z}"
        frames = [frame_image(data[s, k], title, f"{setting_label(*result.settings[s])}   (one colour scale "
                              "for every frame)", cmap, vrange) for s in range(len(result.settings))]
        (out / f"{stem}.gif").write_bytes(animation_gif(frames))
        (out / f"{stem}_grid.png").write_bytes(grid_png(result, data, k, title, cmap, vrange))
        names += [f"{stem}.gif", f"{stem}_grid.png"]
        entries.append({"name": v.name, "zoom": z, "description": title, "kind": v.kind, "cmap": cmap,
                        "vmin": vrange[0], "vmax": vrange[1], "gif": f"{stem}.gif", "grid": f"{stem}_grid.png",
                        "frames": [_frame_png(data[s, k], cmap, vrange, px) for s in range(len(result.settings))]})
    tags = full_tags(_map_like(result))
    tags.update(cube_tags(result))
    page = html_cube_page(result, entries, tags)
    (out / "index.html").write_text(page, encoding="utf-8")
    names.append("index.html")
    return names


def _map_like(result):
    from .cube_result import _as_map

    return _as_map(result)


def html_cube_page(result, entries: list[dict], tags: dict) -> str:
    """The page (``assets/cube.html``): a variable/zoom menu, month and hour sliders, play."""
    from string import Template

    esc = html.escape
    axes = {"months": list(result.months or []), "hours": list(result.hours or []),
            "month_names": list(MONTH_NAMES), "fixed_month": result.month, "fixed_hour": result.hour}
    return Template(_asset("cube.html")).substitute(
        options="".join(f'<option value="{i}">{esc(e["description"])}</option>' for i, e in enumerate(entries)),
        rows="".join(f"<tr><th>{esc(k)}</th><td class='v'>{esc(str(tags[k]))}</td></tr>" for k in sorted(tags)),
        entries_json=json.dumps(entries).replace("</", "<\\/"), axes_json=json.dumps(axes).replace("</", "<\\/"))
