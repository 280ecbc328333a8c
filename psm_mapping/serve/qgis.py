""""Add to QGIS": the explorer's XYZ layer as a QGIS connection file.

``GET /api/qgis-connection.xml?text=...`` (the tile parameters of ``/tiles``) answers the XML
QGIS's Browser imports (XYZ Tiles > Load Connections...; the same format its "Save Connections"
writes): one ``<xyztiles>`` whose ``url`` is the tile template of that query. The URL is built
from the server's configured address, never
from the request's Host header (:func:`psm_mapping.serve.security.request_base`), and carries
the access token when the server has one."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .engine import BANDS, RequestError
from .security import request_base, request_security
from .tiles import colormap_names

router = APIRouter()

#: the query parameters of /tiles that the connection's URL keeps (in this order)
TILE_PARAMS = ("text", "audio", "month", "hour", "zoom_level", "band", "colormap", "vmin", "vmax", "resampling")
#: the zoom range QGIS asks tiles for (the explorer's tilejson range)
ZMIN, ZMAX = 0, 20


def xyz_url(base_url: str, params, token: str | None = None) -> str:
    """The tile template ``BASE/tiles/{z}/{x}/{y}.png?...`` of ``params`` (plus ``token``)."""
    q = [(k, str(params.get(k))) for k in TILE_PARAMS if params.get(k) not in (None, "")]
    if token:
        q.append(("token", token))
    return base_url.rstrip("/") + "/tiles/{z}/{x}/{y}.png" + ("?" + urlencode(q, quote_via=quote) if q else "")


def connection_xml(name: str, url: str, zmin: int = ZMIN, zmax: int = ZMAX) -> str:
    """QGIS's XYZ connections export format with one connection."""
    root = ET.Element("qgsXYZTilesConnections", {"version": "1.0"})
    ET.SubElement(root, "xyztiles", {"name": name, "url": url, "zmin": str(int(zmin)), "zmax": str(int(zmax)),
                                     "authcfg": "", "username": "", "password": "", "referer": "",
                                     "tilePixelRatio": "0"})
    ET.indent(root, space=" ")
    return "<!DOCTYPE connections>\n" + ET.tostring(root, encoding="unicode") + "\n"


def layer_name(params) -> str:
    what = params.get("text") or ("audio clip" if params.get("audio") else (params.get("band") or "similarity"))
    parts = [f"psm-mapping: {what}"]
    for k in ("month", "hour", "zoom_level"):
        if params.get(k) not in (None, ""):
            parts.append(f"{k.replace('_', ' ')} {params.get(k)}")
    if params.get("band") not in (None, "", "similarity"):
        parts.append(str(params.get("band")))
    return ", ".join(parts)


def _check(ex, p) -> None:
    """The checks /tiles makes, so a connection to a tile that would fail is refused now."""
    band = (p.get("band") or "similarity").strip().lower()
    if band not in BANDS:
        raise RequestError(f"band {band!r} is unknown: use one of {', '.join(BANDS)}")
    ex.query_spec(p.get("text"), p.get("audio"), p.get("month"), p.get("hour"), band != "uncertainty")
    ex.zoom_index(p.get("zoom_level"))
    cm = p.get("colormap")
    if cm and cm.strip().lower() not in colormap_names():
        raise RequestError(f"colormap {cm!r} is unknown: GET /api/colormaps lists them")


@router.get("/api/qgis-connection.xml")
def qgis_connection(request: Request):
    """The query's XYZ layer as a QGIS connection file (Browser > XYZ Tiles > Load Connections...)."""
    p = request.query_params
    _check(request.app.state.explorer, p)
    url = xyz_url(request_base(request), p, request_security(request).token)
    return Response(connection_xml(layer_name(p), url), media_type="application/xml",
                    headers={"Content-Disposition": 'attachment; filename="psm-mapping-xyz.xml"',
                             "Cache-Control": "no-store"})
