"""Shared HTTP client for network imagery: httpx, bounded concurrency, a User-Agent, and
tenacity retries with exponential backoff on timeouts, connection errors, 429 and 5xx that
honour ``Retry-After``. 404 and other 4xx are not retried."""
from __future__ import annotations

import email.utils
import logging
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

    # -- retry policy -------------------------------------------------------------------
    def _wait(self, state: tenacity.RetryCallState) -> float:
        c = self.config
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, HTTPStatusFault) and exc.retry_after is not None:
            return min(exc.retry_after, c.max_retry_after)
        return min(c.max_backoff, c.backoff * 2 ** (state.attempt_number - 1))

    def _get_once(self, url: str) -> httpx.Response:
        resp = self._client.get(url)
        if resp.status_code != 200:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"))
            raise HTTPStatusFault(url, resp.status_code, retry_after)
        return resp

    def get(self, url: str) -> FetchResult:
        """GET ``url`` with retries; never raises for HTTP or network failures."""
        result = FetchResult(url)
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_retryable),
            stop=tenacity.stop_after_attempt(1 + max(0, self.config.retries)),
            wait=self._wait,
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
        self._pool.shutdown(wait=True)
        self._client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
