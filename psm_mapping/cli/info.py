"""``psm-map info FILE``: what a map, store or checkpoint holds."""
from __future__ import annotations

from pathlib import Path

from .base import ArgumentParser


def cmd_info(argv: list[str]) -> int:
    p = ArgumentParser(prog="psm-map info", description="What a map, store or checkpoint holds.")
    p.add_argument("path")
    a = p.parse_args(argv)
    path = a.path
    if str(path).endswith((".ckpt", ".safetensors")):
        from ..weights import verify

        for k, v in verify(path).items():
            print(f"{k}: {v}")
        return 0
    from ..storeformat import is_point_store

    if is_point_store(path):
        from ..places import PointStore

        st = PointStore.open(path)
        print(repr(st))
        for k, v in st.attrs.get("provenance", {}).items():
            print(f"  {k}: {v}")
        return 0
    if Path(path).is_dir() and (Path(path) / "zarr.json").is_file():
        from ..errors import StoreError
        from ..store import STORE_FORMAT
        from ..storepath import store_attrs_at

        attrs = store_attrs_at(path) or {}
        if attrs.get("format") == "unreadable":
            raise StoreError(f"{Path(path) / 'zarr.json'} is not readable JSON (cut short or overwritten): the "
                             f"metadata of {path} is damaged: restore it from a copy, or remove the folder and rerun "
                             "the command that wrote it")
        if attrs.get("format") == STORE_FORMAT:
            from ..store import EmbeddingStore

            st = EmbeddingStore.open(path)
            print(repr(st))
            zl = st.spec.zoom_levels
            print("  zoom sampling: " + ("dense (every zoom at every pixel)" if st.spec.dense else "scale-true: " + ", ".join(
                f"zoom {zl[k]} on cells of {g.factor} px ({g.height} x {g.width})" for g in st.groups for k in g.indices)))
            for k, v in st.attrs.get("provenance", {}).items():
                print(f"  {k}: {v}")
            if st.attrs.get("tokenizer"):
                print(f"  tokenizer: {st.attrs['tokenizer']}")
            return 0
    from ..outputs import read_info

    print(read_info(path).summary())
    return 0
