"""``psm-map qgis install|zip|info``: the QGIS plugin (thin over :mod:`psm_mapping.qgis_install`)."""
from __future__ import annotations

import json
import sys

from .base import parser


def cmd_qgis(argv: list[str]) -> int:
    p = parser("qgis", "The QGIS plugin: a Processing provider (psm) that runs this psm-map.")
    sub = p.add_subparsers(dest="action", required=True, metavar="{install,zip,info}")
    inst = sub.add_parser("install", help="copy the plugin into a QGIS profile and record this psm-map")
    inst.add_argument("--plugins-dir", metavar="DIR",
                      help="QGIS's plugins folder (default: the profile's, e.g. "
                           "~/.local/share/QGIS/QGIS3/profiles/default/python/plugins)")
    inst.add_argument("--profile", default="default", help="QGIS user profile (default: default)")
    inst.add_argument("--psm-map", metavar="PATH", help="the psm-map the plugin runs (default: this one)")
    z = sub.add_parser("zip", help="build the zip for QGIS's Plugins > Install from ZIP")
    z.add_argument("out", metavar="OUT.zip")
    z.add_argument("--overwrite", action="store_true")
    sub.add_parser("info", help="JSON: this psm-map's version and commands (the plugin reads it)")
    a = p.parse_args(argv)
    from .. import qgis_install

    if a.action == "install":
        dst = qgis_install.install_plugin(a.plugins_dir, a.profile, a.psm_map)
        print(f"installed the QGIS plugin in {dst}; restart QGIS and enable 'PSM soundscape maps' in "
              "Plugins > Manage and Install Plugins (Processing Toolbox: PSM soundscape maps)", file=sys.stderr)
    elif a.action == "zip":
        print(qgis_install.build_zip(a.out, a.overwrite))
    else:
        from . import COMMANDS
        from ..outputs.results import software_version

        print(json.dumps({"version": software_version(), "commands": sorted(COMMANDS)}))
    return 0
