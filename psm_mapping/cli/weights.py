"""``psm-map weights [download NAME | verify FILE]``: the 12 official checkpoints."""
from __future__ import annotations

from .base import ArgumentParser


def cmd_weights(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map weights", description="The 12 official PSM checkpoints.")
    sub = p.add_subparsers(dest="action")
    d = sub.add_parser("download", help="fetch one checkpoint into the cache (needs a network; "
                                        "$PSM_WEIGHTS_URL: an HTTP mirror of the authors' folder)")
    d.add_argument("name")
    v = sub.add_parser("verify", help="check a file against the key contract; record its sha256")
    v.add_argument("file")
    v.add_argument("--clap-config")
    a = p.parse_args(argv)
    from .. import weights

    if a.action == "download":
        print(weights.download(a.name))
    elif a.action == "verify":
        for k, val in weights.verify(a.file, clap_config=a.clap_config).items():
            print(f"{k}: {val}")
    else:
        print("\n".join(weights.list_rows()))
        print(f"cache: {weights.cache_dir()}")
    return 0
