"""Named imagery presets (tile servers) with the licence and attribution that go into outputs.

``psm-map --imagery`` with no value prints :func:`list_presets`. Check each provider's terms
before use: EOX Sentinel-2 cloudless 2016 is CC BY 4.0, later years are CC BY-NC-SA 4.0
(non-commercial; commercial use needs an EOX licence); Esri World Imagery follows the Esri
terms of use; USGS imagery is public domain.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ImageryError

EOX_URL = "https://tiles.maps.eox.at/wmts/1.0.0/{layer}/default/g/{{z}}/{{y}}/{{x}}.jpg"
EOX_YEARS = (2016, 2018, 2019, 2020, 2021, 2022, 2023, 2024)


@dataclass(frozen=True)
class Preset:
    """A named tile source and what its outputs must carry."""

    name: str
    url: str
    description: str
    attribution: str
    license: str
    max_zoom: int
    sat_type: str  # suggested PSM sat type: "sentinel", "bingmap" or "googleEarth"
    tile_size: int = 256
    bounds_lonlat: tuple[float, float, float, float] | None = None

    def row(self) -> str:
        return (f"{self.name:<20} {self.sat_type:<9} z<={self.max_zoom:<3} "
                f"{self.license:<40} {self.description}")


def _eox(year: int) -> Preset:
    layer = "s2cloudless_3857" if year == 2016 else f"s2cloudless-{year}_3857"
    licence = "CC BY 4.0" if year == 2016 else "CC BY-NC-SA 4.0 (non-commercial)"
    return Preset(
        name=f"s2cloudless-{year}",
        url=EOX_URL.format(layer=layer),
        description=f"EOX Sentinel-2 cloudless {year} mosaic, 10 m, global (WMTS)",
        attribution=("Sentinel-2 cloudless - https://s2maps.eu by EOX IT Services GmbH "
                     f"(Contains modified Copernicus Sentinel data {year})"),
        license=licence,
        max_zoom=15,
        sat_type="sentinel",
    )


def _build() -> dict[str, Preset]:
    presets = {p.name: p for p in (_eox(y) for y in EOX_YEARS)}
    presets["esri-world-imagery"] = Preset(
        name="esri-world-imagery",
        url="https://server.arcgisonline.com/ArcGIS/rest/services/World_Imagery/MapServer/tile/"
            "{z}/{y}/{x}",
        description="Esri World Imagery, aerial/satellite mosaic, ~0.3-1 m in most places",
        attribution=("Tiles (c) Esri - Source: Esri, Maxar, Earthstar Geographics, "
                     "and the GIS User Community"),
        license="Esri terms of use (https://www.esri.com/en-us/legal/terms/full-master-agreement)",
        max_zoom=19,
        sat_type="bingmap",
    )
    presets["usgs-imagery"] = Preset(
        name="usgs-imagery",
        url="https://basemap.nationalmap.gov/arcgis/rest/services/USGSImageryOnly/MapServer/tile/"
            "{z}/{y}/{x}",
        description="USGS National Map imagery (NAIP and others), United States only",
        attribution="Tiles courtesy of the U.S. Geological Survey (The National Map)",
        license="Public domain (USGS)",
        max_zoom=16,
        sat_type="bingmap",
        bounds_lonlat=(-179.2, 17.6, -64.5, 71.5),
    )
    return presets


#: name -> :class:`Preset`
PRESETS: dict[str, Preset] = _build()


def list_presets() -> list[str]:
    """Printable rows, one per preset, with a header."""
    header = f"{'name':<20} {'sat_type':<9} {'zoom':<6} {'licence':<40} description"
    return [header] + [p.row() for p in PRESETS.values()]


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ImageryError(
            f"unknown imagery preset {name!r}: use one of {', '.join(PRESETS)} "
            "(psm-map --imagery lists them)") from None


def open_preset(name: str, **options):
    """An :class:`~psm_mapping.imagery.xyz.XYZSource` for preset ``name``; ``options`` go to
    it (e.g. ``cache_dir``, ``user_agent``) and may override ``max_zoom``."""
    from .xyz import XYZSource

    p = get_preset(name)
    kwargs = dict(name=p.name, attribution=p.attribution, license=p.license,
                  max_zoom=p.max_zoom, tile_size=p.tile_size, sat_type=p.sat_type,
                  bounds_lonlat=p.bounds_lonlat)
    kwargs.update(options)
    return XYZSource(p.url, **kwargs)
