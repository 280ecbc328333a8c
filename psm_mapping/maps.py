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


def chunk_windows(store: EmbeddingStore, chunk: int | None = None) -> list[list[Window]]:
    """Rows of square windows of ``chunk`` pixels (default: the largest multiple of the block size
    not over 256: 64 MB of float16 means per task), the chunks of :func:`lazy_maps`."""
    bs = store.spec.block_size
    c = int(chunk or max(bs, (256 // bs) * bs))
    H, W = store.spec.height, store.spec.width
    return [[Window(r, x, min(c, H - r), min(c, W - x)) for x in range(0, W, c)] for r in range(0, H, c)]


def _window_chunk(store, queries, refusion, window, mask) -> np.ndarray:
    sim, unc = window_maps(store, queries, window, refusion)
    out = np.concatenate([sim, unc[None]], axis=0)
    if mask is not None:
        out[:, :, ~mask] = np.nan
    return out


def lazy_maps(store: EmbeddingStore, queries: QueryMatrix, refusion: Refusion | None = None,
              mask: np.ndarray | None = None, chunk: int | None = None, task=None):
    """The whole map as one lazy dask array ``[Q + 1, Z, H, W]`` (similarity per query, then
    uncertainty), one task per window of :func:`chunk_windows`: a writer that computes it chunk
    by chunk (the dask COG/Zarr writers) holds a few windows at a time, whatever the map's size.
    ``mask`` [H, W]: NaN outside. ``task(window, mask, key)``: the chunk's dask Delayed (default:
    :func:`window_maps` with this process's store and refusion, for the local threads;
    :mod:`psm_mapping.distributed` passes one that opens the store on the workers)."""
    import uuid

    import dask
    import dask.array as da

    Q, Z = len(queries), len(store.spec.zoom_levels)
    if task is None:
        def task(w, m, key):
            return dask.delayed(_window_chunk, pure=False)(store, queries, refusion, w, m, dask_key_name=key)
    name = f"psm-window-{uuid.uuid4().hex[:12]}"  # the store and model are not hashed
    rows = []
    for i, row in enumerate(chunk_windows(store, chunk)):
        rows.append([])
        for j, w in enumerate(row):
            shape = (Q + 1, Z, w.height, w.width)
            m = None if mask is None else np.asarray(mask[w.slices], bool)
            if m is not None and not m.any():
                rows[-1].append(da.full(shape, np.nan, dtype=np.float32, chunks=shape))
                continue
            rows[-1].append(da.from_delayed(task(w, m, f"{name}-{i}-{j}"), shape, dtype=np.float32))
    return da.block(rows)


def counted_pixels(store: EmbeddingStore, zoom_index: int = 0) -> int:
    """Pixels of a zoom's grid the store holds an embedding for (from its coarsest level: cheap)."""
    from .engine import max_level, read_plane

    return int(read_plane(store, zoom_index, None, max_level(store, zoom_index), with_mean=False).count.sum())
