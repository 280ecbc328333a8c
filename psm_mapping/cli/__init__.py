"""``psm-map``: a thin command-line layer over the library API.

:data:`COMMANDS` names, for each subcommand, the module and function that run it; a command's
module is imported only when that command runs (``import psm_mapping.cli`` imports neither torch
nor the training stack). Anything else on the command line is a map run (``psm-map REGION ...``).
Any :class:`~psm_mapping.errors.PSMError` becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import importlib
import logging
import sys

from ..errors import PSMError
from .base import error_line

#: subcommand -> "module:function" (relative to this package), imported when the command runs
COMMANDS: dict[str, str] = {
    "query": "map:cmd_query",
    "info": "info:cmd_info",
    "levels": "levels:cmd_levels",
    "weights": "weights:cmd_weights",
    "convert": "convert:cmd_convert",
    "serve": "serve:cmd_serve",
    "points": "places:cmd_points",
    "zonal": "places:cmd_zonal",
    "assess": "assess:cmd_assess",
    "train": "train:cmd_train",
    "evaluate": "train:cmd_evaluate",
    "build-shards": "train:cmd_build_shards",
    "qgis": "qgis:cmd_qgis",
}
#: what runs when the first argument is no subcommand
DEFAULT = "map:cmd_map"


def command(name: str):
    """The function that runs subcommand ``name`` (or the map run for anything else)."""
    module, func = COMMANDS.get(name, DEFAULT).split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), func)


#: seconds of a command's start-up during which the garbage collector does not run
STARTUP_SECONDS = 3.0


def quiet_startup(seconds: float = STARTUP_SECONDS) -> None:
    """No garbage collection during the program's start-up, then as usual.

    Start-up (torch, the GDAL bindings, zarr, the model) makes about a million long-lived objects,
    and CPython's collector walks all of them again each time they grow by a quarter: ~0.5 s of
    a 3 s ``psm-map query``. The collector is off for the first ``seconds``; then what start-up
    made is frozen (:func:`gc.freeze`: never walked again) and collection resumes, so a long run
    collects as always. Called for the program (``psm-map``, ``python -m psm_mapping.cli``), not
    when a notebook or test calls :func:`main` with arguments."""
    import gc
    import threading

    def resume():
        gc.freeze()
        gc.enable()

    gc.disable()
    timer = threading.Timer(seconds, resume)
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        quiet_startup()
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    from ..gdal_log import route_gdal_messages

    route_gdal_messages()  # GDAL's own lines stay in the log; its errors arrive as one line
    try:
        if argv and argv[0] in COMMANDS:
            return command(argv[0])(argv[1:])
        return command("")(argv)
    except PSMError as exc:
        print(error_line(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("psm-map: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `psm-map info STORE | head`: the reader left, nothing to say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as exc:  # a file system refusing a write we did not foresee: still one line
        where = f" at {exc.filename}" if getattr(exc, "filename", None) else ""
        print(f"psm-map: error: {exc.strerror or exc}{where}: free space or choose another "
              "--out / --store folder you can write", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "command", "main", "quiet_startup"]
