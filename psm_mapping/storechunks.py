"""The embedding store's chunks: creating the arrays (every chunk with a CRC32C checksum), writing
a block (chunks whole, then its status: the commit point), reading blocks back and finding
corrupt ones (a chunk that does not decode, or one missing where the status says DONE).

:class:`ChunkIO` is a part of :class:`~psm_mapping.store.EmbeddingStore` (it uses the store's
``url``, ``group``, ``spec`` and its block status, :class:`~psm_mapping.storestatus.BlockStatus`).
"""
from __future__ import annotations

from dataclasses import asdict

import numpy as np

from .errors import StoreError
from .grid import Block
from .storespec import (ARRAYS, DONE, PENDING, STORE_FORMAT, BlockEmbeddings, CorruptChunkError,
                        _os_error)

__all__ = ["ChunkIO"]


class ChunkIO:
    """Chunk reads and writes of an embedding store."""

    def _create(self, attrs: dict) -> None:
        from zarr.codecs import BloscCodec, Crc32cCodec

        s = self.spec
        Z, H, W, D, bs = len(s.zoom_levels), s.height, s.width, s.fc_dim, s.block_size
        # the checksum makes a flipped bit as detectable as a truncated chunk
        comp = [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"), Crc32cCodec()]
        g = self.group
        for name, dtype in (("z_img", "float16"), ("mean", "float16")):
            g.create_array(name, shape=(Z, H, W, D), chunks=(1, bs, bs, D), dtype=dtype,
                           fill_value=np.nan, compressors=comp,
                           dimension_names=("zoom", "y", "x", "dim"))
        for name in ("var_sum", "uncertainty", "valid"):
            g.create_array(name, shape=(Z, H, W), chunks=(1, bs, bs), dtype="float32",
                           fill_value=np.nan, compressors=comp, dimension_names=("zoom", "y", "x"))
        g.create_array("status", shape=(Z, H, W), chunks=(1, bs, bs), dtype="uint8",
                       fill_value=PENDING, compressors=comp, dimension_names=("zoom", "y", "x"))
        t = s.transform
        xs = t[2] + (np.arange(W) + 0.5) * t[0]
        ys = t[5] + (np.arange(H) + 0.5) * t[4]
        for name, vals in (("x", xs), ("y", ys), ("zoom", np.asarray(s.zoom_levels, dtype=np.int32))):
            a = g.create_array(name, shape=vals.shape, chunks=vals.shape, dtype=vals.dtype,
                               dimension_names=(name,))
            a[:] = vals
        g.attrs.update({**attrs, "format": STORE_FORMAT, "key": s.key(), "spec": asdict(s),
                        "crs_wkt": s.crs_wkt})
        from .levels import GROUP, create_levels

        create_levels(g, s)  # overviews of embeddings, written with each block (levels.py)
        g[GROUP].attrs.update({"complete": True})

    def _check_arrays(self) -> None:
        missing = [a for a in (*ARRAYS, "status") if a not in self.group]
        if missing:
            raise StoreError(f"the store {self.url} is incomplete (missing {', '.join(missing)}): "
                             "remove it and rerun to rebuild it")

    def write_block(self, result: BlockEmbeddings) -> None:
        """Write a block's computed pixels (merged with what the store holds elsewhere in the
        block), chunks whole, then their status (written last: the commit point)."""
        b = result.block
        ys, xs = b.slices
        g = self.group
        new = {n: getattr(result, n) for n in ARRAYS}
        status = (np.full(result.valid.shape, DONE, np.uint8) if result.status is None
                  else np.asarray(result.status, np.uint8).copy())
        keep = status == PENDING
        if keep.any():
            old_status = self.status(b)
            keep &= old_status != PENDING
            try:
                old = self.read_block(b) if keep.any() else None
            except CorruptChunkError:  # unreadable: those pixels are computed again later
                old = None
            if old is not None:  # pixels an earlier run computed: keep them as they are
                for n in ARRAYS:
                    new[n] = new[n].copy()
                    new[n][keep] = old[n][keep]
                status[keep] = old_status[keep]
        zs = b.zoom_slice
        try:
            g["z_img"][zs, ys, xs, :] = new["z_img"]
            g["mean"][zs, ys, xs, :] = new["mean"]
            for n in ("var_sum", "uncertainty", "valid"):
                g[n][zs, ys, xs] = new[n]
            from .levels import write_block_levels

            # the block's level cells (before the status: a killed write is recomputed whole)
            write_block_levels(self, b, new["mean"], new["var_sum"], status, new["uncertainty"], new["z_img"])
            g["status"][zs, ys, xs] = status
        except OSError as exc:
            raise _os_error(exc, self.url, f"write block {b.index} of the embedding store") from None

    def reset_blocks(self, blocks) -> None:
        """Mark ``blocks`` PENDING everywhere (e.g. after a corrupt chunk): the next run
        computes them again."""
        from .levels import clear_block_levels

        for b in blocks:
            ys, xs = b.slices
            self.group["status"][b.zoom_slice, ys, xs] = np.zeros((self._nz(b), b.height, b.width), np.uint8)
            clear_block_levels(self, b)

    def find_corrupt_blocks(self, names=(*ARRAYS, "status")) -> list[Block]:
        """Blocks with a chunk that does not decode (checksum mismatch, truncation)."""
        bad = []
        for b in self.iter_blocks():
            try:
                self.read_block(b, names)
            except StoreError:
                bad.append(b)
        return bad

    def read_block(self, block: Block, names=ARRAYS, zoom_index: int | slice = slice(None)) -> dict:
        """``{name: array}`` of one block (a :class:`StoreError` if a chunk does not decode)."""
        ys, xs = block.slices
        if isinstance(zoom_index, slice) and zoom_index == slice(None):
            zoom_index = block.zoom_slice
        return self.read_arrays(names, ys, xs, zoom_index, where=f"block {block.index}")

    def read(self, name: str, ys: slice = slice(None), xs: slice = slice(None),
             zoom_index: int | slice = slice(None), where: str = "") -> np.ndarray:
        """``name[zoom, ys, xs(, :)]`` in one read (several chunks decode concurrently); a chunk
        that does not decode is a :class:`StoreError`."""
        return self.read_arrays((name,), ys, xs, zoom_index, where)[name]

    def read_arrays(self, names, ys: slice = slice(None), xs: slice = slice(None),
                    zoom_index: int | slice = slice(None), where: str = "") -> dict[str, np.ndarray]:
        """``{name: name[zoom, ys, xs(, :)]}`` of one region: :meth:`read` for several arrays, with
        ``status`` and ``valid`` read once for all their missing-chunk checks."""
        at = where or f"rows {ys.start}..{ys.stop}, columns {xs.start}..{xs.stop}"
        out = {n: self._read_one(n, ys, xs, zoom_index, at) for n in names}
        must = [n for n in names if n in self._must_be_present()]
        if must:
            try:
                st = out["status"] if "status" in out else np.asarray(self._array("status")[zoom_index, ys, xs])
                valid = out["valid"] if "valid" in out else np.asarray(self._array("valid")[zoom_index, ys, xs])
            except Exception:  # unreadable status or valid: found when those are read
                return out
            for n in must:
                self._check_present(n, out[n], np.asarray(st), np.asarray(valid), at)
        return out

    def _read_one(self, name: str, ys: slice, xs: slice, zoom_index: int | slice, at: str) -> np.ndarray:
        a = self._array(name)
        try:
            return a[zoom_index, ys, xs, :] if a.ndim == 4 else a[zoom_index, ys, xs]
        except Exception as exc:  # a chunk that does not decode (truncated, overwritten)
            raise CorruptChunkError(f"the store {self.url} has a corrupt chunk in {name!r} at {at} "
                                    f"({type(exc).__name__}: {exc}): rerun the map command that "
                                    "built it (it recomputes corrupt blocks), or remove the store"
                                    ) from None

    def _must_be_present(self) -> tuple[str, ...]:
        """Arrays holding a value at every DONE pixel whose chip was embedded (valid >= min_valid)."""
        return ("z_img", "mean", "var_sum", "uncertainty", "valid") if self.spec.probabilistic else \
            ("z_img", "mean", "valid")

    def _check_present(self, name: str, data, st: np.ndarray, valid: np.ndarray, at: str) -> None:
        """A chunk missing where the status says DONE is corruption, found like a bad checksum: a
        missing chunk reads as its fill value (NaN), so a DONE pixel whose chip was embedded
        (valid >= min_valid) with NaN in ``name`` (or a DONE pixel with NaN ``valid``) means the
        chunk is gone (a whole chunk of NaN is never written for such pixels)."""
        done = st == DONE
        if not done.any():
            return
        first = np.asarray(data)[..., 0] if np.ndim(data) == st.ndim + 1 else np.asarray(data)
        if name == "valid":
            bad = done & np.isnan(first)
        else:
            # a hair above min_valid: the fraction was compared before its float32 rounding
            bad = done & (np.nan_to_num(valid, nan=-1.0) >= self.spec.min_valid + 1e-6) & np.isnan(first)
        if bad.any():
            raise CorruptChunkError(f"the store {self.url} has a corrupt (missing) chunk in {name!r} at {at}: "
                                    f"{int(bad.sum())} computed pixels read as empty: rerun the map command that "
                                    "built it (it recomputes corrupt blocks), or remove the store")

    def _array(self, name: str):
        """The Zarr array ``name``, opened once per store object (its metadata read once)."""
        arrays = self.__dict__.setdefault("_arrays", {})
        if name not in arrays:
            arrays[name] = self.group[name]
        return arrays[name]
