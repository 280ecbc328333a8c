"""Offline mode: ``--offline``, ``PSM_OFFLINE=1``, ``HF_HUB_OFFLINE=1`` or ``TRANSFORMERS_OFFLINE=1``.

Whatever would be downloaded (an official checkpoint, the roberta-base tokenizer) is then an
error at once, one line naming what to pass or fetch, instead of retries against hosts that
cannot be reached. Without the flags, a host that does not answer within a few seconds counts
as offline too (:func:`reachable`)."""
from __future__ import annotations

import os
import socket
from urllib.parse import urlparse

_ON = ("1", "true", "yes", "on")


def is_offline() -> bool:
    return any(os.environ.get(k, "0").strip().lower() in _ON
               for k in ("PSM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def set_offline() -> None:
    """Offline for this process and the libraries it calls (``--offline``)."""
    for k in ("PSM_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[k] = "1"


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether ``url``'s host resolves and accepts a TCP connection within ``timeout`` seconds
    in all (name resolution runs in a thread: ``getaddrinfo`` itself has no timeout)."""
    import threading
    import time

    u = urlparse(url if "://" in url else f"https://{url}")
    port = u.port or (443 if u.scheme == "https" else 80)
    found: list = []
    t0 = time.monotonic()

    def resolve() -> None:
        try:
            found.extend(socket.getaddrinfo(u.hostname, port, type=socket.SOCK_STREAM))
        except OSError:
            pass

    th = threading.Thread(target=resolve, daemon=True)
    th.start()
    th.join(timeout)
    if not found:
        return False
    family, kind, proto, _, addr = found[0]
    try:
        with socket.socket(family, kind, proto) as s:
            s.settimeout(max(0.1, timeout - (time.monotonic() - t0)))
            s.connect(addr)
        return True
    except OSError:
        return False
