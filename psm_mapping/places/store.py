"""The point store: image embeddings of sites, a sibling of the map's embedding store.

A Zarr group (``psm-mapping-points/1``) holding, per zoom level and distinct site location,
``z_img`` (the projector output before fusion, float32, so fusion and heads re-run from it give the
map's numbers), the chip's ``valid`` imagery fraction and a ``status`` (:data:`PENDING`,
:data:`DONE`, :data:`FAULT` as in :mod:`psm_mapping.store`), plus the sites' ``lon``/``lat``.

It is keyed by the sites' coordinates, the imagery's identity, the checkpoint, the zoom levels, the
chip CRS rule and ``min_valid`` (:meth:`PointSpec.key`), so a further query over the same sites
runs no image inference. Sites are written in chunks of :data:`SITE_CHUNK`: a chunk's ``z_img`` and
``valid`` first, its ``status`` last (the commit point), so a run killed at any moment resumes with
the chunks that are missing and ends with the same store. A new store is created under a temporary
name and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from ..store import DONE, FAULT, PENDING, create_by_rename  # the map store's status codes
from ..storeformat import POINT_FORMAT, is_point_store, store_format  # noqa: F401  (public here too)
from ..storepath import spec_differences

#: sites per Zarr chunk (the unit of resume)
SITE_CHUNK = 128


@dataclass
class PointSpec:
    """Everything that determines a point store's content (and so its key)."""

    coords_sha256: str
    n_sites: int
    zoom_levels: tuple[int, ...]
    sat_type: str
    checkpoint_sha256: str
    imagery: str
    #: "utm" (each site in its UTM zone, as a map grid over it) or a CRS as WKT
    chip_crs: str
    min_valid: float
    fc_dim: int
    probabilistic: bool

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


def coords_sha256(lonlat: np.ndarray) -> str:
    """The SHA-256 of distinct site coordinates ``[U, 2]`` (sorted, rounded to 1e-9 degrees)."""
    a = np.ascontiguousarray(np.round(np.asarray(lonlat, np.float64), 9))
    return hashlib.sha256(a.tobytes()).hexdigest()


class PointStore:
    """Arrays ``z_img [Z, U, D]``, ``valid [Z, U]``, ``status [Z, U]``, ``lon``/``lat [U]``."""

    def __init__(self, url: str, group, spec: PointSpec):
        self.url, self.group, self.spec = url, group, spec

    # -------------------------------------------------------------- open / create
    @classmethod
    def open(cls, url: str, mode: str = "r") -> "PointStore":
        import zarr

        try:
            g = zarr.open_group(store=str(url), mode=mode)
        except Exception as exc:  # FileNotFoundError, corrupt metadata
            raise StoreError(f"no point store at {url} ({type(exc).__name__}): give the .zarr folder that "
                             "`psm-map points` wrote under --store") from None
        if g.attrs.get("format") != POINT_FORMAT:
            raise StoreError(f"{url} is not a psm-mapping point store: give the .zarr folder that "
                             "`psm-map points` wrote under --store")
        s = dict(g.attrs["spec"])
        s["zoom_levels"] = tuple(s["zoom_levels"])
        missing = [a for a in ("z_img", "valid", "status", "lon", "lat") if a not in g]
        if missing:
            raise StoreError(f"the point store {url} is incomplete (missing {', '.join(missing)}): remove it "
                             "and rerun to rebuild it")
        return cls(str(url), g, PointSpec(**s))

    @classmethod
    def open_or_create(cls, url: str, spec: PointSpec, lonlat: np.ndarray,
                       attrs: dict | None = None) -> "PointStore":
        """The store at ``url`` if it was built with ``spec``, else a new one (made under a
        temporary name and renamed)."""
        path = Path(url)
        if path.exists():
            store = cls.open(url, "r+")
            if store.group.attrs.get("key") != spec.key():
                raise StoreError(f"the point store {url} was built with other settings "
                                 f"({spec_differences(spec, store.group.attrs.get('spec'))}): pass another "
                                 "--store folder or remove it")
            return store
        create_by_rename(path, lambda tmp: _create(tmp, spec, lonlat, attrs or {}), "create the point store")
        return cls.open(url, "r+")

    # -------------------------------------------------------------- content
    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.group.attrs)

    @property
    def lonlat(self) -> np.ndarray:
        return np.column_stack([self.group["lon"][:], self.group["lat"][:]])

    def status(self) -> np.ndarray:
        """uint8 ``[Z, U]``."""
        return np.asarray(self.group["status"][:])

    def chunks(self) -> list[slice]:
        u = self.spec.n_sites
        return [slice(s, min(s + SITE_CHUNK, u)) for s in range(0, u, SITE_CHUNK)]

    def pending_chunks(self) -> list[slice]:
        """Site chunks with a site not DONE at some zoom (never computed, or a read fault), and
        chunks that are corrupt (:meth:`corrupt_chunks`: computed again)."""
        st = self.status()
        bad = {c.start for c in self.corrupt_chunks()}
        return [c for c in self.chunks() if (st[:, c] != DONE).any() or c.start in bad]

    def corrupt_chunks(self) -> list[slice]:
        """Site chunks that do not decode, or whose ``z_img``/``valid`` is missing where the status
        says DONE (a missing chunk reads as NaN: corruption, found like a bad checksum)."""
        st = self.status()
        return [c for c in self.chunks() if self._corrupt(c, st[:, c])]

    def _corrupt(self, c: slice, status: np.ndarray) -> bool:
        try:
            z = np.asarray(self.group["z_img"][:, c, 0], np.float32)
            v = np.asarray(self.group["valid"][:, c], np.float32)
        except Exception:
            return True
        return bool(_missing(status, v, z, self.spec.min_valid).any())

    def chunk_pending(self, c: slice) -> bool:
        """Whether chunk ``c`` is still to compute (read fresh: not DONE at some zoom, or corrupt)."""
        st = np.asarray(self.group["status"][:, c])
        return bool((st != DONE).any()) or self._corrupt(c, st)

    def write_chunk(self, sl: slice, z_img: np.ndarray, valid: np.ndarray, status: np.ndarray) -> None:
        """One chunk's arrays ``[Z, n(, D)]``, ``status`` written last (the commit point)."""
        g = self.group
        try:
            g["z_img"][:, sl, :] = z_img.astype(np.float32)
            g["valid"][:, sl] = valid.astype(np.float32)
            g["status"][:, sl] = status.astype(np.uint8)
        except OSError as exc:
            raise StoreError(f"cannot write the point store {self.url} ({exc.strerror or exc}): free some "
                             "space or pass another --store; finished chunks are kept") from None

    def read(self) -> dict[str, np.ndarray]:
        """``z_img``, ``valid``, ``status`` whole (NaN z_img where not DONE)."""
        try:
            z = np.asarray(self.group["z_img"][:], np.float32)
            v = np.asarray(self.group["valid"][:], np.float32)
        except Exception as exc:  # a chunk that does not decode
            raise StoreError(f"the point store {self.url} has a corrupt chunk ({type(exc).__name__}: {exc}): "
                             "rerun `psm-map points` (it recomputes) or remove the store") from None
        st = self.status()
        bad = _missing(st, v, z[..., 0] if z.ndim == 3 else z, self.spec.min_valid)
        if bad.any():
            raise StoreError(f"the point store {self.url} has a corrupt (missing) chunk: {int(bad.sum())} computed "
                             "site-zooms read as empty: rerun `psm-map points` (it recomputes) or remove the store")
        z[st != DONE] = np.nan
        return {"z_img": z, "valid": v, "status": st}

    def __repr__(self) -> str:
        st = self.status()
        return (f"PointStore({self.url!r}, {self.spec.n_sites:,} distinct sites x zooms "
                f"{','.join(map(str, self.spec.zoom_levels))}: {int((st == DONE).sum()):,} site-zooms done, "
                f"{int((st == FAULT).sum()):,} faults)")


def _missing(status: np.ndarray, valid: np.ndarray, z_first: np.ndarray, min_valid: float) -> np.ndarray:
    """bool: DONE site-zooms whose ``valid`` is NaN, or that were embedded (valid >= min_valid, a
    hair above for float32 rounding) but read NaN in ``z_img``: their chunk is gone."""
    done = status == DONE
    return done & (np.isnan(valid) | ((np.nan_to_num(valid, nan=-1.0) >= min_valid + 1e-6) & np.isnan(z_first)))


def _create(path: Path, spec: PointSpec, lonlat: np.ndarray, attrs: dict) -> None:
    import zarr
    from zarr.codecs import BloscCodec, Crc32cCodec

    g = zarr.open_group(store=str(path), mode="w")
    Z, U, D = len(spec.zoom_levels), spec.n_sites, spec.fc_dim
    c = min(SITE_CHUNK, max(1, U))
    comp = [BloscCodec(cname="lz4", clevel=3, shuffle="shuffle"), Crc32cCodec()]
    g.create_array("z_img", shape=(Z, U, D), chunks=(Z, c, D), dtype="float32", fill_value=np.nan,
                   compressors=comp, dimension_names=("zoom", "site", "dim"))
    g.create_array("valid", shape=(Z, U), chunks=(Z, c), dtype="float32", fill_value=np.nan,
                   compressors=comp, dimension_names=("zoom", "site"))
    g.create_array("status", shape=(Z, U), chunks=(Z, c), dtype="uint8", fill_value=PENDING,
                   compressors=comp, dimension_names=("zoom", "site"))
    for k, name in enumerate(("lon", "lat")):
        a = g.create_array(name, shape=(U,), chunks=(max(1, U),), dtype="float64", dimension_names=("site",))
        a[:] = lonlat[:, k]
    g.attrs.update(json.loads(json.dumps({**attrs, "format": POINT_FORMAT, "key": spec.key(),
                                          "spec": asdict(spec)}, default=str)))
