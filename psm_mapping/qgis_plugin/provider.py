"""The Processing provider ``psm``: the psm-map executable as a provider setting (Processing >
Options > Providers, as the GRASS, SAGA and OTB providers keep their tools' paths), the
algorithms, and whether this psm-map has the optional commands (``psm-map qgis info``)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from qgis.core import QgsProcessingProvider
from qgis.PyQt.QtGui import QIcon

from . import runner
from .algorithms import ALGORITHMS, OPTIONAL

HERE = Path(__file__).parent


def psm_map_commands(executable: str, timeout: float = 30.0) -> set[str]:
    """The subcommands of ``executable`` (``psm-map qgis info``), or an empty set if it cannot say."""
    try:
        cmd = runner.command_line(executable, ["qgis", "info"])
        kw = {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0)} if os.name == "nt" else {}
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout,
                             env=runner.child_env(), **kw)
        return set(json.loads(out.stdout.decode("utf-8")).get("commands", [])) if out.returncode == 0 else set()
    except (OSError, ValueError, subprocess.SubprocessError):
        return set()


class PsmProvider(QgsProcessingProvider):
    def id(self):
        return "psm"

    def name(self):
        return "PSM soundscape maps"

    def longName(self):
        return "PSM soundscape maps (psm-map)"

    def icon(self):
        return QIcon(str(HERE / "icon.png"))

    def supportedOutputRasterLayerExtensions(self):
        return ["tif"]

    def supportedOutputVectorLayerExtensions(self):
        return ["gpkg", "geojson", "csv"]

    def supportsNonFileBasedOutput(self):
        return False

    def load(self):
        from processing.core.ProcessingConfig import ProcessingConfig, Setting

        ProcessingConfig.settingIcons[self.name()] = self.icon()
        ProcessingConfig.addSetting(Setting(self.name(), runner.SETTING, "psm-map executable",
                                            runner.default_executable(HERE), valuetype=Setting.FILE))
        ProcessingConfig.readSettings()
        self.refreshAlgorithms()
        return True

    def unload(self):
        from processing.core.ProcessingConfig import ProcessingConfig

        ProcessingConfig.removeSetting(runner.SETTING)

    def loadAlgorithms(self):
        from processing.core.ProcessingConfig import ProcessingConfig

        for cls in ALGORITHMS:
            self.addAlgorithm(cls())
        exe = ProcessingConfig.getSetting(runner.SETTING) or runner.default_executable(HERE)
        have = psm_map_commands(exe) if OPTIONAL else set()
        for name, cls in OPTIONAL.items():
            if name in have:
                self.addAlgorithm(cls())
