"""Per-sample metadata for the fusion transformer (PSM_SPEC.md section 3)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..constants import AUDIO_SOURCES, CAPTION_SOURCES
from ..errors import InputError


def _as_array(value: Any, name: str, n: int | None, dtype, unknown: float | None = None) -> np.ndarray | None:
    """``value`` as a flat array; ``None`` items become ``unknown`` (an error where that is None)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        arr = arr.reshape(-1)
        if any(v is None for v in arr):
            if unknown is None:
                raise InputError(f"metadata field {name!r} has missing values: give a number for every "
                                 "sample, or leave the field out")
            arr = np.asarray([unknown if v is None else v for v in arr], dtype=object)
    try:
        arr = arr.astype(dtype).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise InputError(f"metadata field {name!r} is not numeric ({exc}); pass numbers") from None
    return arr


def _source_index(values, names: dict[str, int], field: str) -> np.ndarray:
    lower = {k.lower(): v for k, v in names.items()}
    out = []
    for v in np.asarray(values, dtype=object).reshape(-1):
        if isinstance(v, (str, np.str_)):
            key = str(v).strip().lower()
            if key not in lower:
                raise InputError(
                    f"unknown {field} {v!r}: use one of {', '.join(names)} (or index 0..{len(names) - 1})"
                )
            out.append(lower[key])
        else:
            try:
                iv = int(v)
            except (TypeError, ValueError):
                raise InputError(f"{field} {v!r} is neither a name nor an index: use one of "
                                 f"{', '.join(names)}") from None
            if not 0 <= iv < len(names) or iv != v:
                raise InputError(f"{field} index {v!r} is out of range: use 0..{len(names) - 1} "
                                 f"({', '.join(names)})")
            out.append(iv)
    return np.asarray(out, dtype=np.int64)


@dataclass
class Metadata:
    """Location, time and sources of a batch; arrays, lists or scalars (broadcast to the batch).

    ``month`` 1..12 (0 or None: unknown), ``hour`` 0..23 (-1 or None: unknown); sources are names
    (``yfcc iNat aporee freesound``; ``meta qwen pengi``) or indices. An omitted field is absent.
    Absent and unknown items are masked in the fusion transformer.
    """

    lat: Any = None
    lon: Any = None
    month: Any = None
    hour: Any = None
    audio_source: Any = None
    caption_source: Any = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if (self.lat is None) != (self.lon is None):
            raise InputError("give both lat and lon, or neither")
        lat = _as_array(self.lat, "lat", None, np.float64)
        lon = _as_array(self.lon, "lon", None, np.float64)
        if lat is not None:
            if np.any(~np.isfinite(lat)) or np.any(np.abs(lat) > 90):
                raise InputError("latitude out of range: use degrees in -90..90")
            if np.any(~np.isfinite(lon)) or np.any(np.abs(lon) > 180):
                raise InputError("longitude out of range: use degrees in -180..180")
        month = _as_array(self.month, "month", None, np.float64, unknown=0)
        if month is not None:
            bad = (month != np.round(month)) | (month < 0) | (month > 12)
            if np.any(bad):
                raise InputError(f"month {month[bad][0]:g} out of range: use 1..12 (0 or None: unknown)")
        hour = _as_array(self.hour, "hour", None, np.float64, unknown=-1)
        if hour is not None:
            bad = (hour != np.round(hour)) | (hour < -1) | (hour > 23)
            if np.any(bad):
                raise InputError(f"hour {hour[bad][0]:g} out of range: use 0..23 (-1 or None: unknown)")
        if self.audio_source is not None:
            _source_index(self.audio_source, AUDIO_SOURCES, "audio source")
        if self.caption_source is not None:
            _source_index(self.caption_source, CAPTION_SOURCES, "caption source")

    def __len__(self) -> int:
        n = 1
        for f in ("lat", "lon", "month", "hour", "audio_source", "caption_source"):
            v = getattr(self, f)
            if v is not None and np.ndim(v) > 0:
                n = max(n, len(np.asarray(v, dtype=object).reshape(-1)))
        return n

    def encode(self, batch: int, device=None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Model inputs ``{item: (encoding, valid)}`` for a batch of ``batch`` samples.

        latlong ``[B,4]``, month/time ``[B,2]`` float32; asource/tsource ``[B]`` int64;
        ``valid`` bool ``[B]``. Invalid encodings are zeroed.
        """

        def bcast(arr, name):
            if arr.shape[0] == batch:
                return arr
            if arr.shape[0] == 1:
                return np.repeat(arr, batch)
            raise InputError(f"metadata field {name!r} has {arr.shape[0]} values for a batch of "
                             f"{batch}: give one value or one per sample")

        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        ones = np.ones(batch, dtype=bool)
        if self.audio_source is not None:
            idx = bcast(_source_index(self.audio_source, AUDIO_SOURCES, "audio source"), "audio_source")
            out["asource"] = (torch.as_tensor(idx, device=device), torch.as_tensor(ones, device=device))
        if self.caption_source is not None:
            idx = bcast(_source_index(self.caption_source, CAPTION_SOURCES, "caption source"),
                        "caption_source")
            out["tsource"] = (torch.as_tensor(idx, device=device), torch.as_tensor(ones, device=device))
        if self.lat is not None:
            lat = bcast(_as_array(self.lat, "lat", batch, np.float64), "lat")
            lon = bcast(_as_array(self.lon, "lon", batch, np.float64), "lon")
            enc = np.stack([np.sin(np.pi * lat / 90), np.cos(np.pi * lat / 90),
                            np.sin(np.pi * lon / 180), np.cos(np.pi * lon / 180)], axis=1)
            out["latlong"] = (torch.as_tensor(enc, dtype=torch.float32, device=device),
                              torch.as_tensor(ones, device=device))
        for item, value, period, lo in (("month", self.month, 12, 1), ("time", self.hour, 23, 0)):
            if value is None:
                continue
            v = bcast(_as_array(value, item, batch, np.float64, unknown=lo - 1), item)
            valid = v >= lo
            ang = 2 * math.pi * v / period
            enc = np.stack([np.sin(ang), np.cos(ang)], axis=1) * valid[:, None]
            out[item] = (torch.as_tensor(enc, dtype=torch.float32, device=device),
                         torch.as_tensor(valid, device=device))
        return out
