"""GDAL's messages go through the project's logging, never raw to the user's terminal.

rasterio (and pyogrio) turn GDAL errors into exceptions (``CPLE_*``, ``DataSourceError``), which
the writers, readers and the store map to one :class:`~psm_mapping.errors.PSMError` line; the
messages GDAL signals along the way (the error's text again, warnings such as ``CPLE_AppDefined``)
go to the ``rasterio`` / ``pyogrio`` loggers. :func:`route_gdal_messages` (the command line calls
it once at start) keeps those off the console: they are re-logged at DEBUG under
``psm_mapping.gdal``, so a user sees the one line, and a developer who turns on DEBUG logging
sees everything. GDAL's own default handler (messages signalled outside a rasterio environment)
writes to ``CPL_LOG`` instead of stderr. libtiff prints some write errors straight to stderr,
past GDAL: the COG writer therefore builds its file in memory and writes it with Python
(:func:`psm_mapping.outputs.cog.write_cog_file`).

zarr writes its chunks from futures on its own event loop: when one write fails (a full disk),
the store's error arrives as one line, and the sibling futures that failed the same way are
dropped unread, which makes ``asyncio`` log "Future exception was never retrieved" with a
traceback at ERROR. Those records alone (an unread future whose exception is an ``OSError``) go
the same way (DEBUG under ``psm_mapping.gdal``); every other ``asyncio`` record (the explorer's
server runs on asyncio) reaches the console as before.
"""
from __future__ import annotations

import logging
import os

__all__ = ["GDAL_LOGGERS", "route_gdal_messages"]

#: loggers the GDAL bindings write GDAL's messages to
GDAL_LOGGERS = ("rasterio", "pyogrio", "fiona")
log = logging.getLogger("psm_mapping.gdal")


class _ToProjectLog(logging.Handler):
    """Re-log a GDAL binding's record at DEBUG under ``psm_mapping.gdal``."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = " ".join(record.getMessage().split())
        except Exception:  # a record whose arguments do not format: keep its template
            text = str(record.msg)
        log.debug("%s (%s): %s", record.name, record.levelname, text)


class _UnreadIOFutures(logging.Filter):
    """On the ``asyncio`` logger: an unread future that failed with an ``OSError`` (zarr's sibling
    chunk writes) is re-logged at DEBUG under ``psm_mapping.gdal`` instead of printed."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if str(record.msg).startswith("Future exception was never retrieved") and isinstance(exc, OSError):
            _ToProjectLog().emit(record)
            return False
        return True


def route_gdal_messages() -> None:
    """Send GDAL's messages to :data:`log` at DEBUG (idempotent; call once at program start)."""
    aio = logging.getLogger("asyncio")
    if not any(isinstance(f, _UnreadIOFutures) for f in aio.filters):
        aio.addFilter(_UnreadIOFutures())
    for name in GDAL_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(h, _ToProjectLog) for h in lg.handlers):
            lg.addHandler(_ToProjectLog())
        lg.propagate = False
    # GDAL's default handler (no rasterio environment active): to a log file, not the terminal.
    # Read when GDAL first reports; the user's own CPL_LOG wins.
    os.environ.setdefault("CPL_LOG", os.devnull)
