"""The parser base every command uses: argparse with the CLI's one-line error form."""
from __future__ import annotations

import argparse
import re

from ..errors import InputError, PSMError, flag  # noqa: F401  (flag: public here too)

#: a value that starts like a negative number: ``-90.3,38.6``, ``-91,38,-90,39``, ``-.5``
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line ``psm-map: error: ...`` and exit code 2."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        msg = " ".join(str(message).split())
        self.exit(2, f"psm-map: error: {msg}: fix the value (see `{self.prog} -h`)\n")

    def parse_known_args(self, args=None, namespace=None):  # noqa: D102 (argparse API)
        import sys

        return super().parse_known_args(self.join_negative_values(sys.argv[1:] if args is None else args),
                                        namespace)

    def join_negative_values(self, args) -> list[str]:
        """``--point -90.3,38.6`` -> ``--point=-90.3,38.6``: a value that starts like a negative
        number after an option taking one value is that option's value (argparse alone reads
        ``-90.3,38.6`` as an unknown option, because of the comma, and asks for the value)."""
        args = list(args)
        out, i = [], 0
        while i < len(args):
            a = args[i]
            action = self._one_value_action(a)
            if action is not None and i + 1 < len(args) and _NEGATIVE_VALUE.match(str(args[i + 1])):
                out.append(f"{a}={args[i + 1]}")
                i += 2
                continue
            out.append(a)
            if a == "--":  # everything after is positional
                out += args[i + 1:]
                break
            i += 1
        return out

    def _one_value_action(self, token):
        """The action of option ``token`` (a unique prefix of a long option counts, as argparse
        allows) when it takes exactly one value, else None."""
        if not isinstance(token, str) or not token.startswith("-") or "=" in token:
            return None
        opts = self._option_string_actions
        action = opts.get(token)
        if action is None and token.startswith("--") and self.allow_abbrev:
            hits = {opts[o] for o in opts if o.startswith(token)}
            action = hits.pop() if len(hits) == 1 else None
        if action is None or action.nargs not in (None, 1):
            return None
        return action if action.option_strings and action.nargs != 0 else None


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


def zooms(text: str) -> tuple[int, ...]:
    """An argparse type: zoom levels like 1,3,5 (the trained range is the library's check)."""
    from ..config import check_zoom_levels

    try:
        return check_zoom_levels(text, upper=None)  # the trained range is the library's check
    except PSMError as exc:
        raise argparse.ArgumentTypeError(exc.cli_message) from None


def imagery_options(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> a dict, values read as YAML scalars (2 -> int, 0.5 -> float)."""
    import yaml

    out = {}
    for it in items:
        key, sep, value = it.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--imagery-option {it!r} is not KEY=VALUE: give e.g. --imagery-option retries=2")
        try:
            out[key.strip().replace("-", "_")] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            out[key.strip().replace("-", "_")] = value
    return out
