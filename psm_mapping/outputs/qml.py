"""The QGIS layer style beside every map COG: ``map.tif`` -> ``map.qml``.

QGIS loads ``<base name>.qml`` by itself when it opens ``<base name>.tif``, so a map opens as a
single-band pseudocolour picture of its first band (the band QGIS shows first: the first
query's similarity at the first zoom level) instead of a meaningless red/green/blue composite of
bands 1-3. The colour ramp is the previews' 256-entry lookup table (``assets/colormaps.json``)
over the previews' value range (:func:`~psm_mapping.outputs.preview.value_range`; a cube's one
range over every month/hour setting), interpolated, values past the ends painted with the end
colours (as the previews clip them), NaN (nodata) transparent.

The file is written with :mod:`xml.etree.ElementTree` (band names and queries are user strings:
never pasted into XML by hand), staged and swapped into place with its COG, and listed in the
STAC Item as the asset ``style`` (media type :data:`QML_MEDIA_TYPE`, role ``style``).
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

#: what QGIS looks for beside a raster (``map.tif`` -> ``map.qml``)
QML_SUFFIX = ".qml"
#: the STAC media type of the style asset (QML is XML; QGIS Server serves styles as text/xml)
QML_MEDIA_TYPE = "text/xml"
#: the STAC role of the style asset
QML_ROLE = "style"
#: QGIS version the style is written for (read by 3.x: 3.22 LTR and newer)
QGIS_VERSION = "3.22.0"
_DOCTYPE = "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n"


def qml_path(cog: str | os.PathLike) -> Path:
    """Where QGIS looks for the style of ``cog``: the same base name with ``.qml``."""
    p = Path(cog)
    return p.with_suffix(QML_SUFFIX) if p.suffix else p.with_name(p.name + QML_SUFFIX)


def _rgba(rgb) -> str:
    return f"{int(rgb[0])},{int(rgb[1])},{int(rgb[2])},255"


def _hex(rgb) -> str:
    return "#{:02x}{:02x}{:02x}".format(*(int(c) for c in rgb))


def _num(v: float) -> str:
    return repr(float(v))


def style_xml(cmap: str, vrange: tuple[float, float], band: int = 1) -> str:
    """The QML text: band ``band`` through colour map ``cmap`` (viridis, magma) over ``vrange``."""
    from .preview import colormap_lut

    lut = colormap_lut(cmap)
    lo, hi = float(vrange[0]), float(vrange[1])
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"colour range {vrange} is not an increasing pair of finite numbers")
    root = ET.Element("qgis", {"version": QGIS_VERSION, "styleCategories": "Symbology"})
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", {
        "type": "singlebandpseudocolor", "band": str(int(band)), "opacity": "1", "alphaBand": "-1",
        "nodataColor": "", "classificationMin": _num(lo), "classificationMax": _num(hi)})
    ET.SubElement(renderer, "rasterTransparency")
    origin = ET.SubElement(renderer, "minMaxOrigin")
    for tag, text in (("limits", "None"), ("extent", "WholeRaster"), ("statAccuracy", "Estimated"),
                      ("cumulativeCutLower", "0.02"), ("cumulativeCutUpper", "0.98"), ("stdDevFactor", "2")):
        ET.SubElement(origin, tag).text = text
    shader = ET.SubElement(ET.SubElement(renderer, "rastershader"), "colorrampshader", {
        "colorRampType": "INTERPOLATED", "classificationMode": "1", "clip": "0",
        "minimumValue": _num(lo), "maximumValue": _num(hi), "labelPrecision": "4"})
    ramp = ET.SubElement(shader, "colorramp", {"name": "[source]", "type": "gradient"})
    stops = ":".join(f"{i / 255:.6g};{_rgba(lut[i])}" for i in range(1, 255))
    props = {"color1": _rgba(lut[0]), "color2": _rgba(lut[255]), "discrete": "0", "rampType": "gradient",
             "stops": stops}
    opts = ET.SubElement(ramp, "Option", {"type": "Map"})
    for k, v in props.items():
        ET.SubElement(opts, "Option", {"name": k, "type": "QString", "value": v})
    for k, v in props.items():  # the pre-3.18 form, which 3.x still reads
        ET.SubElement(ramp, "prop", {"k": k, "v": v})
    values = np.linspace(lo, hi, 256)
    for i, v in enumerate(values):
        ET.SubElement(shader, "item", {"alpha": "255", "color": _hex(lut[i]), "value": _num(v),
                                       "label": f"{v:.4g}"})
    ET.SubElement(shader, "rampLegendSettings", {
        "minimumLabel": "", "maximumLabel": "", "prefix": "", "suffix": "", "direction": "0",
        "useContinuousLegend": "1", "orientation": "2"})
    ET.SubElement(pipe, "brightnesscontrast", {"brightness": "0", "contrast": "0", "gamma": "1"})
    ET.SubElement(pipe, "huesaturation", {"saturation": "0", "grayscaleMode": "0", "colorizeOn": "0",
                                          "colorizeRed": "255", "colorizeGreen": "128", "colorizeBlue": "128",
                                          "colorizeStrength": "100", "invertColors": "0"})
    ET.SubElement(pipe, "rasterresampler", {"maxOversampling": "2"})
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root, space=" ")
    return _DOCTYPE + ET.tostring(root, encoding="unicode") + "\n"


def first_band_style(kind: str, arr, vrange: tuple[float, float] | None = None) -> tuple[str, tuple[float, float]]:
    """(colour map, range) of a map whose first band has ``kind`` and values ``arr``: the previews'
    choice (``vrange`` given: a cube's fixed range)."""
    from .preview import value_range
    from .results import COLORMAPS

    return COLORMAPS[kind], (vrange if vrange is not None else value_range(kind, np.asarray(arr)))


def write_qml(path: str | os.PathLike, kind: str, arr, vrange: tuple[float, float] | None = None) -> Path:
    """Write the style of a map whose first band has ``kind`` and values ``arr`` to ``path`` (no
    staging: the caller stages it with its COG)."""
    cmap, rng = first_band_style(kind, arr, vrange)
    p = Path(path)
    p.write_text(style_xml(cmap, rng, band=1), encoding="utf-8")
    return p


__all__ = ["QML_SUFFIX", "QML_MEDIA_TYPE", "QML_ROLE", "qml_path", "style_xml", "write_qml", "first_band_style"]
