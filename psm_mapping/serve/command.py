"""``psm-map serve STORE``: the explorer's options (:func:`configure`) and :func:`run`."""
from __future__ import annotations

import argparse
import os
import re
import sys

from ..model.audio import MAX_AUDIO_SECONDS
from .uploads import DEFAULT_UPLOAD_CACHE_BYTES


def _positive(flag: str, unit: str, example: str):
    """An argparse type: a positive number of ``unit`` (``--memory-limit`` GB, ``--max-upload`` MB)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} is not a number of {unit}: give e.g. {example}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{flag} {text!r} must be positive: give e.g. {example}")
        return v

    return parse


_gb = _positive("--memory-limit", "GB", "4")
_mb = _positive("--max-upload", "MB", "20")
_seconds = _positive("--max-audio-seconds", "seconds", "60")
_cache_mb = _positive("--upload-cache-mb", "MB", "200")
#: environment variable read when --token is not given
TOKEN_ENV = "PSM_SERVE_TOKEN"


def _token(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9._~-]{8,256}", text or ""):
        raise argparse.ArgumentTypeError("--token must be 8 to 256 letters, digits or . _ ~ - (it goes into URLs): "
                                         "leave it out for a random one")
    return text


def _origin(text: str) -> str:
    from urllib.parse import urlsplit

    t = text.strip().rstrip("/")
    try:
        u = urlsplit(t)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and not (u.path or u.query or u.fragment)
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        ok = False
    if not ok:
        raise argparse.ArgumentTypeError(f"--cors {text!r} is not an origin: give SCHEME://HOST[:PORT], e.g. "
                                         "http://localhost:3000")
    return t


def _host_name(text: str) -> str:
    t = text.strip()
    if not t or not re.fullmatch(r"\*|\[?[A-Za-z0-9.:_-]+\]?", t):
        raise argparse.ArgumentTypeError(f"--allow-host {text!r} is not a host name: give e.g. myhost.lan or 10.0.0.5")
    return t


def _port(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port {text!r} is not a whole number: give e.g. 8000") from None
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"--port {v} is out of range: give 1..65535 (0: any free port)")
    return v


def configure(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("store", help="the .zarr embedding store a previous run wrote (opened read-only)")
    p.add_argument("--checkpoint", help="PSM checkpoint (default: $PSM_CHECKPOINT, else the store's)")
    p.add_argument("--clap-config", help="CLAP config JSON (default: laion/clap-htsat-fused)")
    p.add_argument("--tokenizer", help="folder with a RoBERTa tokenizer (default: roberta-base from the HF cache)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--open", action="store_true", help="open the page in a web browser")
    p.add_argument("--memory-limit", type=_gb, default=1.5, metavar="GB",
                   help="the server's memory target (default 1.5 GB): the caches get half of "
                        "what the model leaves of it; any store size (tiles read only their window)")
    p.add_argument("--max-upload", type=_mb, default=20.0, metavar="MB", help="largest audio upload (default 20 MB)")
    p.add_argument("--max-audio-seconds", type=_seconds, default=MAX_AUDIO_SECONDS, metavar="S",
                   help=f"longest audio clip an upload may hold, checked from its header before decoding "
                        f"(default {MAX_AUDIO_SECONDS:g} s: CLAP looks at 10 s windows)")
    p.add_argument("--upload-cache-mb", type=_cache_mb, default=DEFAULT_UPLOAD_CACHE_BYTES / (1 << 20), metavar="MB",
                   help=f"disk kept for uploaded clips, least recently used dropped first (default "
                        f"{DEFAULT_UPLOAD_CACHE_BYTES >> 20} MB); deleted when the server stops")
    sec = p.add_argument_group("security (see README: explorer security)")
    tok = sec.add_mutually_exclusive_group()
    tok.add_argument("--token", type=_token, default=None,
                     help=f"the token every request must carry (?token=, X-PSM-Token or Authorization: token); "
                          f"default: ${TOKEN_ENV}, else a random one when --host is not loopback, else none")
    tok.add_argument("--no-token", action="store_true",
                     help="no token even when --host is not loopback (anyone on the network can use the explorer)")
    sec.add_argument("--allow-host", action="extend", nargs="+", type=_host_name, default=[], metavar="NAME",
                     help="more Host names to answer to (always: 127.0.0.1, localhost, ::1, --host; "
                          "for 0.0.0.0 / :: also this machine's addresses and name); * for any")
    sec.add_argument("--cors", action="extend", nargs="+", type=_origin, default=[], metavar="ORIGIN",
                     help="web pages (e.g. http://localhost:3000) allowed to read answers and upload from "
                          "another origin (default: none)")
    p.add_argument("--basemap", default=None, metavar="URL|none",
                   help="XYZ basemap shown when reachable (default OpenStreetMap; none: no basemap)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


def security_of(args: argparse.Namespace, port: int):
    """The :class:`~psm_mapping.serve.security.Security` of the options, and the warnings to print."""
    from .security import Security, is_loopback, new_token

    exposed = not is_loopback(args.host)
    token = args.token or (None if args.no_token else os.environ.get(TOKEN_ENV) or None)
    if token is not None and args.token is None and not re.fullmatch(r"[A-Za-z0-9._~-]{8,256}", token):
        from ..errors import InputError

        raise InputError(f"${TOKEN_ENV} must be 8 to 256 letters, digits or . _ ~ -: fix or unset it")
    warnings = []
    if exposed:
        where = "all interfaces" if args.host in ("0.0.0.0", "::") else args.host
        warnings.append(f"psm-map serve: warning: listening on {args.host} ({where}): the explorer is reachable "
                        "from the network over plain HTTP; every request must carry the token printed below "
                        "(use --host 127.0.0.1 to keep it on this machine)")
        if args.no_token:
            warnings[-1] = warnings[-1].split("; every request")[0] + "."
            warnings.append("psm-map serve: warning: --no-token: anyone who can reach this machine can use "
                            "the explorer, see the store's extent and path, and upload clips")
        elif token is None:
            token = new_token()
    sec = Security(host=args.host, port=port, token=token, allow_hosts=args.allow_host, cors=args.cors)
    return sec, warnings


def run(args: argparse.Namespace) -> int:
    import socket

    from .app import DEFAULT_BASEMAP, create_app
    from .engine import Explorer

    basemap = args.basemap if args.basemap is not None else DEFAULT_BASEMAP
    if str(basemap).lower() in ("none", "off", ""):
        basemap = None
    host, port = args.host, args.port
    # refuse a busy port before loading the store (a one-line error, not uvicorn's)
    from ..errors import InputError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --port "
                             "or --host") from None
        if port == 0:
            port = s.getsockname()[1]
    security, warnings = security_of(args, port)
    ex = Explorer(args.store, checkpoint=args.checkpoint, clap_config=args.clap_config,
                  tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                  memory_limit=args.memory_limit * 1e9, max_upload_bytes=int(args.max_upload * (1 << 20)),
                  max_audio_seconds=args.max_audio_seconds,
                  upload_cache_bytes=int(args.upload_cache_mb * (1 << 20)))
    app = create_app(explorer=ex, basemap=basemap, security=security)
    urls = security.public_urls()  # loopback first, then the machine's addresses (0.0.0.0 / ::)
    url = urls[0]
    held = (f"caches up to {ex.cache_budget / 1e9:.2f} GB of --memory-limit {args.memory_limit:g} GB "
            f"(ready in {ex.load_seconds:.1f} s)")
    print(f"psm-map serve: {args.store}: {ex.store.spec.width} x {ex.store.spec.height} px, zoom levels "
          f"{','.join(map(str, ex.zoom_levels))}; {held}", file=sys.stderr)
    for w in warnings:
        print(w, file=sys.stderr)
    xyz = security.tile_template(security.base_url(), "text=...")
    print(f"serving on {url} (Ctrl-C stops); XYZ tiles: {xyz}", flush=True)
    for other in urls[1:]:
        print(f"  or {other}", flush=True)
    if args.open:
        import threading
        import webbrowser

        threading.Timer(1.0, lambda: webbrowser.open(url)).start()
    from .app import serve

    try:
        serve(app, host=host, port=port, log_level=args.log_level)
    finally:
        ex.close()
    print("psm-map serve: stopped", file=sys.stderr)
    return 0
