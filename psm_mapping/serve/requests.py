"""What a request asks of the explorer (:class:`QuerySpec`), the checks of its values, the error
a bad one gets (:class:`RequestError`), and the progress of running computations (:class:`Jobs`)."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from ..errors import PSMError

#: the pseudo zoom level whose values are the mean over the store's zoom levels
MEAN = "mean"
BANDS = ("similarity", "score", "uncertainty")


class RequestError(PSMError):
    """A bad request: ``status`` is the HTTP status, the message says what and how to fix."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class QuerySpec:
    """Everything that determines a query's maps (what a URL's query string says)."""

    text: str | None = None
    audio: str | None = None  # an id from :meth:`Explorer.add_audio`
    month: int | None = None
    hour: int | None = None

    @property
    def query_key(self) -> tuple:
        return (self.text, self.audio)

    @property
    def md_key(self) -> tuple:
        return (self.month, self.hour)


def whole(name: str, value, lo: int, hi: int) -> int | None:
    """``value`` as a whole number in ``lo..hi``; None when not given."""
    if value is None or str(value).strip() == "":
        return None
    try:
        v = int(str(value).strip())
    except ValueError:
        raise RequestError(f"{name} {value!r} is not a whole number: give one of {lo}..{hi} "
                           "(or leave it out for unknown)") from None
    if not lo <= v <= hi:
        raise RequestError(f"{name} {v} is out of range: give one of {lo}..{hi} (or leave it out for unknown)")
    return v


def zoom_index(zoom_levels: tuple[int, ...], zoom_level) -> int | str:
    """The index of ``zoom_level`` in ``zoom_levels``, or :data:`MEAN`; None: the first level."""
    if zoom_level is None or zoom_level == "":
        return 0
    if str(zoom_level).strip().lower() == MEAN:
        return MEAN
    try:
        z = int(str(zoom_level).strip())
    except ValueError:
        z = None
    if z not in zoom_levels:
        have = ", ".join(str(v) for v in zoom_levels)
        raise RequestError(f"zoom_level {zoom_level!r} is not in this store: use one of {have} or mean")
    return zoom_levels.index(z)


@dataclass
class Job:
    what: str
    done: int = 0
    total: int = 1
    started: float = field(default_factory=time.time)


class Jobs:
    """The computations running now (what ``/api/progress`` shows)."""

    def __init__(self):
        self._jobs: dict[int, Job] = {}
        self._id = 0
        self._lock = threading.Lock()

    def start(self, what: str, total: int = 1) -> int:
        with self._lock:
            self._id += 1
            self._jobs[self._id] = Job(what, 0, total)
            return self._id

    def update(self, jid: int, done: int, total: int) -> None:
        with self._lock:
            j = self._jobs.get(jid)
            if j is not None:
                j.done, j.total = done, total

    def end(self, jid: int) -> None:
        with self._lock:
            self._jobs.pop(jid, None)

    def list(self) -> list[dict]:
        with self._lock:
            return [{"what": j.what, "done": j.done, "total": j.total,
                     "seconds": round(time.time() - j.started, 2)} for j in self._jobs.values()]
