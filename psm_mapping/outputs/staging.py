"""Staging: every output is written under a temporary sibling name and swapped into place.

One routine, :func:`move_aside_and_swap`, replaces an output (a file or a folder, local or on
any fsspec file system): a file replaces a file atomically; otherwise the old output is moved
aside, the new one moved in, and the old one removed (moved back if the swap fails).

Staged names encode the writer's process id: ``.NAME.tmp-<pid>-<hex>`` (the new output) and
``.NAME.old-<pid>-<hex>`` (the old one during a swap). A later run of the same output removes the
staged files of a run that was killed (its pid is not alive, or they are older than
:data:`STALE_HOURS`); an ``.old-`` left without its output is moved back first.

An ``OSError`` (no space, no permission, read-only file system) or a GDAL error while writing
becomes one :class:`~psm_mapping.errors.OutputError` line: what, where, how to fix. Nothing is
left at the final names.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import OutputError

log = logging.getLogger(__name__)

#: staged files of a dead writer older than this many hours are removed even if the pid is reused
STALE_HOURS = 6.0
_STAGED = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def is_local(url: str | os.PathLike) -> bool:
    s = os.fspath(url)
    return "://" not in s or s.startswith("file://")


def local_path(url: str | os.PathLike) -> Path:
    s = os.fspath(url)
    return Path(s[len("file://"):] if s.startswith("file://") else s).expanduser().absolute()


def staged_name(name: str, kind: str) -> str:
    """``.NAME.tmp-<pid>-<hex>`` (``kind`` "tmp" or "old")."""
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def exists_error(path: str) -> OutputError:
    return OutputError(f"output {path} exists: pass --overwrite to replace it or choose another --out",
                       option="out")


# --------------------------------------------------------------------------- the swap
@dataclass(frozen=True)
class FileOps:
    """The file-system calls the swap needs (local by default; :meth:`for_fsspec` for URLs)."""

    exists: Callable[[Any], bool]
    is_dir: Callable[[Any], bool]
    move: Callable[[Any, Any], None]
    remove: Callable[[Any], None]

    @staticmethod
    def for_fsspec(fs) -> "FileOps":
        return FileOps(exists=fs.exists, is_dir=fs.isdir,
                       move=lambda a, b: fs.mv(a, b, recursive=True),
                       remove=lambda p: fs.rm(p, recursive=True))


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


LOCAL = FileOps(exists=lambda p: os.path.lexists(p), is_dir=lambda p: os.path.isdir(p) and not os.path.islink(p),
                move=os.replace, remove=lambda p: remove_path(Path(p)))


def move_aside_and_swap(tmp, dst, old, ops: FileOps = LOCAL) -> None:
    """Put ``tmp`` at ``dst``. A file over a file is one atomic replace; otherwise the existing
    ``dst`` is moved to ``old``, ``tmp`` moved in, and ``old`` removed (restored on failure)."""
    if ops is LOCAL and not ops.is_dir(tmp) and not ops.is_dir(dst):
        os.replace(tmp, dst)  # atomic for files
        return
    moved = False
    if ops.exists(dst):
        ops.move(dst, old)
        moved = True
    try:
        ops.move(tmp, dst)
    except BaseException:
        if moved:
            ops.move(old, dst)
        raise
    if moved:
        ops.remove(old)


# --------------------------------------------------------------------------- stale files
def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(dst: Path, max_age_hours: float = STALE_HOURS) -> list[Path]:
    """Remove the staged siblings of ``dst`` that a killed run left; returns what was removed."""
    parent = dst.parent
    if not parent.is_dir():
        return []
    removed = []
    now = time.time()
    for p in parent.glob(f".{dst.name}.*-*-*"):
        m = _STAGED.match(p.name)
        if m is None or m["name"] != dst.name:
            continue
        pid = int(m["pid"])
        try:
            age_h = (now - p.lstat().st_mtime) / 3600
        except OSError:
            continue
        if pid == os.getpid() or (_pid_alive(pid) and age_h < max_age_hours):
            continue
        if m["kind"] == "old" and not os.path.lexists(dst):
            os.replace(p, dst)  # a swap killed half-way: the old output comes back
            log.warning("restored %s from %s (a killed run's swap)", dst, p.name)
            continue
        remove_path(p)
        removed.append(p)
    if removed:
        log.info("removed %d staged file(s) of a killed run next to %s", len(removed), dst)
    return removed


# --------------------------------------------------------------------------- local stages
def prepare_local(dst: Path, overwrite: bool) -> None:
    """Check ``dst`` can be (re)placed: folder exists (created if missing) and is writable."""
    if os.path.lexists(dst) and not overwrite:
        raise exists_error(str(dst))
    parent = dst.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {parent} ({exc.strerror or exc}): "
                          "choose a writable --out", option="out") from None
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} is not a folder: choose another --out", option="out")
    probe = parent / f".{dst.name}.probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"output folder {parent} is not writable ({exc.strerror or exc}): "
                          "choose a writable --out", option="out") from None


class Stage:
    """A temporary sibling ``tmp`` of ``dst``, swapped into place by :meth:`commit`."""

    def __init__(self, dst: Path, overwrite: bool):
        self.dst = dst
        self.overwrite = overwrite
        prepare_local(dst, overwrite)
        clean_stale(dst)
        self.tmp = dst.parent / staged_name(dst.name, "tmp")

    def commit(self) -> None:
        if os.path.lexists(self.dst) and not self.overwrite:  # appeared while we were writing
            raise exists_error(str(self.dst))
        move_aside_and_swap(self.tmp, self.dst, self.dst.parent / staged_name(self.dst.name, "old"))

    def discard(self) -> None:
        remove_path(self.tmp)


_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG)
_ACCESS = (errno.EACCES, errno.EPERM, errno.EROFS)


def _short_of_space(folder: Path | None, need_bytes: int) -> bool:
    """Whether ``folder``'s file system has less than 1 MiB, or less than ``need_bytes``, free."""
    if folder is None:
        return False
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < max(1 << 20, int(need_bytes))


def write_error(exc: BaseException, where: str, folder: Path | None = None,
                need_bytes: int = 0) -> OutputError | None:
    """``exc`` raised while writing ``where`` (in local ``folder``) as one OutputError line, or
    None if it is not an I/O failure (then it propagates as it is). GDAL's write errors do not
    say why (libtiff prints ENOSPC to stderr and GDAL removes the partial file), so a disk with
    less free space than ``need_bytes`` (the uncompressed size of the output) counts as full."""
    text = " ".join(str(exc).split())
    # GDAL's errors through rasterio (CPLE_*: .errno is GDAL's error class) or pyogrio
    gdal = type(exc).__name__.startswith("CPLE_") or type(exc).__module__.startswith("pyogrio")
    code = None if gdal else getattr(exc, "errno", None)
    low = text.lower()
    if code in _SPACE or "no space left" in low or "disk space" in low or "disk full" in low or (
            (gdal or isinstance(exc, OSError)) and _short_of_space(folder, need_bytes)):
        return OutputError(f"cannot write {where}: No space left on device in {folder or 'its folder'}: "
                           "free space there or choose another --out", option="out")
    if code in _ACCESS or "permission denied" in low or "read-only file system" in low:
        return OutputError(f"cannot write {where}: permission denied ({text}): choose a writable --out",
                           option="out")
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return OutputError(f"cannot write {where} ({text}): check free space and that the folder is "
                           "writable, or choose another --out", option="out")
    if gdal:
        return OutputError(f"cannot write {where} (GDAL: {text}): check free space and that the folder "
                           "is writable, or choose another --out", option="out")
    return None


def raw_bytes(arrays) -> int:
    """Uncompressed size of float32 bands plus their overviews (a third more)."""
    return int(sum(4 * int(a.size) for a in arrays) * 4 // 3)


def _failed_stage(stages: Sequence[Stage], exc: BaseException) -> Stage:
    """The stage whose staged file ``exc`` names (an OSError's filename), else the last one
    begun (stages are written in order, each staged file made when its writing starts)."""
    name = getattr(exc, "filename", None)
    if isinstance(name, (str, os.PathLike)):
        p = os.path.abspath(os.fspath(name))
        for s in stages:
            tmp = os.path.abspath(s.tmp)
            if p == tmp or p.startswith(tmp + os.sep):
                return s
    begun = [s for s in stages if os.path.lexists(s.tmp)]
    return begun[-1] if begun else stages[0]


def staged_all(stages: Sequence[Stage], write: Callable[[], None], where: str | None = None,
               need_bytes: int = 0) -> None:
    """Run ``write`` (which fills every ``stage.tmp``), then commit all; on failure discard every
    staged file and turn I/O errors into :class:`OutputError` (``need_bytes``: see
    :func:`write_error`)."""
    try:
        write()
        for s in stages:
            s.commit()
    except BaseException as exc:
        err = None
        if not isinstance(exc, OutputError) and stages:
            failed = _failed_stage(stages, exc)
            err = write_error(exc, where if where and failed is stages[0] else str(failed.dst),
                              failed.dst.parent, need_bytes)
        for s in stages:
            s.discard()
        if err is not None:
            raise err from exc
        raise
