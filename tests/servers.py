"""Real HTTP servers on 127.0.0.1 for tests: a tile server with injectable faults and a static
file server with HTTP Range support (for COGs read by GDAL /vsicurl/)."""
from __future__ import annotations

import io
import os
import re
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

import morecantile
import numpy as np
import rasterio
from PIL import Image
from rasterio.enums import Resampling
from rasterio.transform import from_bounds
from rasterio.warp import reproject

_TMS = morecantile.tms.get("WebMercatorQuad")


class _QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output clean
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "application/octet-stream",
              headers: dict | None = None, head: bool = False):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (port 0); a context manager."""

    def __init__(self, handler_cls, port: int = 0):
        self.requests: list[str] = []
        self._lock = threading.Lock()
        handler = type("Handler", (handler_cls,), {"server_ref": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def record(self, line: str) -> None:
        with self._lock:
            self.requests.append(line)

    def count(self, needle: str = "") -> int:
        with self._lock:
            return sum(needle in r for r in self.requests)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()

    def start(self):
        self._thread.start()
        return self

    def stop(self) -> None:
        if getattr(self, "_stopped", False):
            return
        self._stopped = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- tile server ------------------------------------------------------------------------
_ROUTES = [
    (re.compile(r"^/(?:(?P<s>[a-z])/)?xyz/(?P<z>\d+)/(?P<x>\d+)/(?P<y>\d+)\.png$"), "xyz"),
    (re.compile(r"^/(?:(?P<s>[a-z])/)?tms/(?P<z>\d+)/(?P<x>\d+)/(?P<y>\d+)\.png$"), "tms"),
    (re.compile(r"^/(?:(?P<s>[a-z])/)?wmts/(?P<set>\w+)/(?P<z>\d+)/(?P<y>\d+)/(?P<x>\d+)\.png$"),
     "wmts"),
]


class _TileHandler(_QuietHandler):
    server_ref: "TileServer"

    def do_GET(self):
        srv = self.server_ref
        srv.record(self.path)
        for rx, kind in _ROUTES:
            m = rx.match(self.path)
            if m:
                break
        else:
            return self._send(400, b"bad path")
        z, x, y = int(m["z"]), int(m["x"]), int(m["y"])
        if kind == "tms":
            y = 2**z - 1 - y
        srv.user_agents[self.headers.get("User-Agent", "")] += 1
        if m["s"]:
            srv.subdomains_seen[m["s"]] += 1
        fault = srv.faults.get((z, x, y))
        if fault is None and srv.fault_rule is not None:
            fault = srv.fault_rule(z, x, y)
        with srv._lock:
            srv.hits[(z, x, y)] += 1
            srv.times[(z, x, y)].append(time.monotonic())
            nth = srv.hits[(z, x, y)]
            srv.tile_requests += 1
            dying = srv.die_after is not None and srv.tile_requests > srv.die_after
            if dying and srv.killed_at is None:
                srv.killed_at = time.monotonic()
        if dying:  # the kill switch: no answer, and the server goes away
            threading.Thread(target=srv.stop, daemon=True).start()
            self.close_connection = True
            return
        if fault == "delay":
            time.sleep(srv.delay_s)
            fault = None
        if fault == "429":
            return self._send(429, b"slow down", headers={"Retry-After": "0"})
        if fault == "truncated":
            body = srv.render(z, x, y) or b""
            return self._send(200, body[:len(body) // 2], "image/png")
        if fault == "404":
            return self._send(404, b"not found")
        if fault == "500" or (fault == "500-once" and nth == 1):
            return self._send(500, b"boom")
        if fault == "429-once" and nth == 1:
            return self._send(429, b"slow down", headers={"Retry-After": "1"})
        if fault == "corrupt":
            return self._send(200, b"\x89PNG\r\n\x1a\n this is not an image", "image/png")
        body = srv.render(z, x, y)
        if body is None:
            return self._send(404, b"no tile")
        self._send(200, body, "image/png")


class TileServer(LocalServer):
    """Serves ``/xyz/{z}/{x}/{y}.png``, ``/tms/{z}/{x}/{-y}.png``, ``/wmts/{set}/{z}/{row}/{col}.png``
    (each optionally under a one-letter subdomain folder ``/a/...``) from ``render(z, x, y)``.

    ``faults`` maps XYZ tiles to ``"404"``, ``"500"``, ``"500-once"``, ``"429-once"`` (429 with
    ``Retry-After: 1`` on the first request), ``"429"`` (always, ``Retry-After: 0``),
    ``"corrupt"``, ``"truncated"`` (half of the real PNG) or ``"delay"`` (``delay_s`` late);
    ``fault_rule(z, x, y)`` gives the fault of tiles not in ``faults`` (deterministic per tile).
    ``die_after``: the kill switch, the server stops after that many tile requests (its
    ``time.monotonic()`` in ``killed_at``). Clear
    ``faults`` and ``fault_rule`` to heal it."""

    def __init__(self, render: Callable[[int, int, int], bytes | None],
                 faults: dict[tuple[int, int, int], str] | None = None,
                 fault_rule: Callable[[int, int, int], str | None] | None = None,
                 die_after: int | None = None, delay_s: float = 0.3, port: int = 0):
        self.render = render
        self.faults = dict(faults or {})
        self.fault_rule, self.die_after, self.delay_s = fault_rule, die_after, delay_s
        self.tile_requests = 0
        self.killed_at: float | None = None
        self.hits: Counter = Counter()
        self.times: defaultdict = defaultdict(list)
        self.subdomains_seen: Counter = Counter()
        self.user_agents: Counter = Counter()
        super().__init__(_TileHandler, port)

    def template(self, kind: str = "xyz", subdomain: bool = False) -> str:
        root = self.url + ("/{s}" if subdomain else "")
        return {
            "xyz": root + "/xyz/{z}/{x}/{y}.png",
            "tms": root + "/tms/{z}/{x}/{-y}.png",
            "wmts": root + "/wmts/{TileMatrixSet}/{TileMatrix}/{TileRow}/{TileCol}.png",
        }[kind]


class SceneTiles:
    """Renders Web Mercator PNG tiles (RGBA, transparent outside) from an RGB raster."""

    def __init__(self, path: str | os.PathLike, tile_size: int = 256):
        with rasterio.open(path) as src:
            self.data = src.read()
            self.transform, self.crs = src.transform, src.crs
            self.res = abs(src.transform.a)
        self.size = tile_size
        self._cache: dict[tuple[int, int, int], bytes] = {}
        self._lock = threading.Lock()

    def __call__(self, z: int, x: int, y: int) -> bytes:
        with self._lock:
            if (z, x, y) in self._cache:
                return self._cache[(z, x, y)]
        b = _TMS.xy_bounds(morecantile.Tile(x, y, z))
        n = self.size
        src = np.concatenate([self.data, np.full((1, *self.data.shape[1:]), 255, np.uint8)])
        out = np.zeros((4, n, n), np.uint8)
        down = (b.right - b.left) / n > self.res
        reproject(src, out, src_transform=self.transform, src_crs=self.crs,
                  dst_transform=from_bounds(b.left, b.bottom, b.right, b.top, n, n),
                  dst_crs="EPSG:3857", src_alpha=4, dst_alpha=4,
                  resampling=Resampling.average if down else Resampling.bilinear)
        buf = io.BytesIO()
        Image.fromarray(np.moveaxis(out, 0, -1), "RGBA").save(buf, format="PNG")
        body = buf.getvalue()
        with self._lock:
            self._cache[(z, x, y)] = body
        return body


# -- static files with Range -----------------------------------------------------------
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _StaticHandler(_QuietHandler):
    server_ref: "StaticServer"

    def _resolve(self) -> Path | None:
        rel = self.path.split("?", 1)[0].lstrip("/")
        p = (self.server_ref.root / rel).resolve()
        if self.server_ref.root not in p.parents and p != self.server_ref.root:
            return None
        return p if p.is_file() else None

    def do_HEAD(self):
        self._serve(head=True)

    def do_GET(self):
        self._serve(head=False)

    def _serve(self, head: bool):
        rng = self.headers.get("Range")
        self.server_ref.record(f"{self.command} {self.path} {rng or ''}".strip())
        p = self._resolve()
        if p is None:
            return self._send(404, b"not found", head=head)
        ctype = "application/json" if p.suffix == ".json" else "image/tiff"
        size = p.stat().st_size
        if rng:
            m = _RANGE.match(rng.strip())
            if not m or (not m[1] and not m[2]):
                return self._send(416, b"", headers={"Content-Range": f"bytes */{size}"},
                                  head=head)
            if m[1]:
                start = int(m[1])
                end = min(int(m[2]) if m[2] else size - 1, size - 1)
            else:  # suffix range
                start, end = max(0, size - int(m[2])), size - 1
            if start >= size or start > end:
                return self._send(416, b"", headers={"Content-Range": f"bytes */{size}"},
                                  head=head)
            with open(p, "rb") as fh:
                fh.seek(start)
                body = fh.read(end - start + 1)
            self.server_ref.range_requests += 1
            return self._send(206, body, ctype, head=head, headers={
                "Content-Range": f"bytes {start}-{end}/{size}", "Accept-Ranges": "bytes"})
        body = b"" if head else p.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        if not head:
            self.wfile.write(body)
            self.server_ref.full_gets += 1


class StaticServer(LocalServer):
    """Serves files under ``root`` with HEAD and single HTTP ``Range`` requests."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.range_requests = 0
        self.full_gets = 0
        super().__init__(_StaticHandler)


# -- synthetic scenes -------------------------------------------------------------------
def scene_pattern(height: int, width: int, seed: int = 0, cell: int = 16) -> np.ndarray:
    """A smooth random RGB pattern (features of about ``cell`` pixels), uint8 ``[3, H, W]``."""
    rng = np.random.default_rng(seed)
    out = np.empty((3, height, width), np.uint8)
    for b in range(3):
        coarse = rng.integers(0, 256, (height // cell + 2, width // cell + 2)).astype(np.uint8)
        img = Image.fromarray(coarse).resize((width + 2 * cell, height + 2 * cell),
                                             Image.Resampling.BICUBIC)
        out[b] = np.asarray(img)[cell:cell + height, cell:cell + width]
    return out


def write_scene(path, crs: str, left: float, top: float, res: float, height: int, width: int,
                seed: int = 0, nodata: int | None = None, driver: str = "GTiff",
                data: np.ndarray | None = None) -> np.ndarray:
    """Write an RGB uint8 raster with :func:`scene_pattern` (or ``data``); returns the array."""
    if data is None:
        data = scene_pattern(height, width, seed)
    profile = dict(driver=driver, width=width, height=height, count=3, dtype="uint8", crs=crs,
                   transform=rasterio.transform.from_origin(left, top, res, res))
    if nodata is not None:
        profile["nodata"] = nodata
    if driver == "COG":
        profile.update(blocksize=256, overview_resampling="average")
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return data


# -- a small STAC API ---------------------------------------------------------------------
class _StacApiHandler(_QuietHandler):
    server_ref: "StacApiServer"

    def do_GET(self):
        srv = self.server_ref
        srv.record(f"GET {self.path}")
        if self.path.split("?")[0] in ("/", ""):
            return self._json(srv.landing())
        if self.path.startswith("/conformance"):
            return self._json({"conformsTo": srv.conformance})
        self._send(404, b"not found")

    def do_POST(self):
        import json

        srv = self.server_ref
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        srv.record(f"POST {self.path}")
        srv.searches.append(body)
        if self.path.split("?")[0] != "/search":
            return self._send(404, b"not found")
        self._json({"type": "FeatureCollection", "features": srv.search(body), "links": []},
                   ctype="application/geo+json")

    def _json(self, obj, ctype="application/json"):
        import json

        self._send(200, json.dumps(obj).encode(), ctype)


class StacApiServer(LocalServer):
    """A minimal STAC API (landing page, conformance, POST /search with bbox, datetime,
    collections and an ``eo:cloud_cover`` ``lt`` query) over a list of item dicts."""

    conformance = [
        "https://api.stacspec.org/v1.0.0/core",
        "https://api.stacspec.org/v1.0.0/item-search",
        "https://api.stacspec.org/v1.0.0/item-search#query",
    ]

    def __init__(self, items: list[dict]):
        self.items = items
        self.searches: list[dict] = []
        super().__init__(_StacApiHandler)

    def landing(self) -> dict:
        return {
            "type": "Catalog", "stac_version": "1.0.0", "id": "api", "description": "test API",
            "conformsTo": self.conformance,
            "links": [
                {"rel": "self", "href": self.url + "/", "type": "application/json"},
                {"rel": "root", "href": self.url + "/", "type": "application/json"},
                {"rel": "search", "href": self.url + "/search", "method": "POST",
                 "type": "application/geo+json"},
            ],
        }

    def search(self, body: dict) -> list[dict]:
        from datetime import datetime

        def ts(text):
            return datetime.fromisoformat(text.replace("Z", "+00:00"))

        out = []
        w, s, e, n = body.get("bbox") or (-180, -90, 180, 90)
        start = end = None
        if body.get("datetime"):
            a, _, b = body["datetime"].partition("/")
            start = ts(a) if a not in ("", "..") else None
            end = ts(b) if b not in ("", "..") else None
        lt = ((body.get("query") or {}).get("eo:cloud_cover") or {}).get("lt")
        for item in self.items:
            iw, i_s, ie, i_n = item["bbox"]
            if iw > e or ie < w or i_s > n or i_n < s:
                continue
            if body.get("collections") and item.get("collection") not in body["collections"]:
                continue
            t = ts(item["properties"]["datetime"])
            if (start and t < start) or (end and t > end):
                continue
            if lt is not None and item["properties"].get("eo:cloud_cover", 100) >= lt:
                continue
            out.append(item)
        return out[: int(body.get("limit") or 1000)]


# -- a Google Drive stand-in ----------------------------------------------------------------------
class _DriveHandler(_QuietHandler):
    server_ref: "DriveServer"

    def do_GET(self):
        from urllib.parse import parse_qs, urlsplit
        import json

        srv = self.server_ref
        u = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(u.query).items()}
        srv.record(f"GET {self.path} {self.headers.get('Range', '')}".strip())
        if u.path.startswith("/drive/folders/"):
            fid = u.path.rsplit("/", 1)[1]
            if fid not in srv.folders:
                return self._send(404, b"no folder", "text/html")
            items = [[cid, [fid], name, mime] for cid, name, mime in srv.folders[fid]]
            js = json.dumps([items, None]).replace('"', "\\x22").replace("/", "\\/")
            page = (f"<html><head><title>folder - Google Drive</title></head><body><script>"
                    f"window['_DRIVE_ivd'] = '{js}';</script></body></html>")
            return self._send(200, page.encode(), "text/html; charset=utf-8")
        if u.path == "/uc":  # Drive's warning page, with the form to the content host
            if srv.quota_exceeded:
                return self._send(200, b"<html><head><title>Google Drive - Quota exceeded</title>"
                                  b"</head><body>Too many users</body></html>", "text/html")
            fid = q.get("id", "")
            page = (f"<html><head><title>Google Drive - Virus scan warning</title></head><body>"
                    f"<p>Google Drive can't scan this file for viruses.</p>"
                    f"<form id=\"download-form\" action=\"{srv.url}/download\" method=\"get\">"
                    f"<input type=\"submit\" value=\"Download anyway\"/>"
                    f"<input type=\"hidden\" name=\"id\" value=\"{fid}\">"
                    f"<input type=\"hidden\" name=\"export\" value=\"download\">"
                    f"<input type=\"hidden\" name=\"confirm\" value=\"t\">"
                    f"<input type=\"hidden\" name=\"uuid\" value=\"0f1e2d3c\"></form></body></html>")
            return self._send(200, page.encode(), "text/html; charset=utf-8")
        if u.path == "/download":
            if q.get("confirm") != "t" or q.get("uuid") != "0f1e2d3c" or q.get("id") not in srv.files:
                return self._send(400, b"bad request", "text/html")
            body = srv.files[q["id"]]
            start = 0
            m = _RANGE.match(self.headers.get("Range", "").strip())
            if m and m[1]:
                start = int(m[1])
                if start >= len(body):
                    return self._send(416, b"", headers={"Content-Range": f"bytes */{len(body)}"})
            part = body[start:]
            cut = srv.cut_after is not None and srv.downloads == 0
            srv.downloads += 1
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(part)))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            self.end_headers()
            if cut:  # the connection dies part way: the client keeps a partial file
                self.wfile.write(part[:srv.cut_after])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(part)
            return
        self._send(404, b"not found", "text/html")


class DriveServer(LocalServer):
    """Answers as Google Drive does for a shared folder: ``/drive/folders/ID`` pages embedding the
    listing (``_DRIVE_ivd``), ``/uc?export=download&id=ID`` with the "can't scan for viruses"
    page whose form leads to ``/download?id=..&export=download&confirm=t&uuid=..`` (the bytes,
    with Range). ``tree``: ``{"folder/file.ckpt": bytes}`` under ``root_id``; ``cut_after``: the
    first download stops after that many bytes; ``quota_exceeded``: the warning page has no form."""

    def __init__(self, root_id: str, tree: dict[str, bytes], cut_after: int | None = None):
        self.folders: dict[str, list] = {root_id: []}
        self.files: dict[str, bytes] = {}
        self.cut_after, self.downloads, self.quota_exceeded = cut_after, 0, False
        ids: dict[str, str] = {"": root_id}
        for path, data in tree.items():
            parent = ""
            for i, name in enumerate(path.split("/")):
                key = f"{parent}/{name}".lstrip("/")
                last = i == len(path.split("/")) - 1
                if key not in ids:
                    nid = f"id{len(ids):04d}x"
                    ids[key] = nid
                    mime = "application/octet-stream" if last else "application/vnd.google-apps.folder"
                    self.folders[ids[parent]].append((nid, name, mime))
                    if last:
                        self.files[nid] = data
                    else:
                        self.folders[nid] = []
                parent = key
        super().__init__(_DriveHandler)
