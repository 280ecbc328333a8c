"""``psm-map serve STORE``: the explorer's options (:func:`configure`) and :func:`run`."""
from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--basemap", default=None, metavar="URL|none",
                   help="XYZ basemap shown when reachable (default OpenStreetMap; none: no basemap)")
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    return p


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
    ex = Explorer(args.store, checkpoint=args.checkpoint, clap_config=args.clap_config,
                  tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
                  memory_limit=args.memory_limit * 1e9, max_upload_bytes=int(args.max_upload * (1 << 20)))
    app = create_app(explorer=ex, basemap=basemap)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}/"
    held = (f"caches up to {ex.cache_budget / 1e9:.2f} GB of --memory-limit {args.memory_limit:g} GB "
            f"(ready in {ex.load_seconds:.1f} s)")
    print(f"psm-map serve: {args.store}: {ex.store.spec.width} x {ex.store.spec.height} px, zoom levels "
          f"{','.join(map(str, ex.zoom_levels))}; {held}", file=sys.stderr)
    print(f"serving on {url} (Ctrl-C stops); XYZ tiles: {url}tiles/{{z}}/{{x}}/{{y}}.png?text=...", flush=True)
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
