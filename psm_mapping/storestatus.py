"""The embedding store's block status: which pixels of which block are PENDING, DONE or FAULT,
per zoom and on each zoom's own grid; what a run still has to compute (resume).

:class:`BlockStatus` is a part of :class:`~psm_mapping.store.EmbeddingStore` (it uses the
store's ``group`` and ``spec``).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from .grid import Block, iter_blocks
from .storespec import DONE

__all__ = ["BlockStatus"]


class BlockStatus:
    """Pixel status of an embedding store, by block and by zoom grid."""

    # ------------------------------------------------------------------ blocks
    def block_index(self, block: Block) -> tuple[int, int]:
        bs = self.spec.block_size
        return block.row_off // bs, block.col_off // bs

    def status(self, block: Block | None = None) -> np.ndarray:
        """uint8 ``[Z, h, w]`` pixel status of ``block`` (default: the whole grid). A status chunk
        that does not decode reads as PENDING (its block is computed again)."""
        if block is not None:
            ys, xs = block.slices
            try:
                return np.asarray(self.group["status"][block.zoom_slice, ys, xs])
            except Exception:  # a corrupt status chunk: recompute the block
                return np.zeros((self._nz(block), block.height, block.width), np.uint8)
        try:
            return np.asarray(self.group["status"][:])
        except Exception:
            out = np.zeros((len(self.spec.zoom_levels), self.spec.height, self.spec.width), np.uint8)
            for b in self.iter_blocks():
                out[(b.zoom_slice, *b.slices)] = self.status(b)
            return out

    def _nz(self, block: Block) -> int:
        return len(range(len(self.spec.zoom_levels))[block.zoom_slice])

    # ------------------------------------------------------------------ zoom grids
    @property
    def groups(self):
        """The zoom grids (:class:`~psm_mapping.zoomgrid.ZoomGroup`): dense stores have one, the
        output grid with every zoom; each zoom's arrays fill the top-left ``height`` x ``width``
        of its plane of the ``[zoom, y, x]`` arrays."""
        from .zoomgrid import zoom_groups

        return zoom_groups(self.spec.height, self.spec.width, self.spec.factors)

    def zoom_group(self, zoom_index: int):
        from .zoomgrid import group_of

        return group_of(self.groups, zoom_index)

    def zoom_status(self, zoom_index: int) -> np.ndarray:
        """uint8 ``[h, w]``: status of zoom ``zoom_index`` on its own grid."""
        g = self.zoom_group(zoom_index)
        try:
            return np.asarray(self.group["status"][zoom_index, :g.height, :g.width])
        except Exception:
            return self.status()[zoom_index, :g.height, :g.width]

    def pending(self, block: Block, need: np.ndarray, status: np.ndarray | None = None) -> np.ndarray:
        """bool ``[Z, h, w]``: pixels of ``need`` (bool [h, w], e.g. the region) not DONE yet."""
        st = self.status(block) if status is None else status
        return need[None] & (st != DONE)

    def is_done(self, block: Block, need: np.ndarray | None = None) -> bool:
        """True when every pixel of ``need`` (default: the whole block) is DONE at every zoom."""
        need = np.ones((block.height, block.width), bool) if need is None else need
        return not self.pending(block, need).any()

    def done_mask(self, zoom_index: int | None = None) -> np.ndarray:
        """bool ``[block rows, block columns]``: blocks with computed pixels (``zoom_index``: the
        blocks of that zoom's own grid)."""
        st = self.status()
        bs = self.spec.block_size
        if zoom_index is not None:
            g = self.zoom_group(zoom_index)
            out = np.zeros((-(-g.height // bs), -(-g.width // bs)), bool)
            for b in iter_blocks(g.height, g.width, bs):
                out[b.index] = bool((st[(zoom_index, *b.slices)] == DONE).any())
            return out
        nby, nbx = -(-self.spec.height // bs), -(-self.spec.width // bs)
        out = np.zeros((nby, nbx), bool)
        for b in iter_blocks(self.spec.height, self.spec.width, bs):
            out[b.index] = bool((st[(slice(None), *b.slices)] == DONE).any())
        return out

    def iter_blocks(self) -> Iterator[Block]:
        """Every block of the store's grid (done or not), row-major; a store with zooms on their own
        grids (scale-true sampling): the blocks of each zoom grid in turn (``Block.zooms`` set)."""
        from dataclasses import replace

        bs = self.spec.block_size
        if self.spec.dense:
            yield from iter_blocks(self.spec.height, self.spec.width, bs)
            return
        for g in self.groups:
            for b in iter_blocks(g.height, g.width, bs):
                yield replace(b, zooms=g.zooms)
