"""The QGIS plugin as a deliverable: copy it into a QGIS profile (``psm-map qgis install``) or pack
the zip QGIS's plugin installer takes (``psm-map qgis zip``).

The plugin's one source is the package folder ``psm_mapping/qgis_plugin/`` (package data, so a
wheel carries it); installed, it is the folder ``psm_mapping_qgis/`` with a ``psm_map.json`` that
records which ``psm-map`` to run (the provider's default for its setting)."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

from .errors import InputError
from .outputs.staging import Stage, staged_all

#: the plugin's folder name inside QGIS's plugins folder (and the zip's top folder)
PLUGIN_NAME = "psm_mapping_qgis"
SOURCE = Path(__file__).resolve().parent / "qgis_plugin"
#: written into the installed plugin: {"psm_map": PATH, "python": ..., "version": ...}
CONFIG_FILE = "psm_map.json"
_SKIP = ("__pycache__", ".pyc", ".pyo", CONFIG_FILE)


def plugin_files() -> list[Path]:
    """The plugin's files (relative to :data:`SOURCE`), caches left out."""
    out = []
    for p in sorted(SOURCE.rglob("*")):
        rel = p.relative_to(SOURCE)
        if p.is_file() and not any(part == "__pycache__" for part in rel.parts) and not p.name.endswith(_SKIP):
            out.append(rel)
    if not out:
        raise InputError(f"the QGIS plugin's files are missing from {SOURCE}: reinstall psm-mapping")
    return out


def qgis_profiles_dir(platform: str | None = None, env: dict | None = None, home: Path | None = None) -> Path:
    """QGIS 3's profiles folder for this OS (Linux: ``~/.local/share/QGIS/QGIS3/profiles``, macOS:
    ``~/Library/Application Support/QGIS/QGIS3/profiles``, Windows: ``%APPDATA%\\QGIS\\QGIS3\\profiles``)."""
    platform = platform or sys.platform
    env = os.environ if env is None else env
    home = home or Path.home()
    if platform.startswith("win"):
        base = Path(env["APPDATA"]) if env.get("APPDATA") else home / "AppData" / "Roaming"
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(env["XDG_DATA_HOME"]) if env.get("XDG_DATA_HOME") else home / ".local" / "share"
    return base / "QGIS" / "QGIS3" / "profiles"


def plugins_dir(profile: str = "default", **kw) -> Path:
    """The plugins folder of QGIS profile ``profile``."""
    if not re.fullmatch(r"[^/\\:]+", profile or "") or profile in (".", ".."):
        raise InputError(f"QGIS profile {profile!r} is not a profile name: give the name QGIS shows in "
                         "Settings > User Profiles (e.g. default)", option="profile")
    return qgis_profiles_dir(**kw) / profile / "python" / "plugins"


def find_psm_map() -> str:
    """The ``psm-map`` of this installation: the console script beside this Python, else the one
    on PATH, else this Python (the plugin then runs ``python -m psm_mapping``)."""
    here = Path(sys.executable).parent
    for name in ("psm-map", "psm-map.exe"):
        if (here / name).is_file():
            return str(here / name)
    return shutil.which("psm-map") or sys.executable


def _software_version() -> str:
    from .outputs.results import software_version

    return software_version()


def install_plugin(plugins: str | os.PathLike | None = None, profile: str = "default",
                   psm_map: str | None = None) -> Path:
    """Copy the plugin into ``plugins`` (default: the profile's plugins folder), replacing an
    older copy in one swap, and record ``psm_map`` (default :func:`find_psm_map`). Returns the
    installed folder."""
    root = Path(plugins).expanduser() if plugins else plugins_dir(profile)
    if root.exists() and not root.is_dir():
        raise InputError(f"--plugins-dir {root} is not a folder: give QGIS's plugins folder", option="plugins_dir")
    exe = psm_map or find_psm_map()
    stage = Stage(root.absolute() / PLUGIN_NAME, overwrite=True)

    def write() -> None:
        stage.tmp.mkdir()
        for rel in plugin_files():
            (stage.tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(SOURCE / rel, stage.tmp / rel)
        (stage.tmp / CONFIG_FILE).write_text(json.dumps(
            {"psm_map": exe, "python": sys.executable, "version": _software_version()}, indent=1), encoding="utf-8")

    staged_all([stage], write)
    return stage.dst


def build_zip(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """The zip QGIS's "Install from ZIP" takes: every plugin file under ``psm_mapping_qgis/``
    (no recorded psm-map: the provider then finds ``psm-map`` on PATH or asks for it)."""
    dst = Path(out).expanduser()
    if dst.suffix.lower() != ".zip":
        raise InputError(f"{dst} does not end in .zip: name the plugin zip e.g. psm_mapping_qgis.zip", option="out")
    stage = Stage(dst.absolute(), overwrite)

    def write() -> None:
        with zipfile.ZipFile(stage.tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{PLUGIN_NAME}/", "")
            for rel in plugin_files():
                zf.write(SOURCE / rel, f"{PLUGIN_NAME}/{rel.as_posix()}")

    staged_all([stage], write)
    return stage.dst
