"""The map view: a whole map as a stream of windows over the engine.

:func:`map_windows` yields, for each output block of the store's grid (the store's chunks), the
block's similarity ``[Q, Z, h, w]`` and uncertainty ``[Z, h, w]``: every zoom answered by
:func:`psm_mapping.engine.window_similarity` (scale-true zooms resampled to the output grid,
fusion re-run with a :class:`~psm_mapping.engine.Refusion`). A writer that consumes the stream
holds one block at a time: peak memory does not grow with the map (see
:func:`psm_mapping.outputs.write.write_streamed`).
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

from .engine import QueryMatrix, Refusion, Window, window_similarity
from .grid import iter_blocks
from .store import EmbeddingStore


def output_windows(store: EmbeddingStore, size: int | None = None) -> list[Window]:
    """The output grid's windows: its blocks (``size``: blocks of that many pixels instead)."""
    s = store.spec
    return [Window.of_block(b) for b in iter_blocks(s.height, s.width, int(size or s.block_size))]


def window_maps(store: EmbeddingStore, queries: QueryMatrix, window: Window, refusion: Refusion | None = None,
                zoom_indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One window's similarity ``[Q, Z, h, w]`` and uncertainty ``[Z, h, w]`` (float32, NaN where
    the store computed nothing), every zoom (or ``zoom_indices``) on the output grid."""
    zs = range(len(store.spec.zoom_levels)) if zoom_indices is None else zoom_indices
    sim = np.empty((len(queries), len(zs), window.height, window.width), np.float32)
    unc = np.empty((len(zs), window.height, window.width), np.float32)
    for i, k in enumerate(zs):
        r = window_similarity(store, k, window, queries, refusion=refusion)
        sim[:, i], unc[i] = r.similarity, r.uncertainty
    return sim, unc


def map_windows(store: EmbeddingStore, queries: QueryMatrix, refusion: Refusion | None = None,
                windows: Iterable[Window] | None = None, zoom_indices: Sequence[int] | None = None
                ) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """``(window, similarity [Q, Z, h, w], uncertainty [Z, h, w])`` for each window (default the
    output grid's blocks, row-major): the whole map, one window in memory at a time."""
    for w in (output_windows(store) if windows is None else windows):
        sim, unc = window_maps(store, queries, w, refusion, zoom_indices)
        yield w, sim, unc
