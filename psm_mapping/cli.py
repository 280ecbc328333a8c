"""``psm-map``: a thin command-line layer over the library API.

Any :class:`~psm_mapping.errors.PSMError` becomes one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable

from .errors import PSMError

COMMANDS: dict[str, Callable[[list[str]], int]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the CLI's error form: one line ``psm-map: error: ...`` and exit code 2."""

    def error(self, message: str):  # noqa: D102 (argparse API)
        msg = " ".join(str(message).split())
        self.exit(2, f"psm-map: error: {msg}: fix the value (see `{self.prog} -h`)\n")


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return ArgumentParser(prog=f"psm-map {prog}".strip(), description=description)


@command("convert")
def cmd_convert(argv: list[str]) -> int:
    p = _parser("convert", "Convert an official PSM .ckpt to safetensors (weights + config, memory-mappable).")
    p.add_argument("checkpoint")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--clap-config", help="CLAP config JSON (default: laion/clap-htsat-fused)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    from pathlib import Path

    from .errors import OutputError
    from .model import PSM

    out = Path(a.out)
    if out.suffix != ".safetensors":
        raise OutputError(f"output {out} must end in .safetensors (the converted format): "
                          f"pass e.g. {out.with_suffix('.safetensors')}")
    if out.exists() and not a.overwrite:
        raise OutputError(f"{out} exists: pass --overwrite or choose another output path")
    if not out.parent.is_dir():
        raise OutputError(f"output folder {out.parent} does not exist: create it first")
    model = PSM.from_checkpoint(a.checkpoint, clap_config=a.clap_config)
    model.export_safetensors(out)
    print(f"wrote {out} ({model.config.sat_type}, metadata {model.config.metadata_type}, "
          f"{model.config.loss_type})")
    return 0


@command("serve")
def cmd_serve(argv: list[str]) -> int:
    from .serve.command import main as serve_main  # the explorer's own CLI glue

    return serve_main(argv)


def _demo(argv: list[str]) -> int:
    p = _parser("--demo", "Run the built-in offline demo.")
    p.add_argument("--demo", action="store_true")
    p.add_argument("--out", default="psm-demo-output")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    from .demo import run_demo

    run_demo(a.out, overwrite=a.overwrite, quiet=a.quiet)
    return 0


def cmd_map(argv: list[str]) -> int:
    if "--demo" in argv:
        return _demo(argv)
    from .mapcli import run_map_cli

    return run_map_cli(argv)


def main(argv: list[str] | None = None) -> int:
    from . import mapcli  # noqa: F401  (registers the map, query, info and weights commands)
    from .train import commands  # noqa: F401

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        if argv and argv[0] in COMMANDS:
            return COMMANDS[argv[0]](argv[1:])
        return cmd_map(argv)
    except PSMError as exc:
        msg = " ".join(str(exc).split())
        print(f"psm-map: error: {msg}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("psm-map: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    # run the imported module's main: subcommands register themselves on `psm_mapping.cli`,
    # not on this `__main__` copy
    from psm_mapping.cli import main as _main

    sys.exit(_main())
