"""Store levels: overviews of embeddings, per zoom, 2x, 4x, ... coarser.

Level ``k`` of a zoom groups its grid's pixels (cells of the zoom's own grid for a scale-true
store, :mod:`psm_mapping.zoomgrid`) in squares of ``2**k`` x ``2**k`` and keeps, per square
(a *level cell*), over its **DONE pixels with an embedding** (status DONE and a finite ``mean``):

- ``mean_sum``  float32 ``[Z, Hk, Wk, D]``: the sum of the stored (float16) means,
- ``stats``     float64 ``[Z, Hk, Wk, 3]``: the sum of ``var_sum``, the count, the sum of ``uncertainty``,
- ``z_img``     float16 ``[Z, Hk, Wk, D]``: the average pre-fusion projector output (for re-fusion).

An overview value is the *average* over those pixels (sum / count): similarity is linear in the
mean and ``var_sum`` (``csd = 2 <mu, q> - 2 - var_sum - var_sum_q``; cosine is ``<mu, q>``), so the
similarity of a level cell's averages equals the average of the full-resolution similarities of
its DONE pixels. Float bound (unit query ``q``, ``u = 2**-24``, n <= 4**k pixels per cell): the sums
are a tree of float32 additions of depth ``2k``, so each component of the averaged mean is within
``(2k + 1) u sum|mu|/n`` of the exact average and

    | sim(level cell) - mean(sim(pixels)) | <= 2 (2k + 1) u  +  (2k + 1) u max|var_sum|  +  e_dot

where ``e_dot`` is the float32 dot product's own rounding, the same as at full resolution (at most
``D u`` for unit vectors, in practice ~``sqrt(D) u``). ``tests/test_levels.py`` checks it.

Levels ``1 .. stored_levels(spec)`` are written with each block (:func:`write_block_levels`,
called by :meth:`EmbeddingStore.write_block`): the block size is a multiple of ``2**k`` for those,
so a level cell lies inside one block and depends only on that block's DONE pixels; each block
writes whole chunks of its own (chunk = the block's cells), so a resumed or concurrent run writes
the same cells and no two blocks share a chunk. The chunks carry CRC32C like the store's. Coarser
levels (a cell over several blocks) are summed on read from the top stored level, which holds
one cell per block. A store written before levels existed gets them from :func:`build_levels`
(``psm-map levels STORE``, or automatically when a run or a session opens it writable); until
then :func:`read_sums` computes a window's level from full resolution (exact, slower).
"""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

LEVELS_VERSION = 1
GROUP = "levels"
#: :data:`psm_mapping.store.DONE` (the store imports this module: no import back)
DONE = 1
#: columns of the ``stats`` array
VAR_SUM, COUNT, UNCERTAINTY = 0, 1, 2


def _twos(n: int) -> int:
    """How many times 2 divides ``n`` (0 for odd n)."""
    n, k = int(n), 0
    while n > 0 and n % 2 == 0:
        n //= 2
        k += 1
    return k


def max_level(height: int, width: int) -> int:
    """The level whose one cell covers a ``height`` x ``width`` grid (0 for a single pixel)."""
    n = max(int(height), int(width), 1)
    return int(math.ceil(math.log2(n))) if n > 1 else 0


def stored_levels(spec) -> int:
    """Levels ``1..K`` the store writes per block: as deep as ``block_size`` is a multiple of
    ``2**K`` (a level cell inside one block) and no deeper than one cell over the store."""
    return min(_twos(spec.block_size), max_level(spec.height, spec.width))


def level_shape(spec, k: int) -> tuple[int, int]:
    return -(-spec.height // (1 << k)), -(-spec.width // (1 << k))


def zoom_level_shape(store, zoom_index: int, k: int) -> tuple[int, int]:
    """Cells of level ``k`` over zoom ``zoom_index``'s own grid."""
    g = store.zoom_group(zoom_index)
    return -(-g.height // (1 << k)), -(-g.width // (1 << k))


def create_levels(group, spec) -> None:
    """Create the level arrays (empty: count 0 everywhere) in the store's Zarr ``group``."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    comp = [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"), Crc32cCodec()]
    Z, D, bs = len(spec.zoom_levels), spec.fc_dim, spec.block_size
    root = group.require_group(GROUP)
    for k in range(1, stored_levels(spec) + 1):
        hk, wk = level_shape(spec, k)
        c = bs >> k
        g = root.require_group(str(k))
        for name, shape, chunks, dtype, fill in (
                ("mean_sum", (Z, hk, wk, D), (1, c, c, D), "float32", 0.0),
                ("stats", (Z, hk, wk, 3), (1, c, c, 3), "float64", 0.0),
                ("z_img", (Z, hk, wk, D), (1, c, c, D), "float16", np.nan)):
            if name not in g:
                g.create_array(name, shape=shape, chunks=chunks, dtype=dtype, fill_value=fill,
                               compressors=comp, dimension_names=("zoom", "y", "x", "part"))
    root.attrs.update({"version": LEVELS_VERSION, "stored": stored_levels(spec)})


def has_levels(store) -> bool:
    """True when the store holds levels for every block it computed (built with them, or by
    :func:`build_levels`)."""
    g = store.group
    if GROUP not in g:
        return False
    a = dict(g[GROUP].attrs)
    return a.get("version") == LEVELS_VERSION and bool(a.get("complete"))


def _pool(a: np.ndarray) -> np.ndarray:
    """Sums of 2 x 2 squares over axes 1, 2 of ``a`` ``[Z, h, w, ...]`` (odd edges padded with 0):
    ``(a00 + a01) + (a10 + a11)``, a tree of additions."""
    Z, h, w = a.shape[:3]
    if h % 2 or w % 2:
        p = np.zeros((Z, h + h % 2, w + w % 2) + a.shape[3:], a.dtype)
        p[:, :h, :w] = a
        a = p
    return (a[:, 0::2, 0::2] + a[:, 0::2, 1::2]) + (a[:, 1::2, 0::2] + a[:, 1::2, 1::2])


def pixel_sums(mean, var_sum, status, uncertainty=None, z_img=None) -> dict:
    """Level-0 "sums" of pixels ``[Z, h, w(, D)]``: the values where counted (DONE and a finite
    mean), 0 elsewhere, and the count (1/0)."""
    mean = np.asarray(mean)
    ok = (np.asarray(status) == DONE) & np.isfinite(mean[..., 0])
    vs = np.asarray(var_sum, np.float64)
    out = {"mean_sum": np.where(ok[..., None], mean.astype(np.float32), np.float32(0)),
           "stats": np.stack([np.where(ok & np.isfinite(vs), vs, 0.0), ok.astype(np.float64),
                              np.where(ok, np.nan_to_num(np.asarray(
                                  uncertainty if uncertainty is not None else np.zeros(ok.shape), np.float64)), 0.0)],
                             axis=-1)}
    if z_img is not None:
        z = np.asarray(z_img)
        out["z_sum"] = np.where(ok[..., None] & np.isfinite(z), z.astype(np.float32), np.float32(0))
    return out


def pool_sums(s: dict, times: int = 1) -> dict:
    for _ in range(times):
        s = {n: _pool(v) for n, v in s.items()}
    return s


def write_block_levels(store, block, mean, var_sum, status, uncertainty, z_img) -> None:
    """Write the stored levels' cells of ``block`` from its arrays ``[Zb, h, w(, D)]`` as written
    (the block's final content), one zoom plane at a time."""
    K = stored_levels(store.spec)
    if K == 0 or GROUP not in store.group:
        return
    root = store.group[GROUP]
    zs = range(len(store.spec.zoom_levels))[block.zoom_slice]
    for zi, z in enumerate(zs):
        s = pixel_sums(mean[zi:zi + 1], var_sum[zi:zi + 1], status[zi:zi + 1], uncertainty[zi:zi + 1],
                       z_img[zi:zi + 1])
        for k in range(1, K + 1):
            s = pool_sums(s)
            r0, c0 = block.row_off >> k, block.col_off >> k
            h, w = s["stats"].shape[1:3]
            g = root[str(k)]
            ys, xs = slice(r0, r0 + h), slice(c0, c0 + w)
            g["mean_sum"][z:z + 1, ys, xs, :] = s["mean_sum"]
            g["stats"][z:z + 1, ys, xs, :] = s["stats"]
            cnt = s["stats"][..., COUNT:COUNT + 1]
            with np.errstate(invalid="ignore", divide="ignore"):
                zavg = np.where(cnt > 0, s["z_sum"] / np.maximum(cnt, 1), np.nan)
            g["z_img"][z:z + 1, ys, xs, :] = zavg.astype(np.float16)


def clear_block_levels(store, block) -> None:
    """Empty the stored level cells of ``block`` (its pixels became PENDING)."""
    K = stored_levels(store.spec)
    if K == 0 or GROUP not in store.group:
        return
    nz = len(range(len(store.spec.zoom_levels))[block.zoom_slice])
    for k in range(1, K + 1):
        g = store.group[GROUP][str(k)]
        r0, c0 = block.row_off >> k, block.col_off >> k
        h, w = -(-block.height // (1 << k)), -(-block.width // (1 << k))
        ys, xs = slice(r0, r0 + h), slice(c0, c0 + w)
        zs = block.zoom_slice
        g["mean_sum"][zs, ys, xs, :] = np.zeros((nz, h, w, store.spec.fc_dim), np.float32)
        g["stats"][zs, ys, xs, :] = np.zeros((nz, h, w, 3))
        g["z_img"][zs, ys, xs, :] = np.full((nz, h, w, store.spec.fc_dim), np.nan, np.float16)


def build_levels(store, progress=None) -> int:
    """Create and fill the levels of a store written before levels existed (or rebuild them):
    one pass over every block with computed pixels. Needs the store open for writing. Returns
    the blocks read; ``progress(done, total)`` after each."""
    create_levels(store.group, store.spec)
    blocks = list(store.iter_blocks())
    for i, b in enumerate(blocks):
        st = store.status(b)
        if (st == DONE).any():
            d = store.read_block(b, ("mean", "var_sum", "uncertainty", "z_img"))
            write_block_levels(store, b, d["mean"], d["var_sum"], st, d["uncertainty"], d["z_img"])
        else:
            clear_block_levels(store, b)
        if progress is not None:
            progress(i + 1, len(blocks))
    store.group[GROUP].attrs.update({"complete": True})
    return len(blocks)


def ensure_levels(store, log_fn=None) -> bool:
    """Build the levels of a writable store that lacks them; True when it has them after."""
    if has_levels(store):
        return True
    try:
        if log_fn is not None:
            log_fn(f"store: building its levels (overviews of embeddings, once): {store.url}")
        build_levels(store)
        return True
    except Exception as exc:  # read-only store: answers compute levels from full resolution
        log.warning("could not build the levels of %s (%s): run `psm-map levels %s`", store.url, exc, store.url)
        return False


def read_sums(store, zoom_index: int, k: int, rows: slice, cols: slice, with_z: bool = False) -> dict:
    """Level-``k`` sums of zoom ``zoom_index`` over cells ``rows`` x ``cols`` of its level grid
    (clipped to it): ``{"mean_sum" [h, w, D] float32, "stats" [h, w, 3] float64(, "z_sum")}``.
    Stored levels are read; coarser ones are summed from the top stored level; a store without
    levels (or with a level chunk that does not decode) sums from full resolution."""
    hk, wk = zoom_level_shape(store, zoom_index, k)
    r0, r1 = max(0, rows.start or 0), min(hk, hk if rows.stop is None else rows.stop)
    c0, c1 = max(0, cols.start or 0), min(wk, wk if cols.stop is None else cols.stop)
    K = stored_levels(store.spec) if has_levels(store) else 0
    base = min(k, K)
    if base > 0:
        try:
            return _read_from(store, zoom_index, base, k, r0, r1, c0, c1, with_z)
        except Exception as exc:  # noqa: BLE001 - a corrupt level chunk: full resolution is exact
            log.warning("store %s: level %d does not decode (%s); computing from full resolution "
                        "(`psm-map levels %s` rebuilds the levels)", store.url, base, exc, store.url)
    return _read_from(store, zoom_index, 0, k, r0, r1, c0, c1, with_z)


def _read_from(store, zi: int, base: int, k: int, r0, r1, c0, c1, with_z) -> dict:
    """Sums at level ``k`` from level ``base`` <= k (0: the full-resolution arrays)."""
    f = 1 << (k - base)
    hb, wb = zoom_level_shape(store, zi, base)
    br = slice(r0 * f, min(hb, r1 * f))
    bc = slice(c0 * f, min(wb, c1 * f))
    z = slice(zi, zi + 1)
    if base == 0:
        names = ("mean", "var_sum", "uncertainty", "status") + (("z_img",) if with_z else ())
        d = {n: store.read(n, br, bc, z) for n in names}
        s = pixel_sums(d["mean"], d["var_sum"], d["status"], d["uncertainty"], d.get("z_img"))
    else:
        g = store.group[GROUP][str(base)]
        s = {"mean_sum": np.asarray(g["mean_sum"][z, br, bc, :]), "stats": np.asarray(g["stats"][z, br, bc, :])}
        if with_z:
            zavg = np.asarray(g["z_img"][z, br, bc, :]).astype(np.float32)
            cnt = s["stats"][..., COUNT:COUNT + 1].astype(np.float32)
            s["z_sum"] = np.where(cnt > 0, np.nan_to_num(zavg) * cnt, np.float32(0))
    s = pool_sums(s, k - base)
    h, w = r1 - r0, c1 - c0
    return {n: v[0, :h, :w] for n, v in s.items()}


def averages(s: dict) -> dict:
    """Averages from :func:`read_sums`' sums: ``mean`` float32 ``[h, w, D]``, ``var_sum`` and
    ``uncertainty`` float32 ``[h, w]``, ``count`` int64, (``z_img`` float32); NaN where count 0."""
    cnt = s["stats"][..., COUNT]
    ok = cnt > 0
    n = np.where(ok, cnt, 1.0)
    out = {"count": cnt.astype(np.int64),
           "mean": np.where(ok[..., None], s["mean_sum"] / n[..., None].astype(np.float32), np.nan).astype(np.float32),
           "var_sum": np.where(ok, s["stats"][..., VAR_SUM] / n, np.nan).astype(np.float32),
           "uncertainty": np.where(ok, s["stats"][..., UNCERTAINTY] / n, np.nan).astype(np.float32)}
    if "z_sum" in s:
        out["z_img"] = np.where(ok[..., None], s["z_sum"] / n[..., None].astype(np.float32), np.nan).astype(np.float32)
    return out
