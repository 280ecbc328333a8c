"""Which store a ``--store`` path names, and how two stores' settings differ.

``--store`` is a folder of stores (each named by its key) or, when the path is itself a store, that
store: used when its key is this run's, refused with one line naming the settings that differ
otherwise (never written into, never a store nested in a store).
"""
from __future__ import annotations

import json
from dataclasses import asdict

from .errors import StoreError
from .locks import _local_path


#: what each store format is called in a refusal
STORE_KINDS = {"psm-mapping-store/3": "a map embedding store", "psm-mapping-points/1": "a point store"}

#: how a setting of :class:`StoreSpec` (or the point store's spec) is named to the user
_SETTING_NAMES = {"crs_wkt": "CRS", "transform": "grid origin", "width": "grid width (px)",
                  "height": "grid height (px)", "block_size": "block size", "zoom_levels": "zoom levels",
                  "sat_type": "sat type", "checkpoint_sha256": "checkpoint sha256", "min_valid": "min valid",
                  "fc_dim": "embedding size", "zoom_factors": "zoom sampling factors",
                  "coords_sha256": "sites (coordinates sha256)", "n_sites": "distinct sites", "chip_crs": "chip CRS"}


def spec_differences(spec, found: dict | None) -> str:
    """The settings in which ``spec`` (this run's, a dataclass) differs from ``found`` (a store's
    recorded spec), as ``"stride 60 vs 40 in the store; ..."``."""
    if not isinstance(found, dict):
        return "its settings are not recorded"
    mine = asdict(spec)
    if "zoom_factors" in mine:  # () and all-ones both mean dense
        mine["zoom_factors"] = list(spec.factors)
        found = {**found, "zoom_factors": list(found.get("zoom_factors") or [1] * len(found.get("zoom_levels", [])))}

    def show(key, v) -> str:
        if isinstance(v, (list, tuple)):
            return ",".join(show(key, x) for x in v) if key != "transform" else \
                ",".join(f"{float(x):.6g}" for x in v[:6])
        if isinstance(v, float):
            return f"{v:g}"
        v = str(v)
        if key == "crs_wkt":
            try:
                from pyproj import CRS

                return CRS.from_wkt(v).to_string()
            except Exception:
                return v[:40]
        return v[:12] if key.endswith("sha256") else (v if len(v) <= 60 else v[:57] + "...")

    diffs = []
    for k, v in mine.items():
        if k == "metadata" or k not in found:
            continue
        a, b = show(k, v), show(k, found[k])
        if a != b:
            diffs.append(f"{_SETTING_NAMES.get(k, k)} {a} vs {b} in the store")
    return "; ".join(diffs) or "settings of another version"


def store_attrs_at(url: str, storage_options: dict | None = None) -> dict | None:
    """The attributes of the Zarr group at ``url`` (a store, or anything Zarr), None where there is
    none. Local folders are read cheaply from their ``zarr.json`` (``.zattrs`` for Zarr 2)."""
    local = _local_path(url)
    if local is not None:
        for name, inner in (("zarr.json", True), (".zattrs", False)):
            f = local / name
            if f.is_file():
                try:
                    d = json.loads(f.read_text())
                except (OSError, ValueError):
                    return {"format": "unreadable"}
                return dict(d.get("attributes", {}) if inner else d) if isinstance(d, dict) else {}
        return None
    import zarr

    try:
        return dict(zarr.open_group(store=url, mode="r", storage_options=storage_options or None).attrs)
    except Exception:  # nothing there (FileNotFoundError, KeyError), or not Zarr
        return None


def check_store_as_root(root: str, spec, fmt: str, old_formats=(), storage_options: dict | None = None,
                        kinds: dict | None = None) -> bool:
    """Whether ``root`` (a ``--store`` value) is itself a store of format ``fmt`` built with
    ``spec``: True: use it as the store; False: ``root`` is a folder of stores. A store with other
    settings, of an older format, or a Zarr group of something else is refused with one line
    naming what differs (never written into). ``kinds``: format -> what to call such a store."""
    attrs = store_attrs_at(root, storage_options)
    if attrs is None:
        return False
    found = attrs.get("format")
    if found == fmt:
        if attrs.get("key") == spec.key():
            return True
        raise StoreError(f"--store {root} is itself a store, built with other settings "
                         f"({spec_differences(spec, attrs.get('spec'))}): run with the settings it was built "
                         "with, or pass its parent folder (or another folder) to make a new store beside it",
                         option="store")
    if found in old_formats:
        raise StoreError(f"--store {root} is a store written by an older psm-mapping ({found}, this version writes "
                         f"{fmt}): remove it to rebuild it, or pass another --store", option="store")
    what = {**STORE_KINDS, **(kinds or {})}.get(
        found, "a Zarr group" if found != "unreadable" else "a Zarr group with unreadable metadata")
    raise StoreError(f"--store {root} is {what}, not a folder of stores for this command: pass a folder "
                     "for the stores (e.g. psm-store), or that store's parent folder", option="store")


