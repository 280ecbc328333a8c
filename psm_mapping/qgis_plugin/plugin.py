"""The QGIS plugin object: registers the ``psm`` Processing provider (nothing else in the GUI)."""
from __future__ import annotations

from qgis.core import QgsApplication

from .provider import PsmProvider


class PsmMappingPlugin:
    def __init__(self, iface=None):
        self.iface = iface
        self.provider = None

    def initProcessing(self):
        if self.provider is None:
            self.provider = PsmProvider()
            QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
