"""The 12 official PSM experiments: list, download (from the authors' Google Drive folder), verify.

Downloads need a network and ``gdown`` (``pip install psm-mapping[download]``); everything else
works offline. Files land in the cache folder (``$PSM_CACHE`` or ``~/.cache/psm-mapping``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, InputError

DRIVE_FOLDER_ID = "1RaMykYcGeZTJ0W3nLuVVDv95azojt1T4"


@dataclass(frozen=True)
class Experiment:
    name: str
    wandb_id: str
    filename: str
    sat_type: str
    metadata: bool
    loss: str

    @property
    def drive_path(self) -> str:
        return f"{self.wandb_id}/{self.filename}"


def _exp(name: str, wandb_id: str, filename: str) -> Experiment:
    parts = name.split("_")
    return Experiment(name, wandb_id, filename, sat_type=parts[-1], metadata="metadata" in parts,
                      loss=parts[1])


#: the authors' ckpt_paths.py
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in [
    _exp("GeoSound_infonce_bingmap", "zgameb0q", "epoch=1-I2S_Recall=0.436.ckpt"),
    _exp("GeoSound_infonce_metadata_bingmap", "n5v3n2a4", "epoch=1-I2S_Recall=0.564.ckpt"),
    _exp("GeoSound_pcmepp_bingmap", "n000csi9", "epoch=1-I2S_Recall=0.468.ckpt"),
    _exp("GeoSound_pcmepp_metadata_bingmap", "15q3k37e", "epoch=0-I2S_Recall=0.666.ckpt"),
    _exp("GeoSound_infonce_sentinel", "ru3pbrz1", "epoch=1-I2S_Recall=0.465-v1.ckpt"),
    _exp("GeoSound_infonce_metadata_sentinel", "kjnvgxhr", "epoch=0-I2S_Recall=0.568.ckpt"),
    _exp("GeoSound_pcmepp_sentinel", "k81mf7ro", "epoch=0-I2S_Recall=0.497.ckpt"),
    _exp("GeoSound_pcmepp_metadata_sentinel", "z2tpbd70", "epoch=0-I2S_Recall=0.666.ckpt"),
    _exp("SoundingEarth_infonce_googleEarth", "x8iwy4a2", "epoch=0-I2S_Recall=0.434.ckpt"),
    _exp("SoundingEarth_infonce_metadata_googleEarth", "8lzdvlan", "epoch=0-I2S_Recall=0.451.ckpt"),
    _exp("SoundingEarth_pcmepp_googleEarth", "mfx8omr1", "epoch=0-I2S_Recall=0.469.ckpt"),
    _exp("SoundingEarth_pcmepp_metadata_googleEarth", "1dh3g756", "epoch=0-I2S_Recall=0.502.ckpt"),
]}


def cache_dir() -> Path:
    root = Path(os.environ.get("PSM_CACHE", Path.home() / ".cache" / "psm-mapping"))
    return root / "checkpoints"


def list_rows() -> list[str]:
    rows = [f"{'name':45s} {'sat type':12s} {'metadata':9s} {'loss':8s} cached"]
    for e in EXPERIMENTS.values():
        cached = "yes" if (cache_dir() / f"{e.name}.ckpt").is_file() else "-"
        rows.append(f"{e.name:45s} {e.sat_type:12s} {'yes' if e.metadata else 'no':9s} {e.loss:8s} {cached}")
    return rows


def get_experiment(name: str) -> Experiment:
    if name not in EXPERIMENTS:
        raise InputError(f"unknown experiment {name!r}: `psm-map weights` lists the 12 official ones")
    return EXPERIMENTS[name]


def download(name: str, dest_dir: Path | None = None, quiet: bool = False) -> Path:
    """Fetch one experiment's checkpoint (only that file) into the cache; resumable."""
    e = get_experiment(name)
    try:
        import gdown
    except ImportError:
        raise InputError("downloading needs gdown: `pip install 'psm-mapping[download]'`") from None
    dest_dir = Path(dest_dir or cache_dir())
    dest_dir.mkdir(parents=True, exist_ok=True)
    out = dest_dir / f"{e.name}.ckpt"
    if out.is_file():
        return out
    try:
        listing = gdown.download_folder(id=DRIVE_FOLDER_ID, skip_download=True, quiet=True)
    except Exception as exc:
        raise CheckpointError(f"cannot list the authors' Google Drive folder ({type(exc).__name__}): "
                              "check the network, or download "
                              f"{e.drive_path} by hand from https://drive.google.com/drive/folders/"
                              f"{DRIVE_FOLDER_ID} and pass --checkpoint") from None
    match = [f for f in listing or [] if str(getattr(f, "path", "")).replace("\\", "/").endswith(e.drive_path)]
    if not match:
        raise CheckpointError(f"{e.drive_path} is not in the Drive folder listing: download it by hand "
                              f"from https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}")
    part = out.with_name(out.name + ".part")
    try:
        gdown.download(id=match[0].id, output=str(part), quiet=quiet, resume=True)
    except Exception as exc:
        raise CheckpointError(f"download of {e.name} failed ({type(exc).__name__}): rerun to resume") from None
    verify(part, expected=e)
    os.replace(part, out)
    return out


def verify(path: str | os.PathLike, expected: Experiment | None = None, clap_config=None) -> dict:
    """Check a file against the key contract (builds the model on the meta device) and record
    its sha256 in the cache registry. Returns the record."""
    from .model.checkpoint import file_sha256, read_checkpoint
    from .model.psm import meta_model

    raw = read_checkpoint(path)
    cfg = meta_model(raw, clap_config).config
    if expected is not None and (cfg.sat_type, cfg.uses_metadata, cfg.loss_type) != (
            expected.sat_type, expected.metadata, expected.loss):
        raise CheckpointError(f"{Path(path).name} is {cfg.sat_type}/{cfg.metadata_type}/{cfg.loss_type}, "
                              f"not {expected.name}: the download is the wrong file; remove it and retry")
    record = {"file": str(Path(path).resolve()), "sha256": file_sha256(path), "sat_type": cfg.sat_type,
              "metadata_type": cfg.metadata_type, "loss_type": cfg.loss_type, "depth": cfg.depth,
              "parameters": sum(v.numel() for v in raw.state_dict.values())}
    reg = cache_dir() / "registry.json"
    try:
        reg.parent.mkdir(parents=True, exist_ok=True)
        data = json.loads(reg.read_text()) if reg.is_file() else {}
        data[record["sha256"]] = record
        tmp = reg.with_name(reg.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, reg)
    except OSError:
        pass
    return record
