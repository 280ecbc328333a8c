"""Shared HTTP client for network imagery: httpx, bounded concurrency, a User-Agent, and
tenacity retries with exponential backoff on timeouts, connection errors, 429 and 5xx that
honour ``Retry-After``. 404 and other 4xx are not retried.

A server that *answers* badly (5xx, 429) is flaky: its failures are retried and, in the end,
masked. A server that does not answer at all (connection refused or reset, timeouts, DNS
failure) for every request of ``dead_after`` seconds is *dead*: :class:`ServerHealth` says so,
and from then on no request is retried or sent and no thread waits for a backoff."""
from __future__ import annotations

import email.utils
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import httpx
import tenacity

log = logging.getLogger(__name__)

PROJECT_URL = "https://github.com/psm-mapping/psm-mapping"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("psm-mapping")
    except Exception:  # pragma: no cover - not installed
        return "0.1.0"


DEFAULT_USER_AGENT = f"psm-mapping/{_version()} (+{PROJECT_URL})"


@dataclass
class HTTPConfig:
    """How network requests are made."""

    user_agent: str = DEFAULT_USER_AGENT
    timeout: float = 30.0  # seconds per request
    retries: int = 4  # extra attempts after the first
    backoff: float = 0.5  # first backoff in seconds, doubled each attempt
    max_backoff: float = 30.0
    max_retry_after: float = 120.0  # longest Retry-After we agree to wait
    max_concurrency: int = 8
    headers: dict[str, str] = field(default_factory=dict)
    #: seconds during which every request failing without an answer means the server is dead
    dead_after: float = 30.0


class ServerHealth:
    """Whether a server still answers, from the requests made to it (thread-safe).

    Any HTTP answer (even 5xx) proves the server alive. A request that gets none (a transport
    error) opens a failing window at its start (or at the last answer, if later); once a
    failure ends ``dead_after`` seconds or more after the window opened with no answer between,
    every request of that window failed and the server is declared dead: :attr:`dead` is set
    (an :class:`threading.Event`, so that sleeping retries wake up)."""

    def __init__(self, dead_after: float = 30.0, clock: Callable[[], float] = time.monotonic):
        self.dead_after = float(dead_after)
        self.clock = clock
        self.dead = threading.Event()
        self.last_answer: float | None = None
        self.failing_since: float | None = None
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()

    @property
    def ever_answered(self) -> bool:
        return self.last_answer is not None

    def answered(self) -> None:
        with self._lock:
            self.last_answer = self.clock()
            self.failing_since = None

    def failed(self, started: float, exc: BaseException) -> bool:
        """Record a request started at ``started`` that got no answer; True if now dead."""
        with self._lock:
            now = self.clock()
            self.last_error = exc
            if self.failing_since is None:
                self.failing_since = max(started, self.last_answer or started)
            if now - self.failing_since >= self.dead_after and not self.dead.is_set():
                log.debug("no answer for %.1f s: the server is dead", now - self.failing_since)
                self.dead.set()
            return self.dead.is_set()

    def silent_for(self) -> float:
        """Seconds since the failing window opened (0 when the server answers)."""
        with self._lock:
            return 0.0 if self.failing_since is None else self.clock() - self.failing_since


class ServerDead(httpx.TransportError):
    """A request not sent because its server was declared dead (:class:`ServerHealth`)."""


class HTTPStatusFault(Exception):
    """A response with a status that is not 200."""

    def __init__(self, url: str, status: int, retry_after: float | None = None):
        super().__init__(f"HTTP {status} for {url}")
        self.url = url
        self.status = status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.status in RETRY_STATUSES


@dataclass
class FetchResult:
    """Outcome of one GET after retries: ``content`` or ``error``, and the attempts made."""

    url: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    error: Exception | None = None
    attempts: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> int | None:
        if isinstance(self.error, HTTPStatusFault):
            return self.error.status
        return 200 if self.error is None else None

    @property
    def unreachable(self) -> bool:
        """True when the server never answered (connection refused, DNS, timeouts)."""
        return isinstance(self.error, httpx.TransportError)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, HTTPStatusFault):
        return exc.retryable
    return isinstance(exc, httpx.TransportError)  # timeouts, refused, reset, protocol


class HTTPClient:
    """A thread-safe GET client with retries; ``get_many`` fetches with a bounded pool."""

    def __init__(self, config: HTTPConfig | None = None):
        self.config = config or HTTPConfig()
        c = self.config
        headers = {"User-Agent": c.user_agent, **c.headers}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(c.timeout),
            limits=httpx.Limits(
                max_connections=max(1, c.max_concurrency),
                max_keepalive_connections=max(1, c.max_concurrency),
            ),
            follow_redirects=True,
        )
        self._pool = ThreadPoolExecutor(max_workers=max(1, c.max_concurrency),
                                        thread_name_prefix="psm-http")
        self.health = ServerHealth(c.dead_after)

    @property
    def dead(self) -> bool:
        """True once every request of ``dead_after`` seconds got no answer."""
        return self.health.dead.is_set()

    # -- retry policy -------------------------------------------------------------------
    def _wait(self, state: tenacity.RetryCallState) -> float:
        c = self.config
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HTTPStatusFault) and exc.retry_after is not None:
            return min(exc.retry_after, c.max_retry_after)
        return min(c.max_backoff, c.backoff * 2 ** (state.attempt_number - 1))

    def _sleep(self, seconds: float) -> None:
        self.health.dead.wait(seconds)  # a dead server wakes every waiting retry

    def _stop(self, state: tenacity.RetryCallState) -> bool:
        return self.dead or state.attempt_number >= 1 + max(0, self.config.retries)

    def _get_once(self, url: str) -> httpx.Response:
        if self.dead:
            raise ServerDead(f"not sent: the server has not answered for "
                             f"{self.health.dead_after:g} s")
        started = time.monotonic()
        try:
            resp = self._client.get(url)
        except httpx.TransportError as exc:
            self.health.failed(started, exc)
            raise
        self.health.answered()
        if resp.status_code != 200:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise HTTPStatusFault(url, resp.status_code, retry_after)
        return resp

    def get(self, url: str) -> FetchResult:
        """GET ``url`` with retries; never raises for HTTP or network failures."""
        result = FetchResult(url)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            stop=self._stop,
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
            before_sleep=lambda s: log.debug(
                "retrying %s after %s", url, s.outcome.exception() if s.outcome else None),
        )
        try:
            for attempt in retrying:
                with attempt:
                    result.attempts += 1
                    resp = self._get_once(url)
            result.content = resp.content
            result.headers = dict(resp.headers)
        except (HTTPStatusFault, httpx.HTTPError) as exc:
            result.error = exc
        return result

    def get_many(
        self, urls: Sequence[str], on_done: Callable[[FetchResult], None] | None = None
    ) -> list[FetchResult]:
        """Fetch ``urls`` concurrently (at most ``max_concurrency`` at a time), in order."""
        futures = [self._pool.submit(self.get, u) for u in urls]
        out = []
        for fut in futures:
            res = fut.result()
            if on_done is not None:
                on_done(res)
            out.append(res)
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=self.dead)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
