"""``psm-map serve`` against hostile clients (issue 19, findings 3-6 and 10), through a real
server subprocess and real HTTP requests with forged ``Origin`` / ``Host`` headers, and the real
CLI for ``--audio``.

* 3: audio bounded by decoded duration (header read first; 413 JSON; peak RSS of the server per
  upload measured with /proc/PID/status VmHWM after resetting it via /proc/PID/clear_refs);
* 4: no CORS by default, same-origin POSTs, a Host allow-list, tile URLs from the configured
  address, JSON preflight refusals;
* 5 and 10: a token beyond loopback (query, X-PSM-Token, Authorization), printed with every
  address the server is reachable at; the page passes it on (headless chromium);
* 6: uploads in a byte-bounded LRU deleted on shutdown; ``/api/stats`` ``computed`` capped.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from test_serve import (TMS, Server, _coloured, _map_pixels, _wait_state, browser, built, env,  # noqa: F401
                        free_port)

MB = 1 << 20


# ---------------------------------------------------------------------------- helpers
class TokenServer(Server):
    """``psm-map serve`` started with any ``--host`` / token options; ready once it answers
    /api/info with the token it printed (``token``; None: it printed none)."""

    def __init__(self, args: list[str], cwd: Path, host: str = "127.0.0.1", extra_env: dict | None = None):
        self.port = free_port()
        self.url = f"http://{'[::1]' if ':' in host else '127.0.0.1'}:{self.port}"
        self.log = cwd / f"serve-{self.port}.log"
        self.err = cwd / f"serve-{self.port}.err"
        self._out, self._err = open(self.log, "w"), open(self.err, "w")
        e = env()
        e.update(extra_env or {})
        self.proc = subprocess.Popen([sys.executable, "-m", "psm_mapping.cli", "serve", *args, "--host", host,
                                      "--port", str(self.port)], stdout=self._out, stderr=self._err, env=e, cwd=cwd)
        self.token = None
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.err.read_text()[-3000:]}")
            m = re.search(r"serving on (\S+)", self.log.read_text())
            if m:
                t = re.search(r"[?&]token=([^&\s]+)", m.group(1))
                self.token = t.group(1) if t else None
                try:
                    if self.get("/api/info", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
            time.sleep(0.3)
        self.stop()
        raise AssertionError(f"server did not start: {self.err.read_text()[-3000:]}")

    def params(self, **kw) -> dict:
        return {**kw, **({"token": self.token} if self.token else {})}

    def get(self, path: str, timeout: float = 120, params: dict | None = None, **kw) -> httpx.Response:
        return httpx.get(self.url + path, params=self.params(**(params or {})), timeout=timeout, **kw)

    def post_clip(self, name: str, data: bytes, headers: dict | None = None) -> httpx.Response:
        return httpx.post(self.url + "/api/audio", params=self.params(), files={"file": (name, data, "audio/wav")},
                          headers=headers or {}, timeout=300)

    def stop(self) -> int:
        code = super().stop()
        self._err.close()
        return code

    def stderr(self) -> str:
        return self.err.read_text()


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of process ``pid``, in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def upload_peak(s: TokenServer, name: str, data: bytes) -> tuple[httpx.Response, int]:
    """Upload ``data``; the answer and how far the server's RSS peaked above its RSS before."""
    Path(f"/proc/{s.proc.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = memory(s.proc.pid)["VmRSS"]
    r = s.post_clip(name, data)
    return r, memory(s.proc.pid)["VmHWM"] - before


def json_error(r: httpx.Response, status: int, *words: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error"} and "Traceback" not in r.text, body
    for w in words:
        assert w in body["error"], (w, body)
    return body["error"]


def long_flac(path: Path, minutes: float = 15.0, sr: int = 48000) -> Path:
    """A FLAC of ``minutes`` of a constant (audible) level: 0.14 MB for 15 minutes."""
    sf.write(path, np.full(int(minutes * 60 * sr), 2000, np.int16), sr, subtype="PCM_16")
    return path


def ulaw_wav(path: Path, minutes: float = 12.5, sr: int = 8000) -> Path:
    """An 8 kHz u-law WAV of ``minutes`` of a tone with noise: 6 MB for 12.5 minutes."""
    n = int(minutes * 60 * sr)
    t = np.arange(n) / sr
    y = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.01 * np.random.default_rng(0).standard_normal(n)
    sf.write(path, y.astype(np.float32), sr, subtype="ULAW")
    return path


def without_length(flac: Path, out: Path) -> Path:
    """``flac`` with its STREAMINFO total-samples field set to 0 ("unknown"): only decoding tells."""
    b = bytearray(flac.read_bytes())
    assert b[:4] == b"fLaC" and b[4] & 0x7F == 0  # STREAMINFO first
    b[8 + 13] &= 0xF0
    b[8 + 14:8 + 18] = b"\0\0\0\0"
    out.write_bytes(bytes(b))
    return out


def chirp(path: Path, seconds: float, sr: int = 48000) -> Path:
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * (300 + 200 * t) * t)).astype(np.float32), sr,
             subtype="PCM_16" if path.suffix == ".flac" else "FLOAT")
    return path


# ---------------------------------------------------------------------------- 3: audio bounded by duration
def test_long_uploads_refused_from_the_header_with_bounded_memory(built, tmp_path):
    """The issue's two cases (a 0.14 MB FLAC of 15 min, a 6 MB 8 kHz u-law WAV of 12.5 min) are
    refused with 413 JSON from their headers: the server's RSS peaks less than 64 MB above where it
    was (before: +1.9 GB and +1.6 GB). A FLAC whose header hides its length is decoded up to the
    limit only; a clip under the limit is accepted and costs a bounded peak too."""
    flac = long_flac(tmp_path / "fifteen.flac")
    wav = ulaw_wav(tmp_path / "ulaw.wav")
    hidden = without_length(flac, tmp_path / "hidden.flac")
    assert flac.stat().st_size < 0.2 * MB and 5 * MB < wav.stat().st_size < 7 * MB
    s = TokenServer(built["serve_args"], tmp_path)
    try:
        peaks = {}
        for f, words in ((flac, ("900.0 s long", "limit of 60 s", "--max-audio-seconds")),
                         (wav, ("750.0 s long", "limit of 60 s")),
                         (hidden, ("runs on", "limit of 60 s"))):
            r, peaks[f.name] = upload_peak(s, f.name, f.read_bytes())
            json_error(r, 413, *words)
        print("peak RSS above the idle server per refused upload (MB):",
              {k: round(v / MB, 1) for k, v in peaks.items()})
        assert peaks["fifteen.flac"] < 64 * MB and peaks["ulaw.wav"] < 64 * MB, peaks
        assert peaks["hidden.flac"] < 128 * MB, peaks  # decoded: 60 s at 48 kHz (11 MB) then refused
        ok, peak_ok = upload_peak(s, "minute.flac", chirp(tmp_path / "minute.flac", 55.0).read_bytes())
        assert ok.status_code == 200, ok.text
        print(f"peak RSS above the idle server for an accepted 55 s clip: {peak_ok / MB:.1f} MB")
        assert peak_ok < 400 * MB, peak_ok
        assert s.get("/api/stats").json()["uploads"]["entries"] == 1
    finally:
        assert s.stop() == 0


def test_max_audio_seconds_option(built, tmp_path):
    """``--max-audio-seconds 5``: a 10 s clip is refused (413 JSON naming 5 s), a 4 s clip is
    accepted; a bad value is one line, exit 2."""
    s = TokenServer([*built["serve_args"], "--max-audio-seconds", "5"], tmp_path)
    try:
        json_error(s.post_clip("ten.flac", chirp(tmp_path / "ten.flac", 10.0).read_bytes()), 413,
                   "10.0 s long", "limit of 5 s")
        assert s.post_clip("four.flac", chirp(tmp_path / "four.flac", 4.0).read_bytes()).status_code == 200
    finally:
        assert s.stop() == 0
    p = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "serve", *built["serve_args"],
                        "--max-audio-seconds", "0"], capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--max-audio-seconds '0' must be positive" in p.stderr


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psm_mapping.cli", *args], capture_output=True, text=True,
                          env=env(), cwd=cwd, timeout=600)


def test_cli_audio_over_the_limit_is_one_line_exit_2(built, tmp_path):
    """``--audio`` of 15 minutes for map, query and points: one line, exit 2, nothing written."""
    inp = built["inp"]
    flac = long_flac(tmp_path / "fifteen.flac")
    common = ["--checkpoint", str(inp["ckpt"]), "--clap-config", str(inp["clap"]),
              "--tokenizer", str(inp["tokenizer"]), "--device", "cpu", "--quiet"]
    sites = tmp_path / "sites.csv"
    sites.write_text("name,lon,lat\na,8.97,45.03\n")
    runs = {
        "map": [str(inp["square"]), "--imagery", str(inp["scene"]), "--audio", str(flac), "--out",
                str(tmp_path / "map.tif"), "--store", str(tmp_path / "store"), *common],
        "query": ["query", str(built["store"]), "--audio", str(flac), "--out", str(tmp_path / "q.tif"), *common],
        "points": ["points", str(sites), "--imagery", str(inp["scene"]), "--store", str(tmp_path / "pstore"),
                   "--audio", str(flac), "--out", str(tmp_path / "p.csv"), *common],
    }
    for what, args in runs.items():
        p = _cli(args, tmp_path)
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2, (what, p.stderr)
        assert len(lines) == 1 and lines[0].startswith("psm-map: error: audio fifteen.flac is 900.0 s long, "
                                                       "over the limit of 60 s"), (what, p.stderr)
    assert not any(tmp_path.glob("*.tif")) and not (tmp_path / "p.csv").exists()


# ---------------------------------------------------------------------------- 4: origins, hosts, CORS
def test_foreign_origins_and_hosts_are_refused(built, tmp_path):
    s = TokenServer(built["serve_args"], tmp_path)
    clip = built["inp"]["audio"].read_bytes()
    own = f"http://127.0.0.1:{s.port}"
    try:
        assert s.token is None  # loopback: no token unless asked
        # no CORS header by default, for any origin
        r = s.get("/api/info", headers={"Origin": "http://evil.example"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        # a preflight from a foreign page: 403 JSON
        pre = httpx.options(s.url + "/api/audio", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"}, timeout=30)
        json_error(pre, 403, "http://evil.example", "--cors")
        assert "access-control-allow-origin" not in pre.headers
        # POST from a foreign page: 403 JSON; from the server's own page or without Origin (curl): accepted
        json_error(s.post_clip("chirp.wav", clip, {"Origin": "http://evil.example"}), 403, "refused")
        json_error(s.post_clip("chirp.wav", clip, {"Origin": "null"}), 403, "refused")
        json_error(s.post_clip("chirp.wav", clip, {"Origin": f"http://127.0.0.1:{s.port + 1}"}), 403, "refused")
        assert s.post_clip("chirp.wav", clip, {"Origin": own}).status_code == 200
        assert s.post_clip("chirp.wav", clip).status_code == 200
        # a foreign Host (DNS rebinding): 400 JSON on every path, the page and its assets included
        for path in ("/api/info", "/", "/static/app.js", "/tiles/0/0/0.png", "/tilejson.json", "/api/docs",
                     "/no/such/page"):
            json_error(s.get(path, params={"text": "birds"}, headers={"Host": f"evil.example:{s.port}"}), 400,
                       "evil.example", "--allow-host")
        json_error(s.post_clip("chirp.wav", clip, {"Host": "evil.example", "Origin": "http://evil.example"}), 400)
        # the allowed names answer
        for host in (f"localhost:{s.port}", f"LOCALHOST:{s.port}", f"127.0.0.1:{s.port}", f"[::1]:{s.port}"):
            assert s.get("/api/info", headers={"Host": host}).status_code == 200, host
        # tilejson's URLs come from the configured address, not the request's Host
        tj = s.get("/tilejson.json", params={"text": "birds"}, headers={"Host": f"localhost:{s.port}"}).json()
        assert tj["tiles"][0].startswith(f"{own}/tiles/{{z}}/{{x}}/{{y}}.png?text=birds"), tj
    finally:
        assert s.stop() == 0


def test_cors_and_allow_host_options(built, tmp_path):
    app = "http://app.example:3000"
    s = TokenServer([*built["serve_args"], "--cors", app, "--allow-host", "maps.example"], tmp_path)
    try:
        r = s.get("/api/info", headers={"Origin": app})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == app
        assert "origin" in r.headers["vary"].lower()
        pre = httpx.options(s.url + "/api/audio", headers={"Origin": app, "Access-Control-Request-Method": "POST",
                                                          "Access-Control-Request-Headers": "x-psm-token"},
                            timeout=30)
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == app
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert "X-PSM-Token" in pre.headers["access-control-allow-headers"]
        assert s.post_clip("chirp.wav", built["inp"]["audio"].read_bytes(), {"Origin": app}).status_code == 200
        r = s.get("/api/info", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
        assert s.get("/api/info", headers={"Host": f"maps.example:{s.port}"}).status_code == 200
        json_error(s.get("/api/info", headers={"Host": "other.example"}), 400)
    finally:
        assert s.stop() == 0
    p = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "serve", *built["serve_args"], "--cors", "evil"],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--cors 'evil' is not an origin" in p.stderr


# ---------------------------------------------------------------------------- 5 and 10: beyond loopback
def _addresses(family) -> list[str]:
    """This machine's addresses of ``family`` but loopback and link-local, as psutil lists them."""
    import ipaddress

    import psutil

    out = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family == family:
                ip = ipaddress.ip_address(a.address.split("%")[0])
                if not (ip.is_loopback or ip.is_link_local):
                    out.add(str(ip))
    return sorted(out)


def test_all_interfaces_needs_a_token_and_prints_every_address(built, tmp_path):
    """``--host 0.0.0.0``: a warning, a random token in every printed URL (loopback and each
    interface address), 401 JSON without it; ?token=, X-PSM-Token and Authorization: token work;
    tilejson's tile URLs carry it and answer."""
    s = TokenServer(built["serve_args"], tmp_path, host="0.0.0.0")
    try:
        err, out = s.stderr(), s.log.read_text()
        assert "warning: listening on 0.0.0.0 (all interfaces): the explorer is reachable from the network" in err
        assert s.token and re.fullmatch(r"[0-9a-f]{48}", s.token)
        assert f"serving on http://127.0.0.1:{s.port}/?token={s.token}" in out
        for ip in _addresses(socket.AF_INET):  # finding 10: every address it is reachable at, with the token
            assert f"http://{ip}:{s.port}/?token={s.token}" in out, out
            r = httpx.get(f"http://{ip}:{s.port}/api/info", params={"token": s.token}, timeout=60)
            assert r.status_code == 200, (ip, r.text)
        assert "XYZ tiles: http://" in out and f"token={s.token}" in out.split("XYZ tiles:")[1]
        bare = lambda path, **kw: httpx.get(s.url + path, timeout=60, **kw)  # noqa: E731
        for path in ("/", "/api/info", "/api/stats", "/tiles/0/0/0.png?text=birds", "/tilejson.json?text=birds",
                     "/api/footprint.geojson"):
            json_error(bare(path), 401, "token")
            json_error(bare(path, params={"token": s.token[:-1] + "x"}), 401, "token")
        json_error(httpx.post(s.url + "/api/audio", files={"file": ("c.wav", b"x")}, timeout=60), 401, "token")
        assert bare("/api/info", headers={"X-PSM-Token": s.token}).status_code == 200
        assert bare("/api/info", headers={"Authorization": f"token {s.token}"}).status_code == 200
        assert bare("/api/info", headers={"Authorization": f"Bearer {s.token}"}).status_code == 200
        assert bare("/", params={"token": s.token}).status_code == 200
        assert bare("/static/app.js").status_code == 200  # the page's assets: the same for everyone
        for sneaky in ("/static/%2e%2e/api/info", "/static/..%2Fapi/info", "/api/docs/../info"):
            assert bare(sneaky).status_code in (401, 404), sneaky  # never the API without the token
        tj = s.get("/tilejson.json", params={"text": "birds"}).json()
        url = tj["tiles"][0]
        assert f"token={s.token}" in url and url.count("token=") == 1, url
        lon, lat = (tj["bounds"][0] + tj["bounds"][2]) / 2, (tj["bounds"][1] + tj["bounds"][3]) / 2
        t = TMS.tile(lon, lat, 15)
        r = httpx.get(url.replace("{z}", "15").replace("{x}", str(t.x)).replace("{y}", str(t.y)), timeout=120)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    finally:
        assert s.stop() == 0


def test_ipv6_wildcard_prints_its_ipv6_addresses(built, tmp_path):
    """``--host ::`` (uvicorn binds it IPv6 only): [::1] and each IPv6 interface address, with the
    token; each answers with it; tilejson's tile URL is the configured address asked for."""
    s = TokenServer(built["serve_args"], tmp_path, host="::")
    try:
        out = s.log.read_text()
        assert "reachable from the network" in s.stderr() and s.token
        assert f"serving on http://[::1]:{s.port}/?token={s.token}" in out
        for ip in _addresses(socket.AF_INET6):
            assert f"http://[{ip}]:{s.port}/?token={s.token}" in out, out
            r = httpx.get(f"http://[{ip}]:{s.port}/tilejson.json", params={"token": s.token, "text": "birds"},
                          timeout=60)
            assert r.status_code == 200 and r.json()["tiles"][0].startswith(f"http://[{ip}]:{s.port}/tiles/"), r.text
        json_error(httpx.get(f"{s.url}/api/info", timeout=60), 401, "token")
    finally:
        assert s.stop() == 0


def test_token_options(built, tmp_path):
    """``--token`` on loopback makes it required; ``--no-token`` beyond loopback waives it with a
    second warning; $PSM_SERVE_TOKEN is read; a bad --token is one line, exit 2."""
    s = TokenServer([*built["serve_args"], "--token", "my-secret-token-1"], tmp_path)
    try:
        assert s.token == "my-secret-token-1" and "warning" not in s.stderr()
        json_error(httpx.get(s.url + "/api/info", timeout=60), 401)
        # the QGIS connection file carries the token and the configured address, never a forged Host
        r = httpx.get(s.url + "/api/qgis-connection.xml?text=birds&token=my-secret-token-1",
                      headers={"Host": "localhost"}, timeout=120)
        assert r.status_code == 200, r.text
        assert f"url=\"{s.url}/tiles/" in r.text and "token=my-secret-token-1" in r.text, r.text
        json_error(httpx.get(s.url + "/api/qgis-connection.xml?text=birds", timeout=60), 401)
    finally:
        assert s.stop() == 0
    s = TokenServer([*built["serve_args"], "--no-token"], tmp_path, host="0.0.0.0")
    try:
        assert s.token is None and httpx.get(s.url + "/api/info", timeout=60).status_code == 200
        err = s.stderr()
        assert "reachable from the network" in err and "warning: --no-token: anyone who can reach" in err
    finally:
        assert s.stop() == 0
    s = TokenServer(built["serve_args"], tmp_path, extra_env={"PSM_SERVE_TOKEN": "from-the-environment"})
    try:
        assert s.token == "from-the-environment"
        json_error(httpx.get(s.url + "/api/info", timeout=60), 401)
    finally:
        assert s.stop() == 0
    p = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "serve", *built["serve_args"], "--token", "a b"],
                       capture_output=True, text=True, env=env(), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--token must be 8 to 256" in p.stderr


def test_page_passes_the_token_on(built, browser, tmp_path):  # noqa: F811 (the fixture)
    """The page opened at the printed URL (with ?token=) loads, maps a query with tiles, and gives
    a QGIS XYZ URL and a download link that carry the token; no console errors (no 401)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    s = TokenServer([*built["serve_args"], "--token", "page-token-123"], tmp_path)
    try:
        d = browser
        d.get(f"{s.url}/?token={s.token}")
        assert _wait_state(d, ("ready", "error")) == "ready", d.find_element(By.ID, "status").text
        d.find_element(By.ID, "text").send_keys("birds", Keys.ENTER)
        assert _wait_state(d, ("tiles-loaded", "error")) == "tiles-loaded", d.find_element(By.ID, "status").text
        assert _coloured(_map_pixels(d, tmp_path / "token.png")) > 20000, "no overlay tiles with the token"
        xyz = d.find_element(By.ID, "xyz-url").get_attribute("value")
        assert xyz.startswith(s.url + "/tiles/{z}/{x}/{y}.png?text=birds") and "token=page-token-123" in xyz
        href = d.find_element(By.ID, "download").get_attribute("href")
        assert "token=page-token-123" in href and httpx.head(href, timeout=120).status_code in (200, 405)
        errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
    finally:
        assert s.stop() == 0


# ---------------------------------------------------------------------------- 6: bounded leftovers
def test_uploads_are_a_bounded_lru_deleted_on_shutdown(built, tmp_path):
    """``--upload-cache-mb 1``: six distinct 0.3 MB clips keep at most 1 MB on disk (the oldest
    dropped: its id answers 404 asking for a new upload); the folder is gone after Ctrl-C and
    after SIGTERM; ``/api/stats`` ``computed`` stays capped over many queries."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    s = TokenServer([*built["serve_args"], "--upload-cache-mb", "1"], tmp_path, extra_env={"TMPDIR": str(tmp)})
    try:
        (folder,) = tmp.glob("psm-serve-audio-*")
        ids = []
        for i in range(6):
            clip = chirp(tmp_path / f"c{i}.wav", 1.6 + 0.01 * i)  # float32 at 48 kHz: 0.3 MB
            r = s.post_clip(clip.name, clip.read_bytes())
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
            on_disk = sum(f.stat().st_size for f in folder.iterdir())
            assert on_disk <= MB, on_disk
        up = s.get("/api/stats").json()["uploads"]
        assert up["max_bytes"] == MB and up["bytes"] <= MB and up["entries"] == 3 and up["evictions"] == 3, up
        assert len(list(folder.iterdir())) == 3
        json_error(s.get("/api/query", params={"audio": ids[0]}), 404, "unknown audio id")
        assert s.get("/api/query", params={"audio": ids[-1]}).status_code == 200
        # `computed` stays capped over many distinct queries
        for i in range(100):  # ~3 computed keys each: past the cap of 256
            assert s.get("/api/query", params={"text": f"sound number {i}"}).status_code == 200
        st = s.get("/api/stats").json()
        assert len(st["computed"]) <= 256 and st["computed_dropped"] > 0, (len(st["computed"]), st["computed_dropped"])
    finally:
        assert s.stop() == 0
    assert not folder.exists()
    s = TokenServer(built["serve_args"], tmp_path, extra_env={"TMPDIR": str(tmp)})
    (folder,) = tmp.glob("psm-serve-audio-*")
    assert s.post_clip("c0.wav", (tmp_path / "c0.wav").read_bytes()).status_code == 200
    assert any(folder.iterdir())
    s.proc.send_signal(signal.SIGTERM)  # uvicorn shuts down cleanly, then re-raises the signal
    assert s.proc.wait(30) in (0, -signal.SIGTERM)
    s.stop()
    assert not folder.exists() and "Traceback" not in s.stderr()
    # SIGKILL leaves the folder; the next server to start deletes it
    s = TokenServer(built["serve_args"], tmp_path, extra_env={"TMPDIR": str(tmp)})
    (killed,) = tmp.glob("psm-serve-audio-*")
    s.proc.kill()
    s.proc.wait(30)
    s.stop()
    assert killed.exists()
    s = TokenServer(built["serve_args"], tmp_path, extra_env={"TMPDIR": str(tmp)})
    try:
        (own,) = tmp.glob("psm-serve-audio-*")
        assert own != killed and not killed.exists()
    finally:
        assert s.stop() == 0


def test_orphan_sweep_deletes_only_dead_servers_folders(tmp_path):
    """Folders of PIDs no process has are deleted; a live PID's folder, a name without a PID and a
    symlink are left."""
    import subprocess

    from psm_mapping.serve.uploads import PREFIX, sweep_orphans

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a PID no process has now (reaped)
    dead = tmp_path / f"{PREFIX}{p.pid}-abc"
    live = tmp_path / f"{PREFIX}{os.getppid()}-def"
    odd = tmp_path / f"{PREFIX}x-ghi"
    for d in (dead, live, odd):
        d.mkdir()
        (d / "clip.wav").write_bytes(b"RIFF")
    target = tmp_path / "elsewhere"
    target.mkdir()
    link = tmp_path / f"{PREFIX}{p.pid + 1000000}-lnk"
    link.symlink_to(target, target_is_directory=True)
    assert sweep_orphans(tmp_path) == [dead]
    assert not dead.exists() and live.exists() and odd.exists() and link.is_symlink() and target.exists()
