"""``psm-map serve STORE``: the explorer (``psm_mapping.serve``)."""
from __future__ import annotations

from .base import ArgumentParser


def cmd_serve(argv: list[str]) -> int:
    from ..serve.command import configure, run

    p = ArgumentParser(prog="psm-map serve",
                       description="Explore a store in the browser and in QGIS: XYZ tiles, points and "
                                   "exports of any query, answered from the store.")
    return run(configure(p).parse_args(argv))
