"""Run the user's ``psm-map`` for a Processing algorithm: an argument list (never a shell
string), its progress bars into QGIS's progress bar, its messages into the log, Cancel into a
termination within two seconds, a non-zero exit into a ``QgsProcessingException`` carrying the
CLI's one-line ``psm-map: error: ...`` message.

Progress: ``psm-map`` draws tqdm bars on stderr (``embedding:  42%|####  | 420/1000 [...]``,
redrawn after a carriage return). The environment asks tqdm to redraw at most twice a second
(``TQDM_MININTERVAL``) and Python not to buffer; :func:`parse_progress` reads the percentage.
No QGIS import at module level: the parsing is plain Python (tested without QGIS)."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

#: the Processing setting holding the psm-map executable
SETTING = "PSM_MAP_EXECUTABLE"
#: written by ``psm-map qgis install`` into the installed plugin folder: {"psm_map": PATH}
CONFIG_FILE = "psm_map.json"
#: seconds between SIGTERM and SIGKILL on Cancel
KILL_AFTER_S = 1.0
ERROR_PREFIX = "psm-map: error:"
_BAR = re.compile(r"^\s*(?:(?P<desc>[^:|]{1,60}):\s*)?(?P<pct>\d{1,3})%\|")


def parse_progress(segment: str) -> tuple[str | None, int] | None:
    """``(description, percent)`` of one tqdm redraw, or None for any other text."""
    m = _BAR.match(segment)
    if m is None:
        return None
    return (m["desc"] or "").strip() or None, min(100, int(m["pct"]))


def default_executable(plugin_dir: Path | None = None) -> str:
    """The psm-map ``psm-map qgis install`` recorded, else the one on PATH, else ``psm-map``."""
    import shutil

    cfg = Path(plugin_dir or Path(__file__).parent) / CONFIG_FILE
    try:
        recorded = json.loads(cfg.read_text(encoding="utf-8")).get("psm_map")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded:
        return str(recorded)
    return shutil.which("psm-map") or "psm-map"


def command_line(executable: str, args: list[str]) -> list[str]:
    """The argument list: ``executable args...``; a Python interpreter runs ``-m psm_mapping``."""
    exe = str(executable).strip()
    if not exe:
        raise ValueError("the psm-map executable is not set: set it in Processing > Options > Providers > "
                         "PSM soundscape maps, or run `psm-map qgis install` again")
    name = Path(exe).name.lower()
    if re.fullmatch(r"python(\d+(\.\d+)?)?(\.exe)?", name):
        return [exe, "-m", "psm_mapping", *args]
    return [exe, *args]


def child_env() -> dict[str, str]:
    """QGIS's environment minus its own Python's settings (the user's psm-map may use another
    Python), plus tqdm's redraw interval and unbuffered output."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "PYTHONSTARTUP")}
    env.update(TQDM_MININTERVAL="0.5", PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    return env


def _reader(stream, name: str, q: "queue.Queue") -> None:
    """Put ``(name, text)`` segments (split at newlines and carriage returns) on ``q``; a progress
    bar's redraw at once (tqdm writes a carriage return, then the bar, and nothing more until its
    next redraw)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a bar's blocks are 3 bytes
    buf = ""
    while True:
        try:
            chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        except (OSError, ValueError):  # closed under us after a cancel
            break
        if not chunk:
            break
        buf += decoder.decode(chunk)
        parts = re.split(r"[\r\n]", buf)
        buf = parts.pop()
        for p in parts:
            q.put((name, p))
        if buf and parse_progress(buf) is not None:  # tqdm ends a redraw with no newline: show it now
            q.put((name, buf))
    if buf:
        q.put((name, buf))
    q.put((name, None))


def _stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` (and its process group on POSIX: dask workers too); kill it after
    :data:`KILL_AFTER_S`."""
    try:
        if os.name == "posix":
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.terminate()
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(KILL_AFTER_S)
    except subprocess.TimeoutExpired:
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait(5)


def run(args: list[str], feedback, executable: str) -> list[str]:
    """Run ``psm-map args`` to its end, reporting to the Processing ``feedback``; returns the
    lines it wrote. Raises ``QgsProcessingException`` on Cancel or a non-zero exit."""
    from qgis.core import QgsProcessingException

    try:
        cmd = command_line(executable, args)
    except ValueError as exc:
        raise QgsProcessingException(str(exc)) from None
    feedback.pushCommandInfo(" ".join(_quote(c) for c in cmd))
    kw = {"start_new_session": True} if os.name == "posix" else {
        "creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=child_env(), **kw)
    except OSError as exc:
        raise QgsProcessingException(
            f"cannot run psm-map ({cmd[0]}: {exc.strerror or exc}): install psm-mapping and set its psm-map in "
            "Processing > Options > Providers > PSM soundscape maps (or run `psm-map qgis install`)") from None
    feedback.pushDebugInfo(f"psm-map process id {proc.pid}")
    q: queue.Queue = queue.Queue()
    for stream, name in ((proc.stdout, "out"), (proc.stderr, "err")):
        threading.Thread(target=_reader, args=(stream, name, q), daemon=True).start()
    try:
        return _follow(proc, q, feedback)
    finally:
        if proc.poll() is None:  # an error in QGIS's feedback: psm-map must not run on unseen
            _stop(proc)
        for stream in (proc.stdout, proc.stderr):
            stream.close()


def _follow(proc: subprocess.Popen, q: "queue.Queue", feedback) -> list[str]:
    from qgis.core import QgsProcessingException

    lines: list[str] = []
    open_streams, last_desc = 2, None
    while open_streams:
        if feedback.isCanceled():
            _stop(proc)
            raise QgsProcessingException("psm-map was canceled; run it again to resume (the embedding store "
                                         "keeps every finished block)")
        try:
            name, text = q.get(timeout=0.1)
        except queue.Empty:
            continue
        if text is None:
            open_streams -= 1
            continue
        bar = parse_progress(text)
        if bar is not None:
            desc, pct = bar
            if desc != last_desc and desc:
                feedback.setProgressText(desc)
                last_desc = desc
            feedback.setProgress(pct)
            continue
        text = text.rstrip()
        if not text:
            continue
        lines.append(text)
        if text.startswith(("WARNING:", "warning:")):
            feedback.pushWarning(text)
        elif text.startswith(ERROR_PREFIX):
            feedback.reportError(text, False)
        else:
            feedback.pushInfo(text)
    while proc.poll() is None:  # streams closed: the process is ending
        if feedback.isCanceled():
            _stop(proc)
            raise QgsProcessingException("psm-map was canceled; run it again to resume")
        time.sleep(0.05)
    if proc.returncode != 0:
        raise QgsProcessingException(error_message(lines, proc.returncode))
    return lines


def error_message(lines: list[str], code: int) -> str:
    """The CLI's one-line error (the last ``psm-map: error: ...`` line), else its last line."""
    for text in reversed(lines):
        if text.startswith(ERROR_PREFIX):
            return text
    tail = next((t for t in reversed(lines) if t.strip()), "")
    return f"psm-map stopped with exit code {code}" + (f": {tail}" if tail else "")


def _quote(s: str) -> str:
    if sys.platform.startswith("win"):
        return subprocess.list2cmdline([s])
    import shlex

    return shlex.quote(s)
