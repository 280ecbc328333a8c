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

from .engine import QueryMatrix, Refusion, Window, plane_similarity, window_plane
from .grid import iter_blocks
from .store import EmbeddingStore


#: bytes of float16 ``mean`` per window of :func:`output_windows` (whole blocks; one read each)
WINDOW_BYTES = 64 << 20


def output_windows(store: EmbeddingStore, size: int | None = None) -> list[Window]:
    """The output grid's windows, row-major: bands of whole blocks (one block row high, as many
    blocks wide as :data:`WINDOW_BYTES` of means allow: one read per window, its chunks decoded
    concurrently); ``size``: square windows of that many pixels instead."""
    s = store.spec
    if size:
        return [Window.of_block(b) for b in iter_blocks(s.height, s.width, int(size))]
    bs = s.block_size
    step = max(1, WINDOW_BYTES // (bs * bs * s.fc_dim * 2)) * bs
    return [Window(r, c, min(bs, s.height - r), min(step, s.width - c))
            for r in range(0, s.height, bs) for c in range(0, s.width, step)]


def _zooms(store, zoom_indices):
    return list(range(len(store.spec.zoom_levels)) if zoom_indices is None else zoom_indices)


def _read(store, window, refusion, zs):
    return [window_plane(store, k, window, 0, refusion) for k in zs]


def _compute(store, window, planes, queries) -> tuple[np.ndarray, np.ndarray]:
    sim = np.empty((len(queries), len(planes), window.height, window.width), np.float32)
    unc = np.empty((len(planes), window.height, window.width), np.float32)
    for i, p in enumerate(planes):
        r = plane_similarity(store, p, window, queries)
        sim[:, i], unc[i] = r.similarity, r.uncertainty
    return sim, unc


def window_maps(store: EmbeddingStore, queries: QueryMatrix, window: Window, refusion: Refusion | None = None,
                zoom_indices: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One window's similarity ``[Q, Z, h, w]`` and uncertainty ``[Z, h, w]`` (float32, NaN where
    the store computed nothing), every zoom (or ``zoom_indices``) on the output grid."""
    return _compute(store, window, _read(store, window, refusion, _zooms(store, zoom_indices)), queries)


def map_windows(store: EmbeddingStore, queries: QueryMatrix, refusion: Refusion | None = None,
                windows: Iterable[Window] | None = None, zoom_indices: Sequence[int] | None = None
                ) -> Iterator[tuple[Window, np.ndarray, np.ndarray]]:
    """``(window, similarity [Q, Z, h, w], uncertainty [Z, h, w])`` for each window (default
    :func:`output_windows`, row-major): the whole map, one window in memory at a time (and the next
    one being read: the read of window i+1 overlaps the product of window i)."""
    from concurrent.futures import ThreadPoolExecutor

    zs = _zooms(store, zoom_indices)
    ws = list(output_windows(store) if windows is None else windows)
    if not ws:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="psm-read") as pool:
        nxt = pool.submit(_read, store, ws[0], refusion, zs)
        for i, w in enumerate(ws):
            planes = nxt.result()
            if i + 1 < len(ws):
                nxt = pool.submit(_read, store, ws[i + 1], refusion, zs)
            sim, unc = _compute(store, w, planes, queries)
            yield w, sim, unc
