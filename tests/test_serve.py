"""``psm-map serve STORE``: the explorer as a real uvicorn subprocess on a free 127.0.0.1 port,
against a store built by a real small ``psm-map`` run (zoom levels 1 and 3, 12 x 12 px).

Every endpoint; the equalities with ``psm-map query`` (point values and exported bands equal the
query's COG); every bad request (4xx JSON ``{"error": ...}``, never a traceback); 8 parallel
clients on 3 new queries (each computed once); the page in headless chromium.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import morecantile
import numpy as np
import pytest
import rasterio
from PIL import Image
from pyproj import Transformer

from psm_mapping.cli import main

from servers import write_scene
from test_map_e2e import LEFT, STRIDE, TOP, UTM, make_inputs, read_cog, write_chirp, write_region

REPO = Path(__file__).resolve().parents[1]
TMS = morecantile.tms.get("WebMercatorQuad")
# a 12 km scene at 30 m: zoom-3 chips (7.68 km) fit around the region at its centre
SCENE_RES, SCENE_PX = 30.0, 400
CENTRE = (LEFT + SCENE_RES * SCENE_PX / 2, TOP - SCENE_RES * SCENE_PX / 2)
ZOOMS = (1, 3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    e["OMP_NUM_THREADS"] = "2"
    return e


class Server:
    """``psm-map serve`` as a subprocess; ``url``; stopped with SIGINT (Ctrl-C)."""

    def __init__(self, args: list[str], cwd: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "psm_mapping.cli", "serve", *args,
                                      "--port", str(self.port)], stdout=self._out,
                                     stderr=subprocess.STDOUT, env=env(), cwd=cwd)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/api/info", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not start: {self.log.read_text()[-3000:]}")

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=120, **kw)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_ckpt, tokenizer_dir):
    """A store from a real `psm-map` run (zoom 1 and 3, 12 x 12 px, a metadata checkpoint), and
    the COGs `psm-map query` writes from it (the references of the equalities)."""
    root = tmp_path_factory.mktemp("serve")
    inp = make_inputs(root / "inputs", tiny_ckpt, tokenizer_dir)
    write_scene(inp["scene"].with_name("scene30.tif"), UTM, LEFT, TOP, SCENE_RES, SCENE_PX, SCENE_PX, seed=5)
    inp["scene"] = inp["scene"].with_name("scene30.tif")
    inp["square"] = write_region(root / "inputs" / "sq.geojson", half_m=240.0, shape="square", center=CENTRE)
    common = ["--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]),
              "--tokenizer", str(inp["tokenizer"]), "--device", "cpu", "--quiet", "--no-previews"]
    out = root / "run" / "map.tif"
    out.parent.mkdir()
    assert main([str(inp["square"]), "--imagery", str(inp["scene"]), "--zoom-level", "1,3",
                 "--stride", f"{STRIDE:g}", "--query", "birds", "--out", str(out), *common]) == 0
    (store,) = (out.parent / "psm-store").glob("*.zarr")
    refs = {}
    for name, extra in {"birds": ["--query", "birds"], "birds_m5": ["--query", "birds", "--month", "5"],
                        "chirp": ["--audio", str(inp["audio"])],
                        "birds_score": ["--query", "birds", "--score"]}.items():
        refs[name] = root / f"q_{name}.tif"
        assert main(["query", str(store), *extra, "--out", str(refs[name]), *common]) == 0
    return {"root": root, "inp": inp, "store": store, "refs": refs,
            "serve_args": [str(store), *common[:6], "--basemap", "none"]}


@pytest.fixture(scope="module")
def server(built):
    s = Server(built["serve_args"], built["root"])
    yield s
    assert s.stop() == 0, s.log.read_text()[-2000:]


def centres(store_info: dict) -> list[tuple[int, int, float, float]]:
    """(row, col, lon, lat) of every store pixel's centre."""
    x0, y0 = store_info["bounds"][0], store_info["bounds"][3]
    px = store_info["pixel_size_m"]
    tr = Transformer.from_crs(store_info["crs"], "EPSG:4326", always_xy=True)
    out = []
    for r in range(store_info["height"]):
        for c in range(store_info["width"]):
            lon, lat = tr.transform(x0 + (c + 0.5) * px, y0 - (r + 0.5) * px)
            out.append((r, c, lon, lat))
    return out


def bands_by_description(path) -> dict[str, np.ndarray]:
    with rasterio.open(path) as src:
        return {d: src.read(i) for i, d in enumerate(src.descriptions, 1)}


def rgba(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


# ---------------------------------------------------------------------------- unit: caches
def test_byte_lru_evicts_by_bytes_and_once_computes_once():
    from psm_mapping.serve.cache import ByteLRU, Once

    c = ByteLRU(100)
    c.put("a", b"x" * 40)
    c.put("b", b"x" * 40)
    assert c.get("a") is not None  # a is now the most recent
    c.put("c", b"x" * 40)  # evicts b, the least recent
    assert "b" not in c and "a" in c and "c" in c and c.bytes == 80
    c.put("huge", b"x" * 101)  # larger than the budget: not kept
    assert "huge" not in c and c.bytes == 80
    once, calls = Once(), []
    lock = threading.Lock()

    def slow():
        with lock:
            calls.append(1)
        time.sleep(0.2)
        return np.zeros(3)

    cache = ByteLRU(1 << 20)
    with ThreadPoolExecutor(8) as pool:
        res = list(pool.map(lambda _: once.get_or_compute(cache, "k", slow), range(8)))
    assert len(calls) == 1 and once.computed["k"] == 1 and all(r is res[0] for r in res)


# ---------------------------------------------------------------------------- endpoints
def test_info(server, built):
    info = server.get("/api/info").json()
    assert info["zoom_levels"] == list(ZOOMS) and info["levels"] == [1, 3, "mean"]
    assert info["crs"] == UTM and info["width"] == info["height"] == 12 and info["pixels"] == 144
    assert info["valid_pixels"] == 144 and info["metadata_adjustable"] is True
    assert info["checkpoint"] == Path(built["inp"]["ckpt"]).name and len(info["checkpoint_sha256"]) == 64
    assert info["store_key"] == built["store"].stem and info["means_in_memory"] is False
    assert info["tile_formats"] == ["png", "tif", "npy"] and 64 << 20 <= info["cache_budget"] <= info["memory_limit"]
    w, s, e, n = info["lonlat_bounds"]
    lon, lat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(*CENTRE)
    assert w < lon < e and s < lat < n and e - w < 0.01
    assert info["basemap"] is None  # --basemap none
    import zarr

    prov = dict(zarr.open_group(str(built["store"]), mode="r").attrs.get("provenance", {}))
    assert info["untrained"] is (prov.get("untrained_weights") == "true")
    fp = server.get("/api/footprint.geojson")
    assert fp.status_code == 200 and fp.headers["content-type"].startswith("application/geo+json")
    (feat,) = fp.json()["features"]
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    assert abs(ring[:, 0].min() - w) < 1e-4 and abs(ring[:, 1].max() - n) < 1e-4


def test_query_summary_and_ranges(server, built):
    r = server.get("/api/query", params={"text": "birds"})
    assert r.status_code == 200, r.text
    d = r.json()
    want = bands_by_description(built["refs"]["birds"])
    for entry, z in zip(d["zoom_levels"], ZOOMS):
        sim = next(v for k, v in want.items() if k.startswith("similarity") and k.endswith(f"zoom {z}"))
        assert entry["similarity"]["min"] == pytest.approx(float(np.nanmin(sim)), abs=1e-5)
        assert entry["similarity"]["max"] == pytest.approx(float(np.nanmax(sim)), abs=1e-5)
        assert entry["valid_pixels"] == int(np.isfinite(sim).sum()) == 144
    assert d["zoom_levels"][-1]["zoom_level"] == "mean"
    ranges = server.get("/api/info").json()["ranges"]
    assert any(x["query"] == "birds" and x["zoom_level"] == 1 for x in ranges)


def test_point_equals_psm_map_query(server, built):
    info = server.get("/api/info").json()
    want = bands_by_description(built["refs"]["birds"])
    score = bands_by_description(built["refs"]["birds_score"])
    sims = {z: next(v for k, v in want.items() if k.startswith("similarity") and k.endswith(f"zoom {z}")) for z in ZOOMS}
    uncs = {z: next(v for k, v in want.items() if k.startswith("image embedding uncertainty") and k.endswith(f"zoom {z}"))
            for z in ZOOMS}
    scores = {z: next(v for k, v in score.items() if k.startswith("0-1 score") and k.endswith(f"zoom {z}")) for z in ZOOMS}
    pts = centres(info)
    for r, c, lon, lat in pts[::7] + [pts[-1]]:
        p = server.get("/api/point", params={"text": "birds", "lon": lon, "lat": lat}).json()
        assert (p["row"], p["col"]) == (r, c)
        assert p["pixel_centre"]["lon"] == pytest.approx(lon, abs=1e-9)
        for z in ZOOMS:
            assert p["similarity"][str(z)] == pytest.approx(float(sims[z][r, c]), abs=2e-6)
            assert p["uncertainty"][str(z)] == pytest.approx(float(uncs[z][r, c]), abs=1e-6)
            assert p["score"][str(z)] == pytest.approx(float(scores[z][r, c]), abs=1e-4)
        assert p["similarity"]["mean"] == pytest.approx(float(np.mean([sims[z][r, c] for z in ZOOMS])), abs=2e-6)


def test_export_equals_psm_map_query(server, built, tmp_path):
    from rio_cogeo.cogeo import cog_validate

    r = server.get("/api/export.tif", params={"text": "birds"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/tiff"
    assert 'filename="birds.tif"' in r.headers["content-disposition"]
    got = tmp_path / "export.tif"
    got.write_bytes(r.content)
    assert cog_validate(str(got))[0]
    a, tags_a, desc_a, meta_a = read_cog(got)
    b, tags_b, desc_b, meta_b = read_cog(built["refs"]["birds"])
    assert desc_a == desc_b and a.shape == b.shape == (4, 12, 12)  # 2 similarity + 2 uncertainty
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert meta_a["crs"] == meta_b["crs"] and meta_a["transform"] == meta_b["transform"]
    assert np.isnan(meta_a["nodata"]) and np.isnan(meta_b["nodata"])
    tags_a.pop("created"), tags_b.pop("created")
    assert tags_a == tags_b
    with rasterio.open(got) as x, rasterio.open(built["refs"]["birds"]) as y:
        assert [x.tags(i) for i in range(1, 5)] == [y.tags(i) for i in range(1, 5)]
    # the month re-runs fusion: the export equals `psm-map query --month 5`
    r = server.get("/api/export.tif", params={"text": "birds", "month": "5"})
    (tmp_path / "m5.tif").write_bytes(r.content)
    a5, tags5, _, _ = read_cog(tmp_path / "m5.tif")
    b5, tagsb5, _, _ = read_cog(built["refs"]["birds_m5"])
    np.testing.assert_allclose(a5, b5, rtol=0, atol=2e-5)
    assert tags5["metadata"] == tagsb5["metadata"] and "month=5" in tags5["metadata"]
    assert np.abs(a5[0] - a[0]).max() > 1e-6  # month 5 is another map


def test_tiles(server, built):
    info = server.get("/api/info").json()
    summary = server.get("/api/query", params={"text": "birds"}).json()
    lo, hi = summary["zoom_levels"][0]["similarity"]["min"], summary["zoom_levels"][0]["similarity"]["max"]
    ref = bands_by_description(built["refs"]["birds"])
    sim = next(v for k, v in ref.items() if k.startswith("similarity") and k.endswith("zoom 1"))
    lon, lat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(*CENTRE)
    z = 16
    t = TMS.tile(lon, lat, z)
    r = server.get(f"/tiles/{z}/{t.x}/{t.y}.png", params={"text": "birds", "zoom_level": "1"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = rgba(r.content)
    assert img.shape == (256, 256, 4) and (img[..., 3] == 255).sum() > 1000
    # pixel colours are the viridis colour of the store value there (nearest resampling)
    from rio_tiler.colormap import cmap

    vir = cmap.get("viridis")
    b = TMS.xy_bounds(t)
    to_merc = Transformer.from_crs("EPSG:4326", "EPSG:3857", always_xy=True)
    checked = 0
    for r_, c_, plon, plat in centres(info):
        mx, my = to_merc.transform(plon, plat)
        if not (b.left < mx < b.right and b.bottom < my < b.top):
            continue
        col = int((mx - b.left) / (b.right - b.left) * 256)
        row = int((b.top - my) / (b.top - b.bottom) * 256)
        idx = int(np.clip((sim[r_, c_] - lo) / (hi - lo), 0, 1) * 255)
        got = img[row, col]
        assert got[3] == 255
        assert np.abs(got[:3].astype(int) - np.asarray(vir[idx][:3])).max() <= 12, (r_, c_, got, vir[idx])
        checked += 1
    assert checked >= 10
    # the same URL again is the same tile, from the cache
    assert server.get(f"/tiles/{z}/{t.x}/{t.y}.png", params={"text": "birds", "zoom_level": "1"}).content == r.content
    # other bands, levels, colour maps and ranges render too and differ
    variants = [{"band": "score"}, {"band": "uncertainty"}, {"zoom_level": "3"}, {"zoom_level": "mean"},
                {"colormap": "magma"}, {"vmin": str(lo), "vmax": str(lo + (hi - lo) / 2)}, {"month": "5"}]
    seen = {r.content}
    for v in variants:
        rv = server.get(f"/tiles/{z}/{t.x}/{t.y}.png", params={"text": "birds", "zoom_level": "1", **v})
        assert rv.status_code == 200, (v, rv.text)
        assert (rgba(rv.content)[..., 3] == 255).sum() > 1000, v
        seen.add(rv.content)
    assert len(seen) >= len(variants)  # score with default range == similarity's colours
    # uncertainty needs no query
    assert server.get(f"/tiles/{z}/{t.x}/{t.y}.png", params={"band": "uncertainty"}).status_code == 200
    # outside the store: a fully transparent 256 px tile, never an error
    far = TMS.tile(lon + 1.0, lat + 1.0, z)
    rf = server.get(f"/tiles/{z}/{far.x}/{far.y}.png", params={"text": "birds"})
    assert rf.status_code == 200 and rgba(rf.content).shape == (256, 256, 4)
    assert rgba(rf.content)[..., 3].max() == 0
    # world view
    r0 = server.get("/tiles/0/0/0.png", params={"text": "birds"})
    assert r0.status_code == 200 and rgba(r0.content).shape == (256, 256, 4)
    tj = server.get("/tilejson.json", params={"text": "birds", "zoom_level": "3"}).json()
    assert tj["tiles"][0].startswith(server.url + "/tiles/{z}/{x}/{y}.png?") and "zoom_level=3" in tj["tiles"][0]
    assert server.get("/api/legend.png", params={"colormap": "magma"}).headers["content-type"] == "image/png"


def test_audio_upload_query_equals_psm_map_query(server, built):
    chirp = built["inp"]["audio"]
    r = httpx.post(server.url + "/api/audio", files={"file": ("chirp.wav", chirp.read_bytes(), "audio/wav")},
                   timeout=120)
    assert r.status_code == 200, r.text
    aid = r.json()["id"]
    assert r.json()["name"] == "chirp.wav"
    info = server.get("/api/info").json()
    ref = bands_by_description(built["refs"]["chirp"])
    sim1 = next(v for k, v in ref.items() if k.startswith("similarity") and k.endswith("zoom 1"))
    for rr, c, lon, lat in centres(info)[::11]:
        p = server.get("/api/point", params={"audio": aid, "lon": lon, "lat": lat}).json()
        assert p["query"] == "chirp.wav"
        assert p["similarity"]["1"] == pytest.approx(float(sim1[rr, c]), abs=2e-6)
    both = server.get("/api/query", params={"audio": aid, "text": "birds"}).json()
    assert both["query"] == "birds + chirp.wav"


BAD = [
    ("/api/query", {}, 400, "no query given"),
    ("/api/query", {"text": "   "}, 400, "no query given"),
    ("/tiles/16/1/1.png", {}, 400, "no query given"),
    ("/tiles/16/1/1.png", {"text": "birds", "zoom_level": "2"}, 400, "zoom_level '2' is not in this store"),
    ("/tiles/16/1/1.png", {"text": "birds", "zoom_level": "abc"}, 400, "use one of 1, 3 or mean"),
    ("/api/query", {"text": "birds", "month": "13"}, 400, "month 13 is out of range"),
    ("/api/query", {"text": "birds", "month": "may"}, 400, "month 'may' is not a whole number"),
    ("/api/query", {"text": "birds", "hour": "24"}, 400, "hour 24 is out of range"),
    ("/api/point", {"text": "birds", "lon": "0", "lat": "0"}, 400, "outside the store"),
    ("/api/point", {"text": "birds", "lon": "500", "lat": "0"}, 400, "not degrees"),
    ("/api/point", {"text": "birds"}, 400, "lon and lat are required"),
    ("/api/point", {"text": "birds", "lon": "nan", "lat": "1"}, 400, "not a finite number"),
    ("/api/query", {"audio": "0123456789abcdef"}, 404, "unknown audio id"),
    ("/tiles/30/0/0.png", {"text": "birds"}, 400, "tile z 30 is out of range"),
    ("/tiles/3/8/0.png", {"text": "birds"}, 400, "tile x 8 is out of range 0..7"),
    ("/tiles/3/a/0.png", {"text": "birds"}, 400, "not a whole number"),
    ("/tiles/3/1/1.png", {"text": "birds", "band": "rgb"}, 400, "band 'rgb' is unknown"),
    ("/tiles/3/1/1.png", {"text": "birds", "colormap": "nope"}, 400, "colormap 'nope' is unknown"),
    ("/tiles/3/1/1.png", {"text": "birds", "vmin": "x"}, 400, "vmin 'x' is not a finite number"),
    ("/api/export.tif", {}, 400, "no query given"),
    ("/api/export.tif", {"text": "birds", "month": "0"}, 400, "month 0 is out of range"),
    ("/nothing/here", {}, 404, "no such page"),
    ("/static/secret.py", {}, 404, "no such file"),
    ("/static/..%2F..%2Fstore.py", {}, 404, "no such"),
    ("/static/%2e%2e%2f%2e%2e%2fpyproject.toml", {}, 404, "no such"),
    ("/static/..%5C..%5Cpyproject.toml", {}, 404, "no such"),
]


@pytest.mark.parametrize("path,params,status,message", BAD, ids=[f"{b[0]}{b[1]}" for b in BAD])
def test_bad_requests_get_json_4xx(server, path, params, status, message):
    # raw paths: httpx must not normalise the dot segments away
    r = httpx.get(server.url + path, params=params, timeout=120)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"} and message in body["error"], body
    assert "Traceback" not in r.text and "File \"" not in r.text


def test_bad_uploads(built, tmp_path):
    """A too-large upload (server started with --max-upload 1 MB), a non-audio upload, two files,
    no multipart, a wrong method: 4xx JSON."""
    s = Server([*built["serve_args"], "--max-upload", "1"], tmp_path)
    try:
        post = lambda **kw: httpx.post(s.url + "/api/audio", timeout=120, **kw)  # noqa: E731
        big = write_chirp(tmp_path / "long.wav", seconds=20.0)  # 20 s at 32 kHz float: 2.5 MB
        cases = [
            (post(files={"file": ("long.wav", big.read_bytes(), "audio/wav")}), 413, "over the limit"),
            (post(files={"file": ("notes.wav", b"this is not audio" * 100, "audio/wav")}), 415, "not an audio clip"),
            (post(files={"file": ("x.png", (REPO / "psm_mapping/serve/static/app.css").read_bytes(), "image/png")}),
             415, "not an audio clip"),
            (post(files=[("file", ("a.wav", b"1", "audio/wav")), ("file2", ("b.wav", b"2", "audio/wav"))]), 400,
             "exactly one file"),
            (post(files={"name": (None, "x")}), 400, "exactly one file"),
            (post(data={"name": "x"}), 415, "multipart/form-data"),
            (post(content=b"raw", headers={"content-type": "audio/wav"}), 415, "multipart/form-data"),
            (post(files={"file": ("e.wav", b"", "audio/wav")}), 400, "empty"),
            (httpx.post(s.url + "/api/info", timeout=30), 405, "not allowed"),
        ]
        for r, status, msg in cases:
            assert r.status_code == status, (msg, r.text)
            assert msg in r.json()["error"] and "Traceback" not in r.text
        ok = post(files={"file": ("chirp.wav", built["inp"]["audio"].read_bytes(), "audio/wav")})
        assert ok.status_code == 200
    finally:
        assert s.stop() == 0


def test_concurrent_clients_compute_each_query_once(built, tmp_path):
    """8 parallel clients requesting tiles of 3 new queries: every answer equals the tile fetched
    alone afterwards, and each query's raster and embedding were computed exactly once."""
    s = Server(built["serve_args"], tmp_path)
    try:
        lon, lat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(*CENTRE)
        texts = ["rain on a roof", "traffic noise", "waves crashing"]
        tiles = [TMS.tile(lon + dx, lat + dy, 17) for dx in (-0.001, 0.001) for dy in (-0.001, 0.001)]
        jobs = [(t, tile) for _ in range(2) for t in texts for tile in tiles]  # 24 requests
        barrier = threading.Barrier(8)

        def client(i):
            barrier.wait()
            out = []
            for t, tile in jobs[i::8]:
                r = httpx.get(f"{s.url}/tiles/17/{tile.x}/{tile.y}.png", params={"text": t}, timeout=120)
                out.append((t, tile, r.status_code, r.content))
            return out

        with ThreadPoolExecutor(8) as pool:
            results = [x for part in pool.map(client, range(8)) for x in part]
        assert len(results) == 24 and all(code == 200 for _, _, code, _ in results)
        stats = s.get("/api/stats").json()
        computed = {c["key"]: c["times"] for c in stats["computed"]}
        for t in texts:  # the 12 px store: one chunk of full-resolution cells per query and zoom
            assert computed[repr(("similarity", (t, None), (None, None), 0, 0, 0, 0))] == 1
            assert computed[repr(("embedding", (t, None)))] == 1
        assert all(v == 1 for v in computed.values()), computed
        # every answer is right: equal to the tile asked alone now, and to the colour of its values
        for t, tile, _, png in results:
            assert s.get(f"/tiles/17/{tile.x}/{tile.y}.png", params={"text": t}).content == png
        a = {t: next(p for tt, _, _, p in results if tt == t) for t in texts}
        assert len(set(a.values())) == 3  # three different maps
    finally:
        assert s.stop() == 0


def test_caches_are_byte_bounded_and_answers_do_not_depend_on_them(built):
    """A tiny memory limit (caches at their 64 MB floor, split by bytes) and a large one give the
    same tiles, values and ranges; the explorer holds no store arrays, only its caches."""
    from psm_mapping.serve.engine import Explorer

    inp = built["inp"]
    kw = dict(checkpoint=str(inp["ckpt"]), clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]))
    small = Explorer(str(built["store"]), memory_limit=1e3, **kw)
    large = Explorer(str(built["store"]), memory_limit=8e9, **kw)
    try:
        assert small.cache_budget == 64 << 20 and large.cache_budget > 1 << 30
        caches = (small.planes, small.chunks, small.tiles, small.embeddings)
        assert sum(c.max_bytes for c in caches) <= (64 << 20) + (8 << 20)
        lon, lat = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True).transform(*CENTRE)
        t = TMS.tile(lon, lat, 16)
        for ex in (small, large):
            assert not ex.info()["means_in_memory"]
        for spec in ("birds", "traffic"):
            qa, qb = small.query_spec(spec), large.query_spec(spec, month=None)
            for zi in [*range(len(ZOOMS)), "mean"]:
                a = small.tile_values(qa, zi, "similarity", 16, t.x, t.y)
                b = large.tile_values(qb, zi, "similarity", 16, t.x, t.y)
                np.testing.assert_array_equal(a, b)
                assert np.isfinite(a).sum() > 1000
                assert small.value_range(qa, zi) == large.value_range(qb, zi)
            assert small.point(qa, lon, lat) == large.point(qb, lon, lat)
        assert small.held_bytes <= 64 << 20
    finally:
        small.close()
        large.close()


def test_fault_pixels_are_holes_in_the_explorer(built, tmp_path):
    """Pixels the store marks FAULT (a failed imagery read) or PENDING are NaN in every value the
    explorer computes (stored means, re-fused for a month; any cache size), and only those."""
    import shutil

    import zarr

    from psm_mapping.serve.engine import Explorer
    from psm_mapping.store import FAULT, PENDING

    store = tmp_path / built["store"].name
    shutil.copytree(built["store"], store)
    st = zarr.open_group(str(store), mode="r+")["status"]
    status = np.asarray(st[:])
    status[0, 2, 3] = FAULT
    status[1, 5, 6] = PENDING
    st[:] = status
    inp = built["inp"]
    kw = dict(checkpoint=str(inp["ckpt"]), clap_config=str(inp["clap"]), tokenizer=str(inp["tokenizer"]))
    for limit in (1e9, 1e3):
        ex = Explorer(str(store), memory_limit=limit, **kw)
        try:
            for spec in (ex.query_spec("birds"), ex.query_spec("birds", month=5)):
                for zi in range(len(ZOOMS)):
                    a = ex.cells(spec, zi, 0)  # the full-resolution cells of the whole (12 px) store
                    assert a.shape == (12, 12)
                    hole = ~np.isfinite(a)
                    expect = np.zeros_like(hole)
                    expect[(2, 5)[zi], (3, 6)[zi]] = True
                    assert (hole == expect).all(), (limit, zi, np.argwhere(hole))
        finally:
            ex.close()


# ---------------------------------------------------------------------------- the command
def test_command_binds_localhost_prints_url_and_stops_on_ctrl_c(built, tmp_path):
    import psutil

    s = Server(built["serve_args"], tmp_path)
    try:
        conns = [c for c in psutil.Process(s.proc.pid).net_connections(kind="tcp") if c.status == "LISTEN"]
        assert conns and all(c.laddr.ip == "127.0.0.1" for c in conns), conns
        assert f"serving on http://127.0.0.1:{s.port}/" in s.log.read_text()
    finally:
        code = s.stop()
    assert code == 0 and "psm-map serve: stopped" in s.log.read_text()
    assert "Traceback" not in s.log.read_text()


@pytest.mark.parametrize("args,message", [
    ([], "the following arguments are required: store"),
    (["{store}", "--port", "70000"], "--port 70000 is out of range"),
    (["{store}", "--memory-limit", "-1"], "--memory-limit '-1' must be positive"),
    (["/no/such/store.zarr"], "no embedding store at /no/such/store.zarr"),
    (["{root}"], "no embedding store at"),
    (["{store}", "--checkpoint", "/no/such.ckpt"], "such.ckpt"),
])
def test_command_bad_input_is_one_line_exit_2(built, args, message):
    args = [a.format(store=built["store"], root=built["root"]) for a in args]
    p = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "serve", *args], capture_output=True,
                       text=True, env=env(), timeout=120)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psm-map: error:") and message.split("{")[0] in lines[0], p.stderr


def test_command_busy_port_is_one_line_exit_2(built):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "serve", *built["serve_args"],
                            "--port", str(port)], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in p.stderr


# ---------------------------------------------------------------------------- the page, in a real browser
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def browser():
    selenium = pytest.importorskip("selenium")  # noqa: F841 (the dev extra installs it)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary, driver = _chromium(), shutil.which("chromedriver")
    if not binary or not driver:
        pytest.skip("Debian's chromium and chromium-driver are not installed (.ci/run installs them "
                    "with apt-get): `apt-get install chromium chromium-driver`")
    o = Options()
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
              "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
              "--disable-extensions", "--no-first-run"):
        o.add_argument(a)
    o.binary_location = binary
    o.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    d = webdriver.Chrome(service=Service(driver), options=o)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


def _wait_state(d, states, timeout=90):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, timeout, poll_frequency=0.2).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") in states)
    return d.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def _map_pixels(d, path: Path) -> np.ndarray:
    d.save_screenshot(str(path))
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return img[:, 330:]  # right of the 320 px panel


def _coloured(px: np.ndarray) -> int:
    """Pixels of the overlay: saturated colours (background grey, outline red excluded)."""
    r, g, b = px[..., 0], px[..., 1], px[..., 2]
    sat = px.max(-1) - px.min(-1)
    red = (r > g + 40) & (r > b + 40)  # the outline, antialiased
    return int(((sat > 40) & ~red).sum())


def test_page_in_headless_chromium(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(server.url + "/")
    assert _wait_state(d, ("ready", "error")) == "ready"
    before = _map_pixels(d, tmp_path / "0-loaded.png")
    assert _coloured(before) < 200  # no overlay yet: grey background and the red outline
    assert ((before[..., 0] > before[..., 1] + 40) & (before[..., 0] > before[..., 2] + 40)).sum() > 500  # the outline
    # typing a query loads overlay tiles
    d.find_element(By.ID, "text").send_keys("birds", Keys.ENTER)
    assert _wait_state(d, ("tiles-loaded", "error")) == "tiles-loaded", d.find_element(By.ID, "status").text
    shot = tmp_path / "1-birds.png"
    after = _map_pixels(d, shot)
    assert _coloured(after) > 20000, "no overlay pixels in the screenshot"
    status = d.find_element(By.ID, "status").text
    assert "birds" in status and "ready in" in status
    assert "birds" in d.find_element(By.ID, "recent").text
    assert d.find_element(By.ID, "xyz-url").get_attribute("value").startswith(server.url + "/tiles/{z}/{x}/{y}.png?text=birds")
    assert "/api/export.tif?text=birds" in d.find_element(By.ID, "download").get_attribute("href")
    qgis_xml = d.find_element(By.ID, "qgis-xml").get_attribute("href")  # "Add to QGIS" (tests/test_qgis.py)
    assert qgis_xml.startswith(server.url + "/api/qgis-connection.xml?text=birds")
    assert server.get(qgis_xml[len(server.url):]).status_code == 200
    # a click shows the point values, equal to /api/point
    canvas = d.find_element(By.CSS_SELECTOR, "#map canvas")
    d.execute_script("""const m = window.psm.map, c = m.getCenter(); window._clickAt = [c.lng, c.lat];""")
    from selenium.webdriver import ActionChains

    ActionChains(d).move_to_element(canvas).click().perform()
    popup = WebDriverWait(d, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".maplibregl-popup .popup table"))
    text = popup[0].text
    lnglat = d.execute_script("return window.psm.map.getCenter().toArray()")
    p = server.get("/api/point", params={"text": "birds", "lon": f"{lnglat[0]:.7f}", "lat": f"{lnglat[1]:.7f}"}).json()
    assert "z1" in text and "z3" in text and "mean" in text
    v = p["similarity"]["1"]
    assert f"{v:.4f}" in text or f"{v:.2f}" in text, (text, p)
    d.find_element(By.CSS_SELECTOR, ".maplibregl-popup-close-button").click()
    # the month slider changes the tiles (fusion re-runs with month 6); the panel then says that
    # coarse zooms of a re-fused view are approximate (and not before)
    assert not d.find_element(By.ID, "approximate").is_displayed()
    slider = d.find_element(By.ID, "month")
    old_url = d.find_element(By.TAG_NAME, "body").get_attribute("data-tiles")
    slider.click()  # the thumb sits at 0: a click at the centre jumps to about 6
    WebDriverWait(d, 90, poll_frequency=0.2).until(
        lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-tiles") != old_url
        and d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "tiles-loaded")
    new_url = d.find_element(By.TAG_NAME, "body").get_attribute("data-tiles")
    month = int(slider.get_attribute("value"))
    assert 1 <= month <= 12 and f"month={month}" in new_url
    assert d.find_element(By.ID, "approximate").is_displayed()
    assert "Approximate" in d.find_element(By.ID, "approximate").text
    month_shot = tmp_path / "2-month.png"
    moved = _map_pixels(d, month_shot)
    assert _coloured(moved) > 20000
    assert np.abs(moved - after).max(-1).astype(bool).sum() > 2000, "the month changed no tile pixel"
    # no console errors, all along
    logs = d.get_log("browser")
    errors = [e for e in logs if e["level"] == "SEVERE"]
    assert not errors, errors
    keep = os.environ.get("PSM_SCREENSHOT_DIR")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for f in (shot, month_shot):
            shutil.copy(f, Path(keep) / f.name)


def test_page_starts_at_the_stored_setting_and_keeps_the_view_in_its_address(built, browser, tmp_path):
    """A store fused at month 5, 14:00: the sliders start there (answered from the stored means, no
    "approximate" note); a link with ?text= shows that query's map at its zoom; the page writes its
    view into its address; month=0 / hour=-1 in a link are "any" (a re-fused, approximate view)."""
    import shutil

    import zarr

    from selenium.webdriver.common.by import By

    store = tmp_path / built["store"].name
    shutil.copytree(built["store"], store)
    g = zarr.open_group(str(store), mode="r+")
    md = dict(g.attrs["metadata_options"])
    assert md["month"] is None and md["hour"] is None  # the fixture's run: any month and hour
    md.update(month=5, hour=14)
    g.attrs["metadata_options"] = md
    s = Server([str(store), *built["serve_args"][1:]], tmp_path)
    try:
        d = browser
        d.get(s.url + "/?text=birds&zoom_level=3")
        assert _wait_state(d, ("tiles-loaded", "error")) == "tiles-loaded", d.find_element(By.ID, "status").text
        tiles = d.find_element(By.TAG_NAME, "body").get_attribute("data-tiles")
        assert "text=birds" in tiles and "month=5" in tiles and "hour=14" in tiles and "zoom_level=3" in tiles
        assert d.find_element(By.ID, "text").get_attribute("value") == "birds"
        assert d.find_element(By.ID, "month-out").text == "5 (stored)"
        assert d.find_element(By.ID, "hour-out").text == "14:00 (stored)"
        assert not d.find_element(By.ID, "approximate").is_displayed()
        assert d.find_element(By.CSS_SELECTOR, "#zoom-buttons button.active").text == "z3"
        address = d.execute_script("return location.search")
        assert "text=birds" in address and "month=5" in address and "zoom_level=3" in address
        d.get(s.url + "/?text=birds&month=0&hour=-1")
        assert _wait_state(d, ("tiles-loaded", "error")) == "tiles-loaded", d.find_element(By.ID, "status").text
        tiles = d.find_element(By.TAG_NAME, "body").get_attribute("data-tiles")
        assert "month=" not in tiles and "hour=" not in tiles  # the API's "any"
        assert d.find_element(By.ID, "month-out").text == "any"
        assert d.find_element(By.ID, "approximate").is_displayed()
        assert "month=0" in d.execute_script("return location.search")
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        assert s.stop() == 0, s.log.read_text()[-2000:]
