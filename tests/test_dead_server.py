"""A tile server that stops answering is declared dead after a window of failed requests; one
that answers badly (5xx, 429) is only flaky. Real sockets on 127.0.0.1; the run-level case
(the CLI ending soon after a kill, the rerun resuming) is in test_faults.py."""
from __future__ import annotations

import socket
import threading
import time

import httpx
import pytest

from psm_mapping.errors import ImageryError, ServerDeadError
from psm_mapping.imagery.http import HTTPClient, HTTPConfig, ServerDead, ServerHealth
from psm_mapping.imagery.xyz import XYZSource

from servers import SceneTiles, TileServer, write_scene

pytestmark = pytest.mark.network

UTM = "EPSG:32632"
LEFT, TOP, RES, SIZE = 498000.0, 4986000.0, 10.0, 400
WIN = (LEFT + 500, TOP - 3500, LEFT + 3500, TOP - 500)
WIN2 = (LEFT + 100, TOP - 1100, LEFT + 1100, TOP - 100)


def closed_port() -> int:
    """A port nothing listens on (connection refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_health_needs_a_whole_window_of_failures():
    clock = Clock()
    h = ServerHealth(30, clock=clock)
    h.answered()
    clock.t = 110
    assert not h.failed(started=105, exc=httpx.ConnectError("refused"))  # the window opens at 105
    clock.t = 134
    assert not h.failed(started=130, exc=httpx.ConnectError("refused"))
    clock.t = 136  # a failure 31 s after the window opened, no answer between: dead
    assert h.failed(started=134, exc=httpx.ConnectError("refused")) and h.dead.is_set()

    h = ServerHealth(30, clock=clock)
    clock.t = 200
    h.failed(started=199, exc=httpx.ConnectTimeout("slow"))
    clock.t = 220
    h.answered()  # an answer, even a 500, proves the server alive: the window closes
    clock.t = 240
    assert not h.failed(started=210, exc=httpx.ConnectError("x"))  # started before the answer
    assert h.silent_for() == pytest.approx(20)
    clock.t = 251
    assert h.failed(started=245, exc=httpx.ConnectError("x"))  # 31 s since the answer


def test_refused_connections_stop_every_retry_soon():
    """Long backoffs (minutes in all) end once the window is over: sleeping retries wake up and
    nothing more is sent."""
    cfg = HTTPConfig(retries=12, backoff=0.2, max_backoff=30, dead_after=1.0, max_concurrency=4)
    urls = [f"http://127.0.0.1:{closed_port()}/t/{i}.png" for i in range(6)]
    with HTTPClient(cfg) as http:
        t0 = time.monotonic()
        results = http.get_many(urls)
        took = time.monotonic() - t0
        assert http.dead and all(not r.ok and r.unreachable for r in results)
        assert took < 5, took  # without the window: 0.2 * (1 + 2 + ... + 2**11) s, capped at 30 s each
        # once dead, nothing is sent and nothing waits
        t0 = time.monotonic()
        again = http.get(urls[0])
        assert isinstance(again.error, ServerDead) and time.monotonic() - t0 < 0.1


def test_a_server_that_hangs_is_dead_after_the_window():
    """Accepts connections and never answers: every request times out."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(64)
    port = lsock.getsockname()[1]
    held: list = []
    stop = threading.Event()

    def accept():
        lsock.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(lsock.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        cfg = HTTPConfig(timeout=0.4, retries=10, backoff=0.05, dead_after=1.0, max_concurrency=3)
        with HTTPClient(cfg) as http:
            t0 = time.monotonic()
            results = http.get_many([f"http://127.0.0.1:{port}/{i}.png" for i in range(3)])
            took = time.monotonic() - t0
            assert http.dead and all(r.unreachable for r in results)
            assert took < 1.0 + 2 * 0.4 + 1.0, took
    finally:
        stop.set()
        t.join(2)
        for c in held:
            c.close()
        lsock.close()


def test_a_server_answering_500_is_flaky_not_dead(tmp_path):
    with TileServer(lambda z, x, y: None, fault_rule=lambda z, x, y: "500") as srv:
        cfg = HTTPConfig(retries=3, backoff=0.1, dead_after=0.2)
        with HTTPClient(cfg) as http:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0:
                res = http.get(srv.url + "/xyz/1/0/0.png")
                assert res.status == 500 and res.attempts == 4
            assert not http.dead and http.health.silent_for() == 0.0


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    path = tmp_path_factory.mktemp("scene") / "scene.tif"
    write_scene(path, UTM, LEFT, TOP, RES, SIZE, SIZE, seed=2)
    return SceneTiles(path)


def test_reader_raises_server_dead_naming_the_host(tiles):
    srv = TileServer(tiles).start()
    try:
        with XYZSource(srv.template(), retries=50, backoff=0.05, dead_after=0.5) as src:
            srv.die_after = len(src.plan(WIN, UTM, (64, 64)).tiles)  # the kill switch
            assert src.read(WIN, UTM, (64, 64)).valid_fraction == 1.0
            t0 = time.monotonic()
            with pytest.raises(ServerDeadError) as ei:
                src.read(WIN2, UTM, (64, 64))  # other tiles: none in the memory cache
            assert time.monotonic() - t0 < 4
    finally:
        srv.stop()
    msg = ei.value.cli_message
    assert "tile server 127.0.0.1 stopped answering" in msg and "0.5 s" in msg
    assert "kept" in msg and "rerun" in msg and "dead_after" in msg
    assert isinstance(ei.value, ImageryError)


def test_server_never_reached_is_still_the_url_error():
    with XYZSource(f"http://127.0.0.1:{closed_port()}/{{z}}/{{x}}/{{y}}.png", retries=1,
                   backoff=0.01) as src:
        with pytest.raises(ImageryError, match=r"cannot reach tile server 127\.0\.0\.1") as ei:
            src.read(WIN, UTM, (32, 32))
    assert not isinstance(ei.value, ServerDeadError)


def test_dead_after_must_be_positive():
    with pytest.raises(ImageryError, match="dead_after"):
        XYZSource("http://127.0.0.1:1/{z}/{x}/{y}.png", dead_after=0)
