"""The drivers' early checks: output and store targets, imagery overlap and fit. They run before
any long work, so a bad input fails in seconds with one line."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import MapConfig
from .errors import ImageryError, OutputError, StoreError
from .outputs import default_preview_dir, stac_path
from .store import StoreSpec

log = logging.getLogger("psm_mapping.run")


def _check_output(out: str, overwrite: bool, previews: bool = False) -> None:
    """Refuse early (before any long work) what the writers would refuse at the end."""
    if "://" in str(out):
        return
    p = Path(out)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise OutputError(f"output folder {parent} does not exist: create it or choose another --out")
    if not os.access(parent, os.W_OK) or not _can_create_in(parent):
        raise OutputError(f"output folder {parent} is not writable: choose another --out", option="out")
    if p.exists() and not overwrite:
        raise OutputError(f"{p} exists: pass --overwrite to replace it, or choose another --out")
    if not overwrite and stac_path(p).exists():
        raise OutputError(f"STAC item {stac_path(p)} exists: pass --overwrite to replace it, or choose "
                          "another --out", option="out")
    if not overwrite and p.suffix.lower() in (".tif", ".tiff"):
        from .outputs.qml import qml_path

        if qml_path(p).exists():
            raise OutputError(f"QGIS style {qml_path(p)} exists: pass --overwrite to replace it, or choose "
                              "another --out", option="out")
    if previews and not overwrite:
        pd = default_preview_dir(p)
        if pd.exists():
            raise OutputError(f"preview folder {pd} exists: pass --overwrite to replace it, "
                              "--no-previews, or choose another --out")


def _can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder`` (``os.access`` says yes for root anywhere,
    also under /proc)."""
    import uuid

    probe = folder / f".psm-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def default_store_dir(out: str) -> str:
    if "://" in str(out):
        return str(out).rstrip("/") + ".psm-store"
    return str(Path(out).parent / "psm-store")


def _check_store_root(root: str | None) -> None:
    """A local --store must be a folder (or not exist yet)."""
    if root and "://" not in str(root) and Path(root).exists() and not Path(root).is_dir():
        raise StoreError(f"--store {root} is a file, not a folder: pass a folder for the embedding "
                         "stores (it is created if missing)")


def _store_url(cfg: MapConfig, spec: StoreSpec) -> str:
    from .store import OLD_FORMATS, STORE_FORMAT
    from .storepath import check_store_as_root

    root = cfg.store or default_store_dir(cfg.out)
    if check_store_as_root(root, spec, STORE_FORMAT, OLD_FORMATS, cfg.store_options or None):
        return root.rstrip("/")  # --store names the store itself, built with these settings
    if "://" not in root:
        _check_store_root(root)
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store folder {root} ({exc.strerror or exc}): pass a writable "
                             "--store", option="store") from None
        return str(Path(root) / f"{spec.key()}.zarr")
    return root.rstrip("/") + f"/{spec.key()}.zarr"


def _warn_imagery_mismatch(source, sat_type: str, zoom_levels) -> None:
    """Warn when the imagery is not what the checkpoint was trained on (the map still runs)."""
    from .constants import chip_resolution_m

    hint = source.info.extra.get("sat_type")
    if hint and hint != sat_type:
        log.warning("imagery %s is meant for %s checkpoints but this checkpoint is %s: the map is "
                    "outside the training distribution", source.info.name, hint, sat_type)
    native = source.info.native_resolution
    finest = chip_resolution_m(sat_type, min(int(z) for z in zoom_levels))
    if native and native > 3 * finest:
        log.warning("imagery %s has %.3g m pixels but zoom-%d chips ask for %.3g m: chips will be "
                    "blurry upsamplings; use finer imagery or higher zoom levels", source.info.name,
                    native, min(int(z) for z in zoom_levels), finest)


def _check_overlap(source, region) -> None:
    fp = source.footprint_lonlat()
    if fp is None:
        return
    from shapely.geometry import box

    w, s, e, n = fp
    geom = region.unwrapped() if hasattr(region, "unwrapped") else region.geometry
    if not geom.intersects(box(w, s, e, n)) and not region.geometry.intersects(box(w, s, e, n)):
        raise ImageryError(f"the region does not overlap the imagery ({source.info.name} covers lon "
                           f"{w:.4f}..{e:.4f}, lat {s:.4f}..{n:.4f}): check the region or choose "
                           "another --imagery")
