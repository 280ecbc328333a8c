"""Site chips -> the point store: one chip per distinct site and zoom, cut exactly as a map grid
cuts the chip of a pixel centred there (:meth:`psm_mapping.tiling.ChipReader.chips_at`: same
lattice, same read tiles, same resampling), embedded in batches across sites.

Sites are projected to their UTM zone (as a map grid over them would be) or to one given CRS; a
reader per CRS keeps its tile cache across chunks. The next chunk's chips are read in a thread
while the model embeds the current one.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..store import DONE, FAULT
from ..tiling import ChipReader, normalize_chips
from .store import PointStore


@dataclass
class PointTimings:
    """Seconds reading chips, on the image model and writing the store; chips embedded."""

    read_s: float = 0.0
    model_s: float = 0.0
    write_s: float = 0.0
    chips: int = 0


class ImageModel:
    """``z_img`` of uint8 chips at given zooms, in batches; ``calls`` counts model calls."""

    def __init__(self, model, device, batch_size: int = 64):
        self.model, self.device, self.batch_size = model, device, int(batch_size)
        self.calls = 0

    def __call__(self, chips: np.ndarray, zooms: np.ndarray) -> np.ndarray:
        out = np.empty((len(chips), self.model.config.fc_dim), np.float32)
        pin = self.device.type == "cuda"
        for s in range(0, len(chips), self.batch_size):
            x = torch.from_numpy(chips[s:s + self.batch_size])
            if pin:
                x = x.pin_memory()
            x = normalize_chips(x, device=self.device)
            self.calls += 1
            with torch.inference_mode():
                z = self.model.image_features(x, torch.as_tensor(zooms[s:s + self.batch_size], dtype=torch.long))
            out[s:s + len(x)] = z.cpu().numpy()
        return out


def site_crs(lonlat: np.ndarray, crs=None) -> list:
    """The chip CRS of each site: its UTM zone (``crs`` None) or ``crs`` for all."""
    from pyproj import CRS

    from ..grid import utm_crs_for

    if crs is not None:
        c = CRS.from_user_input(crs)
        return [c] * len(lonlat)
    return [utm_crs_for(float(lo), float(la)) for lo, la in lonlat]


class ChipSource:
    """Chips of sites: one :class:`ChipReader` per CRS, kept across chunks."""

    def __init__(self, source, sat_type: str, lonlat: np.ndarray, crs=None):
        from pyproj import Transformer

        self.source, self.sat_type = source, sat_type
        crss = site_crs(lonlat, crs)
        wkts = np.asarray([c.to_wkt() for c in crss], dtype=object)
        self.groups: dict[str, ChipReader] = {}
        self.x = np.empty(len(lonlat))
        self.y = np.empty(len(lonlat))
        self.crs_key = wkts
        for c in {w: c for w, c in zip(wkts, crss)}.values():
            key = c.to_wkt()
            idx = np.nonzero(wkts == key)[0]
            x, y = Transformer.from_crs("EPSG:4326", c, always_xy=True).transform(lonlat[idx, 0], lonlat[idx, 1])
            self.x[idx], self.y[idx] = x, y
            self.groups[key] = ChipReader(source, c, sat_type)

    def read(self, sl: slice, zoom_levels) -> dict:
        """Chips ``[Z * n, 3, 224, 224]`` of sites ``sl`` zoom by zoom, their zooms, valid fractions
        and faults (``[Z, n]`` each)."""
        idx = np.arange(sl.start, sl.stop)
        n, Z = len(idx), len(zoom_levels)
        chips = np.zeros((Z * n, 3, 224, 224), np.uint8)
        valid = np.zeros((Z, n), np.float32)
        fault = np.zeros((Z, n), bool)
        keys = self.crs_key[idx]
        for k, z in enumerate(zoom_levels):
            for key, reader in self.groups.items():
                m = np.nonzero(keys == key)[0]
                if not len(m):
                    continue
                c, v, f = reader.chips_at(self.x[idx[m]], self.y[idx[m]], int(z))
                chips[k * n + m], valid[k, m], fault[k, m] = c, v, f
        zooms = np.repeat(np.asarray(zoom_levels, np.int64), n)
        return {"chips": chips, "zooms": zooms, "valid": valid, "fault": fault}


def fill_point_store(store: PointStore, chip_source: ChipSource, image_model: ImageModel,
                     progress: bool = False, timings: PointTimings | None = None, log_fn=None) -> int:
    """Embed every site chunk the store lacks; returns the number of chunks computed. Chips with
    valid fraction below the store's ``min_valid`` are not embedded (DONE, NaN); chips touching a
    failed read are FAULT (NaN, retried by the next run). A local store takes the map store's lock
    per chunk (:class:`~psm_mapping.store.BlockLocks`): chunks another live run is computing are
    left to it and waited for at the end, so two runs compute each chunk once."""
    from tqdm.auto import tqdm

    from ..locks import BlockLocks

    t = timings if timings is not None else PointTimings()
    spec = store.spec
    zl = tuple(spec.zoom_levels)
    todo = store.pending_chunks()
    if not todo:
        return 0
    bar = tqdm(total=sum(c.stop - c.start for c in todo), unit="site", desc="embedding sites",
               disable=not progress)
    locks = BlockLocks(store.url)
    queue, deferred, done = list(todo), [], [0]

    def key(sl: slice) -> tuple:
        return ("sites", sl.start)

    def claim(wait_list: list) -> slice | None:
        """The next chunk this run holds the lock of and that is still to compute."""
        while queue:
            sl = queue.pop(0)
            if not locks.acquire(key(sl)):
                wait_list.append(sl)
                continue
            if store.chunk_pending(sl):  # fresh: another run may have finished it meanwhile
                return sl
            locks.release(key(sl))
            bar.update(sl.stop - sl.start)
        return None

    def read(sl):
        t0 = time.perf_counter()
        r = chip_source.read(sl, zl)
        return r, time.perf_counter() - t0

    def embed(sl, r) -> None:
        n = sl.stop - sl.start
        keep = (r["valid"] >= spec.min_valid) & ~r["fault"]
        z_img = np.full((len(zl), n, spec.fc_dim), np.nan, np.float32)
        flat = keep.reshape(-1)
        if flat.any():
            t0 = time.perf_counter()
            z = image_model(r["chips"][flat], r["zooms"][flat])
            t.model_s += time.perf_counter() - t0
            t.chips += int(flat.sum())
            z_img.reshape(-1, spec.fc_dim)[flat] = z
        status = np.where(r["fault"], FAULT, DONE).astype(np.uint8)
        valid = np.where(r["fault"], np.nan, r["valid"]).astype(np.float32)
        t0 = time.perf_counter()
        store.write_chunk(sl, z_img, valid, status)
        t.write_s += time.perf_counter() - t0
        locks.release(key(sl))
        done[0] += 1
        bar.update(n)

    try:
        with ThreadPoolExecutor(1, thread_name_prefix="psm-sites") as pool:
            sl = claim(deferred)
            fut = pool.submit(read, sl) if sl is not None else None
            while sl is not None:
                r, dt = fut.result()
                t.read_s += dt
                nxt = claim(deferred)
                fut = pool.submit(read, nxt) if nxt is not None else None
                embed(sl, r)
                sl = nxt
        if deferred and log_fn is not None:
            who = sorted({locks.holder(key(c)) or "?" for c in deferred})
            log_fn(f"waiting for {len(deferred)} site chunks that another run ({', '.join(who)}) is computing "
                   "in this point store")
        while deferred:
            queue[:] = deferred
            deferred = []
            while (sl := claim(deferred)) is not None:
                r, dt = read(sl)
                t.read_s += dt
                embed(sl, r)
            if deferred:
                time.sleep(0.5)
    finally:
        bar.close()
        locks.release_all()
    return done[0]
