"""The parser base every command uses: argparse with the CLI's one-line error form."""
from __future__ import annotations

import argparse

from ..errors import PSMError, flag  # noqa: F401  (flag: public here too)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line ``psm-map: error: ...`` and exit code 2."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        msg = " ".join(str(message).split())
        self.exit(2, f"psm-map: error: {msg}: fix the value (see `{self.prog} -h`)\n")


def parser(prog: str, description: str) -> ArgumentParser:
    return ArgumentParser(prog=f"psm-map {prog}".strip(), description=description)


def error_line(exc: PSMError) -> str:
    """``psm-map: error: ...`` for ``exc``: one line; an error that names its option but not the
    flag gets the flag added."""
    msg = " ".join(exc.cli_message.split())
    option = getattr(exc, "option", None)
    if option and flag(option) not in msg:
        msg = f"{msg} [{flag(option)}]"
    return f"psm-map: error: {msg}"


def ints(text: str) -> tuple[int, ...]:
    """An argparse type: whole numbers separated by commas."""
    try:
        return tuple(int(t) for t in str(text).split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers separated by commas") from None


def whole(name: str, lo: int, hi: int):
    """An argparse type: a whole number (range checks stay with the library)."""

    def parse(text: str) -> int:
        try:
            return int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a whole number: give one of {lo}..{hi}") from None

    parse.__name__ = name
    return parse


def add_query_terms(p: argparse.ArgumentParser) -> None:
    """The query options every scoring command takes: ``--query``, ``--audio``, ``--combine``."""
    p.add_argument("--query", action="append", default=[], metavar="TEXT", help="text query (repeatable)")
    p.add_argument("--audio", action="append", default=[], metavar="FILE", help="audio query (repeatable)")
    p.add_argument("--combine", action="store_true", help="combine each text with each audio as one query")
