"""``psm-map levels STORE``: build (or rebuild) a store's levels, the overviews of its embeddings."""
from __future__ import annotations

from .base import ArgumentParser


def cmd_levels(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map levels",
                       description="Build the levels of an embedding store (overviews of embeddings: per zoom, "
                                   "averages of mean and var_sum over 2x2, 4x4, ... pixels). Stores written by this "
                                   "version have them; an older store gets them here, or on its first use for "
                                   "writing (a map run, `psm-map query`).")
    p.add_argument("store", help="the .zarr store a map run wrote")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    from tqdm.auto import tqdm

    from ..levels import build_levels, stored_levels
    from ..store import EmbeddingStore

    st = EmbeddingStore.open(a.store, mode="r+")
    bar = tqdm(unit="block", desc="levels", disable=a.quiet)

    def progress(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    n = build_levels(st, progress)
    bar.close()
    print(f"levels 1..{stored_levels(st.spec)} stored for {n} blocks of {a.store} (coarser levels are summed on read)")
    return 0
