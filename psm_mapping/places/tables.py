"""Tables out: CSV, GeoParquet, GeoJSON or GPKG by the name's suffix, with provenance.

Provenance (a JSON object: software, checkpoint and sha256, imagery, zoom levels, queries,
metadata, column meanings) travels in the file where the format has room for it -- GeoParquet:
the schema metadata key ``psm_provenance``; GPKG: the layer metadata item ``psm_provenance`` --
and in a sidecar ``<out>.provenance.json`` for CSV and GeoJSON. Every file is written under a
temporary name and swapped into place (:mod:`psm_mapping.outputs.staging`): a failed write leaves
nothing at the final names.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

from ..errors import InputError
from ..outputs.staging import Stage, staged_all

#: suffix -> table format
TABLE_FORMATS = {".csv": "csv", ".parquet": "parquet", ".geoparquet": "parquet", ".geojson": "geojson",
                 ".json": "geojson", ".gpkg": "gpkg"}
PROVENANCE_KEY = "psm_provenance"
SIDECAR_SUFFIX = ".provenance.json"


def table_format(out: str | os.PathLike) -> str:
    """The table format ``out``'s suffix names (an :class:`InputError` for any other)."""
    fmt = TABLE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise InputError(f"--out {out}: name the table *.csv, *.parquet, *.geojson or *.gpkg", option="out")
    return fmt


def sidecar_path(out: str | os.PathLike) -> Path:
    p = Path(out)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def check_table_out(out: str | os.PathLike, overwrite: bool) -> str:
    """Refuse early what :func:`write_table` would refuse at the end; returns the format."""
    from ..checks import _check_output

    fmt = table_format(out)
    _check_output(str(out), overwrite)
    if fmt in ("csv", "geojson") and sidecar_path(out).exists() and not overwrite:
        raise InputError(f"{sidecar_path(out)} exists: pass --overwrite to replace it, or choose another --out",
                         option="out")
    return fmt


def _geo(frame):
    """``frame`` as a GeoDataFrame (lon/lat tables get points in EPSG:4326 from ``frame.attrs``)."""
    import geopandas as gpd

    if isinstance(frame, gpd.GeoDataFrame) and frame.geometry is not None:
        return frame
    raise InputError("this table has no geometry: write it as .csv")


def _csv_frame(frame):
    """The CSV form: geometry as WKT (dropped when it only repeats lon/lat columns)."""
    import pandas as pd

    geom = frame.attrs.get("psm:geometry_in_csv", True)
    if hasattr(frame, "geometry") and "geometry" in frame.columns:
        out = pd.DataFrame(frame.drop(columns="geometry"))
        if geom:
            out["geometry"] = frame.geometry.to_wkt()
        return out
    return frame


def write_table(frame, out: str | os.PathLike, provenance: dict, overwrite: bool = False) -> dict[str, Path]:
    """Write ``frame`` by ``out``'s suffix; returns ``{"table": path, "provenance": sidecar?}``."""
    stages, write = table_stages(frame, out, provenance, overwrite)
    staged_all(stages, write, where=f"table {stages[0].dst}")
    return table_paths(stages)


def table_paths(stages) -> dict[str, Path]:
    """``{"table": path, "provenance": sidecar?}`` of :func:`table_stages`' stages."""
    return {"table": stages[0].dst, **({"provenance": stages[1].dst} if len(stages) > 1 else {})}


def table_stages(frame, out: str | os.PathLike, provenance: dict, overwrite: bool = False):
    """The staged files of a table (the table, and a provenance sidecar for CSV/GeoJSON) and the
    function that writes them: for a caller that commits the table with other files at once
    (:func:`psm_mapping.outputs.staging.staged_all`)."""
    fmt = table_format(out)
    dst = Path(out).expanduser().absolute()
    blob = json.dumps(provenance, default=str, sort_keys=True)
    stages = [Stage(dst, overwrite)]
    if fmt in ("csv", "geojson"):
        stages.append(Stage(sidecar_path(dst), overwrite))

    def write():
        tmp = stages[0].tmp
        if fmt == "csv":
            _csv_frame(frame).to_csv(tmp, index=False)
        elif fmt == "parquet":
            _write_parquet(_geo(frame), tmp, blob)
        elif fmt == "geojson":
            _geo(frame).to_file(tmp, driver="GeoJSON", engine="pyogrio")
        else:
            with warnings.catch_warnings():  # the staged name does not end in .gpkg
                warnings.simplefilter("ignore", RuntimeWarning)
                _geo(frame).to_file(tmp, driver="GPKG", engine="pyogrio", layer=dst.stem,
                                    layer_metadata={PROVENANCE_KEY: blob})
        if len(stages) > 1:
            stages[1].tmp.write_text(json.dumps(provenance, default=str, indent=1, sort_keys=True) + "\n")

    return stages, write


def _write_parquet(gdf, path: Path, blob: str) -> None:
    import pyarrow.parquet as pq

    gdf.to_parquet(path)
    t = pq.read_table(path)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), PROVENANCE_KEY.encode(): blob.encode()})
    pq.write_table(t, path)


def read_provenance(path: str | os.PathLike) -> dict:
    """The provenance of a table :func:`write_table` wrote (file metadata or sidecar)."""
    p = Path(path)
    fmt = table_format(p)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return json.loads(pq.read_schema(p).metadata[PROVENANCE_KEY.encode()])
    if fmt == "gpkg":
        import pyogrio

        return json.loads(pyogrio.read_info(p)["layer_metadata"][PROVENANCE_KEY])
    return json.loads(sidecar_path(p).read_text())
