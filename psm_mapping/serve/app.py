"""The explorer's HTTP API (FastAPI): XYZ tiles, points, uploads, exports, and the page.

Every answer to a bad request is a 4xx with a JSON body ``{"error": "what and how to fix"}``;
no traceback is ever sent. The only files served are the page's assets, by fixed names.
"""
from __future__ import annotations

import json
import logging
import math
import time
import tempfile
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PSMError
from .engine import BANDS, Explorer, QuerySpec, RequestError
from .security import Security, SecurityMiddleware, request_base
from .qgis import router as qgis_router
from .tiles import (MAX_TILE_ZOOM, TILE_FORMATS, TILE_SIZE, colormap_names, encode_npy, encode_png, encode_tif,
                    legend_png, transparent_png)

log = logging.getLogger(__name__)

#: the page's assets: URL name -> media type (nothing else is ever read from disk by URL)
STATIC = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "maplibre-gl.js": "text/javascript; charset=utf-8",
    "maplibre-gl.css": "text/css; charset=utf-8",
    "MAPLIBRE-LICENSE.txt": "text/plain; charset=utf-8",
}
DEFAULT_COLORMAPS = {"similarity": "viridis", "score": "viridis", "uncertainty": "magma"}
#: the basemap the page shows when it is reachable (checked by the server, once)
DEFAULT_BASEMAP = "https://tile.openstreetmap.org/{z}/{x}/{y}.png"
BASEMAP_ATTRIBUTION = "© OpenStreetMap contributors"
TILE_CACHE_CONTROL = "public, max-age=3600"


def _asset(name: str) -> bytes:
    return resources.files("psm_mapping.serve").joinpath("static", name).read_bytes()


def _float(name: str, value) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if not math.isfinite(v):
        raise RequestError(f"{name} {value!r} is not a finite number: give e.g. {name}=0.5")
    return v


def _int(name: str, value: str, lo: int, hi: int) -> int:
    try:
        v = int(str(value))
    except ValueError:
        raise RequestError(f"tile {name} {value!r} is not a whole number: use /tiles/Z/X/Y.png") from None
    if not lo <= v <= hi:
        raise RequestError(f"tile {name} {v} is out of range {lo}..{hi}: use a Web Mercator XYZ tile")
    return v


def _check_basemap(url: str, timeout: float = 3.0) -> bool:
    import httpx

    try:
        r = httpx.get(url.format(z=0, x=0, y=0), timeout=timeout, follow_redirects=True,
                      headers={"User-Agent": "psm-mapping explorer"})
        return r.status_code == 200 and r.headers.get("content-type", "").startswith("image/")
    except Exception:
        return False


def create_app(store_url: str | None = None, *, explorer: Explorer | None = None,
               basemap: str | None = DEFAULT_BASEMAP, security: Security | None = None, **explorer_options):
    """The FastAPI app serving ``store_url`` (``explorer_options``: see :class:`Explorer`:
    ``checkpoint``, ``clap_config``, ``tokenizer``, ``device``, ``memory_limit``, ...).
    ``basemap``: an XYZ URL the page shows when the server can reach it; None: none.
    ``security``: Host allow-list, CORS origins and token (default: loopback, no CORS, no
    token; :mod:`psm_mapping.serve.security`), checked in front of every route."""
    import threading

    ex = explorer if explorer is not None else Explorer(store_url, **explorer_options)
    @asynccontextmanager
    async def lifespan(app):
        yield
        ex.close()

    app = FastAPI(title="psm-mapping explorer", docs_url="/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json", lifespan=lifespan)
    app.state.explorer = ex
    app.state.security = security = security or Security()
    app.add_middleware(SecurityMiddleware, security=security)  # every route, those added later too
    basemap_state = {"url": None, "checked": basemap is None}

    def probe():
        if basemap and _check_basemap(basemap):
            basemap_state["url"] = basemap
        basemap_state["checked"] = True

    if basemap:
        threading.Thread(target=probe, daemon=True, name="basemap-probe").start()

    # -------------------------------------------------------------- errors: JSON, never a traceback
    def err(status: int, message: str):
        return JSONResponse({"error": " ".join(str(message).split())}, status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return err(exc.status, str(exc))

    @app.exception_handler(PSMError)
    async def _psm_error(request: Request, exc: PSMError):
        return err(getattr(exc, "status", 400), str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return err(404, f"no such page {request.url.path!r}: see GET /api/info and the README's HTTP API")
        if exc.status_code == 405:
            return err(405, f"{request.method} is not allowed on {request.url.path}")
        return err(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for e in exc.errors():
            where = ".".join(str(p) for p in e.get("loc", ()) if p not in ("query", "path", "body"))
            parts.append(f"{where}: {e.get('msg')}")
        return err(400, "bad request (" + "; ".join(parts) + "): fix the parameters")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return err(500, f"internal error ({type(exc).__name__}): see the server's log")

    # -------------------------------------------------------------- parameters
    def spec_of(p, need_query=True) -> QuerySpec:
        return ex.query_spec(p.get("text"), p.get("audio"), p.get("month"), p.get("hour"), need_query)

    def band_of(p) -> str:
        band = (p.get("band") or "similarity").strip().lower()
        if band not in BANDS:
            raise RequestError(f"band {band!r} is unknown: use one of {', '.join(BANDS)}")
        return band

    def colormap_of(p, band: str) -> str:
        name = (p.get("colormap") or DEFAULT_COLORMAPS[band]).strip().lower()
        if name not in colormap_names():
            raise RequestError(f"colormap {name!r} is unknown: use e.g. viridis, magma, plasma, "
                               "inferno, cividis, rdylgn (GET /api/colormaps lists all)")
        return name

    # -------------------------------------------------------------- the page
    def static(name: str) -> Response:
        return Response(_asset(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.get("/", include_in_schema=False)
    def index():
        return static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in STATIC:
            raise RequestError(f"no such file {name!r}: the page's assets are {', '.join(sorted(STATIC))}", 404)
        return static(name)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():
        return Response(status_code=204)

    # -------------------------------------------------------------- API
    @app.get("/api/info")
    def info():
        """The store, its checkpoint, zoom levels and what can be asked."""
        d = ex.info()
        d["basemap"] = ({"url": basemap_state["url"], "attribution": BASEMAP_ATTRIBUTION}
                        if basemap_state["url"] else None)
        d["basemap_checked"] = basemap_state["checked"]
        return d

    @app.get("/api/stats")
    def stats():
        """Cache sizes, hits, and how many times each query was computed."""
        return ex.stats()

    @app.get("/api/progress")
    def progress():
        """The computations running now (re-fusion of zoom levels for month/hour, similarity passes)."""
        return {"jobs": ex.jobs.list()}

    @app.get("/api/footprint.geojson")
    def footprint():
        return Response(json.dumps(ex.footprint()), media_type="application/geo+json")

    @app.get("/api/colormaps")
    def colormaps():
        return {"colormaps": colormap_names(), "defaults": DEFAULT_COLORMAPS}

    @app.get("/api/legend.png")
    def legend(request: Request):
        p = request.query_params
        return Response(legend_png(colormap_of(p, band_of(p))), media_type="image/png",
                        headers={"Cache-Control": TILE_CACHE_CONTROL})

    @app.get("/api/query")
    def query(request: Request):
        """Compute a query at every zoom level (once; later calls answer from the cache): value ranges."""
        return ex.summary(spec_of(request.query_params))

    @app.get("/tiles/{z}/{x}/{y}.{fmt}")
    def tile(z: str, x: str, y: str, fmt: str, request: Request):
        """An XYZ tile (256 px, Web Mercator): ``.png`` coloured with alpha (transparent outside
        the store's valid area); ``.tif`` (float32 GeoTIFF, EPSG:3857, NaN nodata) and ``.npy``
        (float32 ``[2, 256, 256]``: values, mask 255/0) for clients that colour themselves."""
        p = request.query_params
        fmt = fmt.lower()
        if fmt not in TILE_FORMATS:
            raise RequestError(f"tile format {fmt!r} is unknown: use .png (coloured), .tif (float32 "
                               "GeoTIFF) or .npy (float32 array)", 404)
        zz = _int("z", z, 0, MAX_TILE_ZOOM)
        xx, yy = _int("x", x, 0, 2 ** zz - 1), _int("y", y, 0, 2 ** zz - 1)
        band = band_of(p)
        q = spec_of(p, need_query=band != "uncertainty")
        zi = ex.zoom_index(p.get("zoom_level"))
        resampling = (p.get("resampling") or "nearest").lower()
        if resampling not in ("nearest", "bilinear"):
            raise RequestError(f"resampling {resampling!r} is unknown: use nearest or bilinear")
        vmin = vmax = None
        if fmt == "png":
            cm = colormap_of(p, band)
            vmin, vmax = _float("vmin", p.get("vmin")), _float("vmax", p.get("vmax"))
            key = (q.query_key, q.md_key, zi, band, vmin, vmax, cm, resampling, zz, xx, yy)
        else:
            key = (q.query_key, q.md_key, zi, band, fmt, resampling, zz, xx, yy)
        # the colour range: for score values, and for colours not fully given by vmin/vmax
        need_range = band == "score" or (fmt == "png" and (vmin is None or vmax is None))
        body = ex.tiles.get(key)
        timing = {}
        if body is None:
            t0 = time.perf_counter()
            if q.text or q.audio:
                ex.embedding(q)  # a new query's embedding (timed apart from the cells)
            t1 = time.perf_counter()
            values, (lo, hi) = ex.tile_and_range(q, zi, band, zz, xx, yy, resampling, need_range)
            if band == "score" and values is not None:  # 0..1 over the query's range
                values = ex.to_score(values, lo, hi)
            if fmt == "png":
                if values is None or (need_range and lo is None):
                    body = b""
                else:
                    if band == "score":
                        v0 = 0.0 if vmin is None else vmin
                        v1 = 1.0 if vmax is None else vmax
                    else:
                        v0 = lo if vmin is None else vmin
                        v1 = hi if vmax is None else vmax
                    body = encode_png(values, v0, v1, cm)
            else:
                if values is None:
                    values = np.full((TILE_SIZE, TILE_SIZE), np.nan, np.float32)
                body = encode_tif(values, zz, xx, yy) if fmt == "tif" else encode_npy(values)
            ex.tiles.put(key, body, max(len(body), 64))
            timing = {"embed": t1 - t0, "tile": time.perf_counter() - t1}
        headers = {"Cache-Control": TILE_CACHE_CONTROL}
        if timing:  # where a computed tile's time went (W3C Server-Timing, milliseconds)
            headers["Server-Timing"] = ", ".join(f"{k};dur={v * 1e3:.1f}" for k, v in timing.items())
        return Response(body or transparent_png(), media_type=TILE_FORMATS[fmt], headers=headers)

    @app.get("/tilejson.json")
    def tilejson(request: Request):
        """TileJSON 3.0 of a layer: the same query parameters as /tiles."""
        p = request.query_params
        band = band_of(p)
        spec_of(p, need_query=band != "uncertainty")
        ex.zoom_index(p.get("zoom_level"))
        colormap_of(p, band)
        # the configured address (never the request's Host), with the token when there is one
        tiles = security.tile_template(request_base(request), str(request.url.query))
        return {"tilejson": "3.0.0", "name": "psm-mapping " + (p.get("text") or band),
                "tiles": [tiles],
                "bounds": list(ex.lonlat_bounds), "minzoom": 0, "maxzoom": 20,
                "center": [(ex.lonlat_bounds[0] + ex.lonlat_bounds[2]) / 2,
                           (ex.lonlat_bounds[1] + ex.lonlat_bounds[3]) / 2, 12]}

    @app.get("/api/point")
    def point(request: Request):
        """Similarity, 0-1 score and uncertainty per zoom level at one place."""
        p = request.query_params
        lon, lat = _float("lon", p.get("lon")), _float("lat", p.get("lat"))
        if lon is None or lat is None:
            raise RequestError("lon and lat are required: pass e.g. lon=8.97&lat=45.03")
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise RequestError(f"lon {lon}, lat {lat} are not degrees: lon -180..180, lat -90..90")
        q = spec_of(p)
        ex.pixel(lon, lat)  # outside the store: 400 before any computation
        return ex.point(q, lon, lat)

    @app.post("/api/audio")
    async def audio(request: Request):
        """Upload one audio clip (multipart field ``file``): ``{"id": ...}`` for ``audio=ID``."""
        size = request.headers.get("content-length")
        if size is None:
            raise RequestError("the upload has no Content-Length: send it as a multipart form "
                               "(e.g. curl -F file=@clip.wav)", 411)
        try:
            size_n = int(size)
        except ValueError:
            raise RequestError("the Content-Length header is not a number", 400) from None
        if size_n > ex.max_upload_bytes + (64 << 10):
            raise RequestError(f"the upload is {size_n:,} bytes, over the limit of {ex.max_upload_bytes:,}: "
                               "send a shorter clip", 413)
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            raise RequestError("send the clip as multipart/form-data with one field 'file' "
                               "(e.g. curl -F file=@clip.wav)", 415)
        try:
            form = await request.form(max_files=1, max_fields=4)
        except Exception as exc:
            why = getattr(exc, "detail", None) or type(exc).__name__
            raise RequestError(f"the multipart form cannot be read ({why}): send exactly one "
                               "file in a field named 'file'", 400) from None
        files = [v for v in form.values() if hasattr(v, "read")]
        if len(files) != 1:
            raise RequestError(f"send exactly one file (got {len(files)}) in a field named 'file'", 400)
        f = files[0]
        data = await f.read(ex.max_upload_bytes + 1)
        await form.close()
        aid = await run_in_threadpool(ex.add_audio, data, f.filename)
        return {"id": aid, "name": ex.audio_name(aid)}

    app.include_router(qgis_router)  # /api/qgis-connection.xml ("Add to QGIS")

    @app.get("/api/export.tif")
    def export(request: Request):
        """The query's COG (bands per zoom, uncertainty, tags, NaN nodata) as a download."""
        p = request.query_params
        q = spec_of(p)
        score = (p.get("score") or "").lower() in ("1", "true", "yes")
        tmpdir = Path(tempfile.mkdtemp(prefix="psm-serve-export-"))
        label = ex.embedding(q)[0].label
        from ..outputs import safe_name

        name = safe_name(label)[:60] + (f"_m{q.month}" if q.month else "") + (f"_h{q.hour}" if q.hour is not None else "")
        path = tmpdir / f"{name}.tif"
        try:
            ex.export_cog(q, path, score=score)
        except BaseException:
            _rmtree(tmpdir)
            raise
        return FileResponse(path, media_type="image/tiff", filename=path.name,
                            background=BackgroundTask(_rmtree, tmpdir))

    return app


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Run ``app`` with uvicorn until Ctrl-C (a clean stop)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False,
                timeout_graceful_shutdown=5)


__all__ = ["create_app", "serve", "Explorer", "DEFAULT_BASEMAP"]
