"""The explorer: ``psm-map serve STORE``: XYZ tiles, points, uploads and exports of any query
over an embedding store, and a MapLibre page (vendored, offline) that uses only that HTTP API.

``create_app(store_url, checkpoint=..., tokenizer=...)`` returns the FastAPI app (see
:mod:`psm_mapping.serve.app`); :class:`~psm_mapping.serve.engine.Explorer` is the engine behind it.
"""
from __future__ import annotations


def create_app(store_url: str | None = None, **kw):
    from .app import create_app as _create

    return _create(store_url, **kw)


__all__ = ["create_app"]
