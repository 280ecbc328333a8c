"""The embedding store: a Zarr group (any fsspec URL) holding, per zoom level and grid pixel,
``z_img`` (pre-fusion projector output, float16), the normalised ``mean`` (float16), ``var_sum``
and ``uncertainty`` (float32) for the store's metadata settings, and the chip ``valid`` fraction.

Image embeddings are expensive and query-independent: a store is keyed by the grid, the imagery,
the checkpoint, the zoom levels and the tiler settings, and written block by block. A block's
chunks are written whole, then its ``done`` flag; a killed run resumes with the missing blocks
and ends with the same store as an uninterrupted run.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np

from .errors import StoreError
from .grid import Block, OutputGrid, iter_blocks

log = logging.getLogger(__name__)

STORE_FORMAT = "psm-mapping-store/1"
ARRAYS = ("z_img", "mean", "var_sum", "uncertainty", "valid")


@dataclass
class StoreSpec:
    """Everything that determines the store's content (and so its key)."""

    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int
    stride: float
    block_size: int
    zoom_levels: tuple[int, ...]
    sat_type: str
    checkpoint_sha256: str
    imagery: str
    min_valid: float
    fc_dim: int
    probabilistic: bool
    #: metadata behind the stored ``mean``/``var_sum`` (z_img does not depend on it)
    metadata: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        d = asdict(self)
        d.pop("metadata")
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]

    @classmethod
    def for_grid(cls, grid: OutputGrid, *, block_size: int, zoom_levels, checkpoint_sha256: str,
                 imagery: str, min_valid: float, fc_dim: int, probabilistic: bool,
                 metadata: dict | None = None) -> "StoreSpec":
        return cls(crs_wkt=grid.crs.to_wkt(), transform=tuple(grid.transform)[:6], width=grid.width,
                   height=grid.height, stride=float(grid.stride), block_size=int(block_size),
                   zoom_levels=tuple(int(z) for z in zoom_levels), sat_type=grid.sat_type,
                   checkpoint_sha256=checkpoint_sha256, imagery=imagery, min_valid=float(min_valid),
                   fc_dim=int(fc_dim), probabilistic=bool(probabilistic), metadata=dict(metadata or {}))


@dataclass
class BlockEmbeddings:
    """One block's results, per zoom: arrays ``[Z, h, w(, D)]``."""

    block: Block
    z_img: np.ndarray  # float16 [Z, h, w, D]
    mean: np.ndarray  # float16 [Z, h, w, D]
    var_sum: np.ndarray  # float32 [Z, h, w]
    uncertainty: np.ndarray  # float32 [Z, h, w]
    valid: np.ndarray  # float32 [Z, h, w]
    chips: int = 0
    faults: int = 0


def _open_group(url: str, mode: str, storage_options: dict | None = None):
    import zarr

    try:
        return zarr.open_group(store=url, mode=mode, storage_options=storage_options or None)
    except (FileNotFoundError, KeyError) as exc:
        raise StoreError(f"no embedding store at {url} ({exc}): give the path of a store a "
                         "previous run wrote (see `psm-map info`)") from None
    except Exception as exc:  # zarr raises various errors on corrupt metadata
        raise StoreError(f"cannot open the store {url} ({type(exc).__name__}: {exc}): "
                         "remove it and rerun to rebuild it") from None


class EmbeddingStore:
    """A Zarr group with arrays ``z_img mean var_sum uncertainty valid`` over ``(zoom, y, x[, dim])``
    and a ``done`` flag per block."""

    def __init__(self, url: str, group, spec: StoreSpec):
        self.url, self.group, self.spec = url, group, spec

    # ------------------------------------------------------------------ open / create
    @classmethod
    def open_or_create(cls, url: str, spec: StoreSpec, attrs: dict | None = None,
                       storage_options: dict | None = None) -> "EmbeddingStore":
        """Open the store at ``url`` if it was built with ``spec``'s settings, else create it."""
        try:
            group = _open_group(url, "r+", storage_options)
        except StoreError:
            group = None
        if group is not None and group.attrs.get("format") == STORE_FORMAT:
            found = group.attrs.get("key")
            if found != spec.key():
                raise StoreError(f"the store {url} was built with other settings (key {found} != "
                                 f"{spec.key()}): pass another --store folder or remove it")
            store = cls(url, group, spec)
            store._check_arrays()
            return store
        if group is not None and len(list(group.keys())) > 0:
            raise StoreError(f"{url} holds something that is not a psm-mapping store: choose an "
                             "empty or new --store folder")
        group = _open_group(url, "w", storage_options)
        store = cls(url, group, spec)
        store._create(attrs or {})
        return store

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None, mode: str = "r") -> "EmbeddingStore":
        """Open an existing store (``mode="r+"`` to write blocks, e.g. from a dask worker)."""
        group = _open_group(url, mode, storage_options)
        if group.attrs.get("format") != STORE_FORMAT:
            raise StoreError(f"{url} is not a psm-mapping embedding store: pass the .zarr folder "
                             "that `psm-map` wrote under --store")
        spec = StoreSpec(**{**group.attrs["spec"], "zoom_levels": tuple(group.attrs["spec"]["zoom_levels"]),
                            "transform": tuple(group.attrs["spec"]["transform"])})
        store = cls(url, group, spec)
        store._check_arrays()
        return store

    def _create(self, attrs: dict) -> None:
        from zarr.codecs import BloscCodec

        s = self.spec
        Z, H, W, D, bs = len(s.zoom_levels), s.height, s.width, s.fc_dim, s.block_size
        comp = [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle")]
        g = self.group
        for name, dtype in (("z_img", "float16"), ("mean", "float16")):
            g.create_array(name, shape=(Z, H, W, D), chunks=(1, bs, bs, D), dtype=dtype,
                           fill_value=np.nan, compressors=comp,
                           dimension_names=("zoom", "y", "x", "dim"))
        for name in ("var_sum", "uncertainty", "valid"):
            g.create_array(name, shape=(Z, H, W), chunks=(1, bs, bs), dtype="float32",
                           fill_value=np.nan, compressors=comp, dimension_names=("zoom", "y", "x"))
        nby, nbx = -(-H // bs), -(-W // bs)
        g.create_array("done", shape=(nby, nbx), chunks=(1, 1), dtype="uint8", fill_value=0,
                       dimension_names=("block_y", "block_x"))
        t = s.transform
        xs = t[2] + (np.arange(W) + 0.5) * t[0]
        ys = t[5] + (np.arange(H) + 0.5) * t[4]
        for name, vals in (("x", xs), ("y", ys), ("zoom", np.asarray(s.zoom_levels, dtype=np.int32))):
            a = g.create_array(name, shape=vals.shape, chunks=vals.shape, dtype=vals.dtype,
                               dimension_names=(name,))
            a[:] = vals
        g.attrs.update({**attrs, "format": STORE_FORMAT, "key": s.key(), "spec": asdict(s),
                        "crs_wkt": s.crs_wkt})

    def _check_arrays(self) -> None:
        missing = [a for a in (*ARRAYS, "done") if a not in self.group]
        if missing:
            raise StoreError(f"the store {self.url} is incomplete (missing {', '.join(missing)}): "
                             "remove it and rerun to rebuild it")

    # ------------------------------------------------------------------ blocks
    def block_index(self, block: Block) -> tuple[int, int]:
        bs = self.spec.block_size
        return block.row_off // bs, block.col_off // bs

    def is_done(self, block: Block) -> bool:
        i, j = self.block_index(block)
        return bool(self.group["done"][i, j])

    def done_mask(self) -> np.ndarray:
        return np.asarray(self.group["done"][:], dtype=bool)

    def write_block(self, result: BlockEmbeddings) -> None:
        """Write a block's chunks whole, then mark it done (the flag is written last)."""
        b = result.block
        ys, xs = b.slices
        g = self.group
        g["z_img"][:, ys, xs, :] = result.z_img
        g["mean"][:, ys, xs, :] = result.mean
        g["var_sum"][:, ys, xs] = result.var_sum
        g["uncertainty"][:, ys, xs] = result.uncertainty
        g["valid"][:, ys, xs] = result.valid
        i, j = self.block_index(b)
        g["done"][i, j] = 1

    def read_block(self, block: Block, names=ARRAYS, zoom_index: int | slice = slice(None)) -> dict:
        ys, xs = block.slices
        return {n: self.read(n, ys, xs, zoom_index, where=f"block {block.index}") for n in names}

    def read(self, name: str, ys: slice = slice(None), xs: slice = slice(None),
             zoom_index: int | slice = slice(None), where: str = "") -> np.ndarray:
        """``name[zoom, ys, xs(, :)]`` in one read (several chunks decode concurrently); a chunk
        that does not decode is a :class:`StoreError`."""
        a = self.group[name]
        try:
            return a[zoom_index, ys, xs, :] if a.ndim == 4 else a[zoom_index, ys, xs]
        except Exception as exc:  # a chunk that does not decode (truncated, overwritten)
            at = where or f"rows {ys.start}..{ys.stop}, columns {xs.start}..{xs.stop}"
            raise StoreError(f"the store {self.url} has a corrupt chunk in {name!r} at {at} "
                             f"({type(exc).__name__}: {exc}): remove the store and rerun to "
                             "rebuild it") from None

    def iter_blocks(self) -> Iterator[Block]:
        """Every block of the store's grid (done or not), row-major."""
        return iter_blocks(self.spec.height, self.spec.width, self.spec.block_size)

    @property
    def attrs(self) -> dict:
        return dict(self.group.attrs)

    def __repr__(self) -> str:
        d = self.done_mask()
        return f"EmbeddingStore({self.url!r}, {int(d.sum())}/{d.size} blocks done)"
