"""What the explorer trusts: a pure ASGI middleware in front of every route (those added later too).

As Jupyter and local TiTiler deployments do:

* **Host allow-list.** A request whose ``Host`` is not 127.0.0.1, localhost, ::1, the bound
  address (for 0.0.0.0 / ::, the machine's own addresses and names) or an ``--allow-host`` name
  gets 400 JSON: a DNS-rebinding page (``evil.example`` resolving to 127.0.0.1) reads nothing.
* **Same-origin writes.** A POST (any method but GET/HEAD/OPTIONS) whose ``Origin`` is present and
  neither the server's own (the ``Host`` it was sent to) nor a ``--cors`` origin gets 403 JSON.
* **No CORS by default.** ``Access-Control-Allow-Origin`` is sent only to ``--cors`` origins; a
  preflight from any other origin gets 403 JSON.
* **Token.** When the server has one (always when it listens beyond loopback, unless waived),
  every request but the page's static assets and the API docs carries it: ``?token=``, the header
  ``X-PSM-Token: TOKEN`` or ``Authorization: token TOKEN`` (or ``Bearer``); else 401 JSON.
  Compared with :func:`secrets.compare_digest`.

URLs the server hands out (tilejson, QGIS connections, the printed addresses) are built from the
configured address (:meth:`Security.base_url`) and carry the token (:meth:`Security.tile_template`).
"""
from __future__ import annotations

import ipaddress
import json
import secrets
import socket
from dataclasses import dataclass, field
from typing import Sequence
from urllib.parse import parse_qsl, urlencode, urlsplit

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
WILDCARDS = ("0.0.0.0", "::", "")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: paths served without the token: the page's assets (the same for everyone) and the API docs
TOKEN_FREE = ("/static/", "/favicon.ico", "/api/docs", "/api/openapi.json")
TOKEN_HEADER = "x-psm-token"


def new_token() -> str:
    """A random token (48 hex digits, as Jupyter's)."""
    return secrets.token_hex(24)


def _split(host: str) -> tuple[str, int | None]:
    """``(name, port)`` of a ``Host`` value: lower case, no brackets, no trailing dot
    (``[::1]:80`` -> ``("::1", 80)``); port None when absent or not a number."""
    h, port = host.strip().lower(), None
    if h.startswith("["):
        name, _, rest = h[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif h.count(":") == 1:
        name, port = h.split(":", 1)
    else:
        name = h
    try:
        port = int(port) if port else None
    except ValueError:
        port = None
    return name.rstrip("."), port


def _bare(host: str) -> str:
    """``host`` without brackets, port or trailing dot, lower case (``[::1]:80`` -> ``::1``)."""
    return _split(host)[0]


def url_host(host: str) -> str:
    """``host`` as a URL writes it (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    h = _bare(host)
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def interface_addresses(version: int = 4) -> list[str]:
    """This machine's non-loopback addresses of IP ``version`` 4 or 6 (IPv6 link-local left out)."""
    found: list[str] = []
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            for a in addrs:
                if a.family in (socket.AF_INET, socket.AF_INET6):
                    found.append(a.address.split("%", 1)[0])
    except Exception:  # no psutil: the addresses of the host name
        try:
            found += [i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            pass
    out = []
    for a in found:
        try:
            ip = ipaddress.ip_address(a)
        except ValueError:
            continue
        if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.version != version:
            continue
        if a not in out:
            out.append(a)
    return sorted(out)


@dataclass
class Security:
    """The explorer's trust settings (see the module's doc). ``host``: the bound address;
    ``port``: the listening port (None: the socket's own); ``token``: None for none;
    ``allow_hosts``: more ``Host`` names to accept (``*``: any); ``cors``: origins allowed to
    read answers and to POST from their pages (``*``: any, not advised)."""

    host: str = "127.0.0.1"
    port: int | None = None
    token: str | None = None
    allow_hosts: Sequence[str] = ()
    cors: Sequence[str] = ()
    #: the addresses the server is reachable at (computed): loopback first, then the machine's
    addresses: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.host = _bare(self.host) if self.host not in WILDCARDS else self.host
        if not self.addresses:
            self.addresses = self._reachable()
        names = {*LOOPBACK_NAMES, *self.addresses}
        if self.host not in WILDCARDS:
            names.add(self.host)
        else:
            if socket.gethostname():  # (not getfqdn: it may wait on DNS)
                names.add(_bare(socket.gethostname()))
        extra = [_bare(h) for h in self.allow_hosts if h.strip() != "*"]
        self.any_host = any(h.strip() == "*" for h in self.allow_hosts)
        self.configured = {*([] if self.host in WILDCARDS else [self.host]), *self.addresses, *extra}
        self.hosts = names | set(extra)
        self.any_origin = any(o.strip() == "*" for o in self.cors)
        self.origins = {o.strip().rstrip("/").lower() for o in self.cors if o.strip() != "*"}

    def _reachable(self) -> list[str]:
        if self.host == "0.0.0.0":
            return ["127.0.0.1", *interface_addresses(4)]
        if self.host in ("::", ""):  # uvicorn (asyncio) binds :: as IPv6 only
            return ["::1", *interface_addresses(6)]
        return [self.host]

    # ------------------------------------------------------------------ the checks
    @property
    def exposed(self) -> bool:
        """Listening beyond this machine (any address but loopback)."""
        return not is_loopback(self.host)

    def host_allowed(self, host_header: str) -> bool:
        return self.any_host or _bare(host_header) in self.hosts

    def cors_allowed(self, origin: str) -> bool:
        return self.any_origin or origin.strip().rstrip("/").lower() in self.origins

    @staticmethod
    def same_origin(origin: str, host_header: str | None) -> bool:
        """``origin`` is the page of the server the request went to (its ``Host``)."""
        if not host_header:
            return False
        try:
            u = urlsplit(origin.strip().lower())
            oport = u.port or (443 if u.scheme == "https" else 80)
        except ValueError:
            return False
        if u.scheme not in ("http", "https") or not u.hostname:
            return False
        name, port = _split(host_header)
        return name == u.hostname.rstrip(".") and (port or 80) == oport

    def token_ok(self, query_string: bytes, headers: dict[str, str]) -> bool:
        if not self.token:
            return True
        given = []
        for k, v in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            if k == "token":
                given.append(v)
        if TOKEN_HEADER in headers:
            given.append(headers[TOKEN_HEADER])
        auth = headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("token", "bearer"):
            given.append(value.strip())
        want = self.token.encode()
        return any(secrets.compare_digest(g.encode("utf-8", "replace"), want) for g in given)

    # ------------------------------------------------------------------ the URLs it hands out
    def base_url(self, host_header: str | None = None, port: int | None = None) -> str:
        """``http://HOST:PORT`` from the configured address: the bound one, or for 0.0.0.0 / ::
        the configured address the client used (its ``Host``) when it is one, else the first
        address beyond loopback. Never an unconfigured ``Host``."""
        port = self.port or port or 80
        h = _bare(host_header) if host_header else None
        if h is not None and h in self.configured:
            pick = h
        elif self.host not in WILDCARDS:
            pick = self.host
        else:
            beyond = [a for a in self.addresses if not is_loopback(a)]
            pick = beyond[0] if beyond else self.addresses[0]
        return f"http://{url_host(pick)}:{port}"

    def with_token(self, url: str) -> str:
        """``url`` with ``token=`` added (when the server has one)."""
        if not self.token:
            return url
        return url + ("&" if "?" in url else "?") + urlencode({"token": self.token})

    def tile_template(self, base: str, query: str = "") -> str:
        """The XYZ template ``BASE/tiles/{z}/{x}/{y}.png?QUERY&token=...`` (``query`` without any
        token of its own)."""
        pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k != "token"]
        qs = urlencode(pairs)
        return self.with_token(f"{base}/tiles/{{z}}/{{x}}/{{y}}.png" + (f"?{qs}" if qs else ""))

    def public_urls(self) -> list[str]:
        """``http://ADDRESS:PORT/`` (with ``?token=``) for each address the server is reachable at."""
        return [self.with_token(f"http://{url_host(a)}:{self.port}/") for a in self.addresses]


def request_base(request) -> str:
    """The configured base URL for a Starlette ``request`` (see :meth:`Security.base_url`)."""
    sec: Security = getattr(request.app.state, "security", None) or Security()
    server = request.scope.get("server") or (None, None)
    return sec.base_url(request.headers.get("host"), server[1])


def request_security(request) -> Security:
    return getattr(request.app.state, "security", None) or Security()


class SecurityMiddleware:
    """The checks of :class:`Security` in front of an ASGI app (answers are 4xx JSON)."""

    def __init__(self, app, security: Security):
        self.app, self.sec = app, security

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        origin = headers.get("origin")
        cors_ok = origin is not None and self.sec.cors_allowed(origin)
        extra = _cors_headers(origin) if cors_ok else []
        refused = self.refusal(scope, headers, origin, cors_ok)
        if refused is not None:
            status, message = refused
            if scope["type"] == "websocket":
                return await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            if status == 204:  # an allowed preflight
                return await _send(send, 204, b"", _cors_headers(origin, preflight=True))
            return await _json(send, status, message, extra)
        if not extra:
            return await self.app(scope, receive, send)

        async def send_cors(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        return await self.app(scope, receive, send_cors)


    def refusal(self, scope, headers: dict, origin: str | None, cors_ok: bool) -> tuple[int, str] | None:
        """``(status, message)`` when the request is not let through (204: an allowed preflight)."""
        sec = self.sec
        host = headers.get("host")
        method = scope.get("method", "GET").upper()
        if host is not None and not sec.host_allowed(host):
            return 400, (f"Host {host[:100]!r} is not one this server answers to: open it at "
                         f"{sec.base_url(None, _port(scope))}/ or start it with --allow-host NAME")
        if method == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
            if not cors_ok:
                return 403, (f"cross-origin requests from {origin[:100]!r} are not allowed: start "
                             "psm-map serve with --cors ORIGIN to allow that page")
            return 204, ""
        if method not in SAFE_METHODS and origin is not None and not cors_ok and not sec.same_origin(origin, host):
            return 403, (f"{method} from the page at {origin[:100]!r} is refused: only this server's own page "
                         "may send it (or start psm-map serve with --cors ORIGIN)")
        if sec.token and not scope.get("path", "").startswith(TOKEN_FREE) \
                and not sec.token_ok(scope.get("query_string", b""), headers):
            return 401, ("this explorer needs its token: open the URL psm-map serve printed (.../?token=...), "
                         "or send it as ?token=TOKEN, the header X-PSM-Token: TOKEN or Authorization: token TOKEN")
        return None


def _port(scope) -> int | None:
    server = scope.get("server") or (None, None)
    return server[1]


def _cors_headers(origin: str, preflight: bool = False) -> list[tuple[bytes, bytes]]:
    h = [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
    if preflight:
        h += [(b"access-control-allow-methods", b"GET, POST"),
              (b"access-control-allow-headers", b"Authorization, Content-Type, X-PSM-Token"),
              (b"access-control-max-age", b"600")]
    return h


async def _send(send, status: int, body: bytes, headers: list[tuple[bytes, bytes]],
                media_type: bytes | None = None) -> None:
    hs = [(b"content-length", str(len(body)).encode()), *headers]
    if media_type:
        hs.append((b"content-type", media_type))
    await send({"type": "http.response.start", "status": status, "headers": hs})
    await send({"type": "http.response.body", "body": body})


async def _json(send, status: int, message: str, headers: list | None = None) -> None:
    body = json.dumps({"error": " ".join(message.split())}).encode()
    await _send(send, status, body, list(headers or []), b"application/json")


__all__ = ["LOOPBACK_NAMES", "Security", "SecurityMiddleware", "interface_addresses", "is_loopback", "new_token",
           "request_base", "request_security"]
