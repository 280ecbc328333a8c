"""The explorer's uploaded audio clips: checked before anything is decoded, kept as files in a
private temporary folder under a byte budget (least recently used first out), all deleted when
the server stops; the folders of servers that died without stopping are deleted when the next one
starts (:func:`sweep_orphans`).

An upload is refused, in this order: over ``max_upload_bytes`` (413), empty (400), a header
soundfile cannot read (415), a header saying it lasts over ``max_seconds`` (413, nothing decoded),
then decoded (at most ``max_seconds``; :func:`psm_mapping.model.audio.load_audio`): unreadable,
silent, NaN (415) or longer than its header said (413).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path

from ..errors import AudioError, AudioTooLongError, InputError
from ..model.audio import MAX_AUDIO_SECONDS, audio_info, load_audio
from .cache import ByteLRU

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif", ".au", ".opus")
#: bytes of uploaded clips kept on disk (``psm-map serve --upload-cache-mb``)
DEFAULT_UPLOAD_CACHE_BYTES = 200 << 20
#: clips kept at most, whatever their size
MAX_UPLOADS = 1000
#: uploads decoded at the same time (each at most ``max_seconds``; embedding is one at a time)
MAX_PARALLEL_DECODES = 2


#: the upload folder's name in the temporary folder: PREFIX, the server's PID, a random part
PREFIX = "psm-serve-audio-"


def sweep_orphans(root: str | os.PathLike | None = None) -> list[Path]:
    """Delete the upload folders of servers that died without cleaning up (SIGKILL, power loss):
    folders named :data:`PREFIX` + PID in the temporary folder, owned by this user, whose PID no
    process has. A folder whose PID is alive (maybe another server) is left. Returns those deleted."""
    root = Path(root or tempfile.gettempdir())
    gone = []
    try:
        entries = list(root.glob(f"{PREFIX}*-*"))
    except OSError:
        return gone
    for d in entries:
        pid = d.name[len(PREFIX):].split("-", 1)[0]
        try:
            st = d.lstat()
            if not pid.isdigit() or int(pid) == os.getpid() or st.st_uid != os.getuid() or not d.is_dir() \
                    or d.is_symlink():
                continue
            os.kill(int(pid), 0)  # alive (or not ours to signal): keep
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
            gone.append(d)
        except (OSError, ValueError):
            continue
    return gone


class UploadError(InputError):
    """A refused upload; ``status``: the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class Uploads:
    """Uploaded clips by id (the first 16 hex digits of their sha256): ``add(data, filename)``,
    ``get(id) -> (path, name) | None``; ``close()`` deletes them all."""

    def __init__(self, max_upload_bytes: int = 20 << 20, max_seconds: float = MAX_AUDIO_SECONDS,
                 cache_bytes: int = DEFAULT_UPLOAD_CACHE_BYTES, max_entries: int = MAX_UPLOADS):
        self.max_upload_bytes, self.max_seconds = int(max_upload_bytes), float(max_seconds)
        sweep_orphans()
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
        self._lru = ByteLRU(int(cache_bytes), "uploaded clips", max_entries=max_entries,
                            on_evict=lambda _k, v: v[0].unlink(missing_ok=True))
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(MAX_PARALLEL_DECODES)

    # ------------------------------------------------------------------ checks
    def _refuse_header(self, data: bytes, name: str) -> None:
        if len(data) > self.max_upload_bytes:
            raise UploadError(f"the upload is {len(data):,} bytes, over the limit of {self.max_upload_bytes:,}: "
                              "send a shorter clip", 413)
        if not data:
            raise UploadError("the upload is empty: send an audio file (wav, flac, ogg, mp3)", 400)
        try:
            info = audio_info(data, name)
        except AudioError as exc:
            raise self._unreadable(name, exc) from None
        if info.seconds is not None and info.seconds > self.max_seconds:
            raise self._too_long(name, info.seconds)

    def _too_long(self, name: str, seconds: float | None) -> UploadError:
        long = f"is {seconds:,.1f} s long" if seconds is not None else "runs on"
        return UploadError(f"{name} {long}, over this server's limit of {self.max_seconds:g} s of audio "
                           "(`psm-map serve --max-audio-seconds`): send a shorter clip (CLAP looks at 10 s windows)",
                           413)

    @staticmethod
    def _unreadable(name: str, exc: Exception) -> UploadError:
        why = str(exc) if isinstance(exc, AudioError) else type(exc).__name__
        return UploadError(f"{name} is not an audio clip that can be read ({why}): send a wav, flac, ogg or "
                           "mp3 file", 415)

    # ------------------------------------------------------------------ the store
    def add(self, data: bytes, filename: str | None) -> tuple[str, bool]:
        """Check and keep a clip: ``(id, new)`` (``new`` False: the same bytes were kept already)."""
        name = Path(str(filename or "clip")).name[:120] or "clip"
        self._refuse_header(data, name)
        aid = hashlib.sha256(data).hexdigest()[:16]
        if self._lru.get(aid) is not None:
            return aid, False
        suffix = Path(name).suffix.lower()
        path = self.dir / (aid + (suffix if suffix in AUDIO_SUFFIXES else ""))
        tmp = self.dir / f".{aid}.{secrets.token_hex(4)}.part"
        tmp.write_bytes(data)
        try:
            with self._decoding:
                load_audio(tmp, max_seconds=self.max_seconds, name=name)
        except AudioTooLongError:
            tmp.unlink(missing_ok=True)
            raise self._too_long(name, None) from None
        except Exception as exc:  # AudioError, and decoders' own errors on non-audio bytes
            tmp.unlink(missing_ok=True)
            raise self._unreadable(name, exc) from None
        with self._lock:
            if self._lru.get(aid) is not None:  # the same clip, uploaded meanwhile
                tmp.unlink(missing_ok=True)
                return aid, False
            os.replace(tmp, path)
            if not self._lru.put(aid, (path, name), nbytes=len(data)):
                raise UploadError(f"{name} is larger than the upload cache ({self._lru.max_bytes:,} bytes, "
                                  "`psm-map serve --upload-cache-mb`): send a shorter clip", 413)
        return aid, True

    def get(self, aid: str) -> tuple[Path, str] | None:
        return self._lru.get(aid)

    def __contains__(self, aid: str) -> bool:
        return aid in self._lru

    def remove(self, aid: str) -> None:
        self._lru.pop(aid)

    def stats(self) -> dict:
        return self._lru.stats()

    def close(self) -> None:
        self._lru.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["AUDIO_SUFFIXES", "DEFAULT_UPLOAD_CACHE_BYTES", "PREFIX", "UploadError", "Uploads", "sweep_orphans"]
