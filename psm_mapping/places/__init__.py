"""Places: soundscape scores at sites (point tables) and per polygon (zonal statistics).

* :mod:`.sites`   CSV / point vector file -> :class:`Sites` (coordinate columns detected, per-site metadata)
* :mod:`.store`   the point store (Zarr): ``z_img`` per distinct site and zoom, resumable
* :mod:`.embed`   site chips (the map grid's chips, via ``ChipReader.chips_at``) -> the point store
* :mod:`.points`  :func:`score_points`, :func:`score_point_store`: tables of similarity, score, uncertainty
* :mod:`.zonal`   :func:`zonal_stats`: per-polygon statistics of a psm-map map (exactextract coverage)
* :mod:`.tables`  CSV / GeoParquet / GeoJSON / GPKG writer with provenance, staged
"""
from __future__ import annotations

from .points import PointsConfig, PointsRun, score_point_store, score_points
from .sites import Sites, load_sites
from .store import PointStore, is_point_store
from .tables import read_provenance, write_table
from .zonal import load_zones, read_map, write_zonal, zonal_stats

__all__ = ["PointsConfig", "PointsRun", "score_points", "score_point_store", "Sites", "load_sites", "PointStore",
           "is_point_store", "zonal_stats", "read_map", "load_zones", "write_zonal", "write_table",
           "read_provenance"]
