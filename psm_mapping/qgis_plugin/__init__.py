"""PSM soundscape maps for QGIS: a Processing provider (``psm``) that runs the user's ``psm-map``.

This folder is the plugin's one source: ``psm-map qgis install`` copies it into a QGIS profile as
``psm_mapping_qgis/`` and ``psm-map qgis zip`` packs it for QGIS's plugin installer. It is
package data of psm-mapping and never imported by it (QGIS's Python runs it, not psm-map's)."""


def classFactory(iface):  # noqa: N802 (QGIS's name)
    from .plugin import PsmMappingPlugin

    return PsmMappingPlugin(iface)
