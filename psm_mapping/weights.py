"""The 12 official PSM experiments: list, find, download, verify, load.

Downloads come from the authors' Google Drive folder (with httpx, from the base install:
:mod:`psm_mapping.drive` lists the folder and confirms Drive's "download anyway" page) or, when
``$PSM_WEIGHTS_URL`` is set, from that HTTP mirror of the folder (``<url>/<wandb id>/<file
name>``, e.g. an institute's copy). Both stream to ``NAME.ckpt.part`` with a progress bar and
resume it on the next try (HTTP Range); a download that ends short is an error. Files land in the cache folder
(``$PSM_CACHE`` or ``~/.cache/psm-mapping``) under ``checkpoints/NAME.ckpt``, are checked against
the key contract (:func:`verify`) before they get that name, and a map run with no checkpoint
fetches the official one for its imagery's sat type on first use. Offline
(:mod:`psm_mapping.offline`) a missing checkpoint is one line naming what to pass.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, InputError

DRIVE_FOLDER_ID = "1RaMykYcGeZTJ0W3nLuVVDv95azojt1T4"
DRIVE_URL = f"https://drive.google.com/drive/folders/{DRIVE_FOLDER_ID}"
#: the checkpoint a map run uses when none is given, per sat type of the imagery
DEFAULT_EXPERIMENT = {"sentinel": "GeoSound_pcmepp_metadata_sentinel",
                      "bingmap": "GeoSound_pcmepp_metadata_bingmap",
                      "googleEarth": "SoundingEarth_pcmepp_metadata_googleEarth"}


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


def download(name: str, dest_dir: Path | None = None, quiet: bool = False, url: str | None = None) -> Path:
    """Fetch one experiment's checkpoint (only that file) into the cache, verify it, and give it
    its final name; resumable. ``url`` (default ``$PSM_WEIGHTS_URL``): an HTTP mirror of the
    authors' folder instead of Google Drive."""
    from .offline import is_offline

    e = get_experiment(name)
    dest_dir = Path(dest_dir or cache_dir())
    out = dest_dir / f"{e.name}.ckpt"
    if out.is_file():
        return out
    base = url or os.environ.get("PSM_WEIGHTS_URL")
    if is_offline():
        raise CheckpointError(f"checkpoint {e.name} is not in the cache {dest_dir} and offline mode is on: "
                              f"pass --checkpoint PATH, or run `psm-map weights download {e.name}` once online",
                              option="checkpoint")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the checkpoint cache {dest_dir} ({exc.strerror}): set PSM_CACHE "
                              "to a writable folder") from None
    part = out.with_name(out.name + ".part")
    if base:
        _download_http(f"{base.rstrip('/')}/{e.drive_path}", part, e.name, quiet)
    else:
        _download_drive(e, part, quiet)
    try:
        verify(part, expected=e)
    except CheckpointError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, out)
    return out


def _client():
    import httpx

    from .imagery.http import DEFAULT_USER_AGENT

    return httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=15.0),
                        headers={"User-Agent": DEFAULT_USER_AGENT})


def _download_http(url: str, part: Path, name: str, quiet: bool) -> None:
    """GET ``url`` (a plain mirror) into ``part`` with a progress bar, resuming a partial file."""
    import httpx

    from .drive import stream_to
    from .offline import reachable

    if not reachable(url):
        raise CheckpointError(f"cannot reach {url.split('/')[2]} for {name} (no network?): pass --checkpoint "
                              "PATH, or download it with `psm-map weights download` once online",
                              option="checkpoint")
    try:
        with _client() as client:
            stream_to(client, url, None, part, name, quiet)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc.cli_message}: rerun to resume, check PSM_WEIGHTS_URL or pass "
                              "--checkpoint PATH", option="checkpoint") from None
    except httpx.HTTPError as exc:
        raise CheckpointError(f"download of {name} from {url} failed ({type(exc).__name__}): rerun to "
                              "resume, or pass --checkpoint PATH", option="checkpoint") from None


def _download_drive(e: Experiment, part: Path, quiet: bool) -> None:
    """The authors' Google Drive folder with httpx (:mod:`psm_mapping.drive`): find the file,
    confirm past the "can't scan for viruses" page, stream it resumably."""
    import httpx

    from .drive import download_file, drive_base, find_file
    from .offline import reachable

    if not reachable(drive_base()):
        raise CheckpointError(f"cannot reach Google Drive for {e.name} (no network?): pass --checkpoint PATH, "
                              f"or download {e.drive_path} from {DRIVE_URL} once online", option="checkpoint")
    try:
        with _client() as client:
            fid = find_file(client, DRIVE_FOLDER_ID, e.drive_path)
            download_file(client, fid, part, e.name, quiet)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc.cli_message}: rerun to resume, or download {e.drive_path} by hand "
                              f"from {DRIVE_URL} and pass --checkpoint PATH", option="checkpoint") from None
    except httpx.HTTPError as exc:
        raise CheckpointError(f"download of {e.name} from Google Drive failed ({type(exc).__name__}: "
                              f"{' '.join(str(exc).split())}): rerun to resume, or download {e.drive_path} "
                              f"by hand from {DRIVE_URL} and pass --checkpoint PATH", option="checkpoint") from None


def resolve_checkpoint(path: str | None, sat_type: str = "sentinel", download_missing: bool = True,
                       quiet: bool = False) -> Path:
    """A checkpoint path (or an official experiment name, found in the cache), else
    ``$PSM_CHECKPOINT``, else the single file in the cache folder, else the official checkpoint
    for ``sat_type`` (:data:`DEFAULT_EXPERIMENT`), downloaded into the cache on first use."""
    path = path or os.environ.get("PSM_CHECKPOINT")
    if path:
        p = Path(path).expanduser()
        if not p.exists() and str(path) in EXPERIMENTS:
            cached = cache_dir() / f"{path}.ckpt"
            if not cached.is_file():
                raise CheckpointError(f"checkpoint {path} is not in the cache {cache_dir()}: run "
                                      f"`psm-map weights download {path}` (needs a network) or pass "
                                      "--checkpoint PATH", option="checkpoint")
            return cached
        return p
    found = sorted(cache_dir().glob("*.ckpt")) + sorted(cache_dir().glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    default = DEFAULT_EXPERIMENT.get(sat_type, DEFAULT_EXPERIMENT["sentinel"])
    if (cache_dir() / f"{default}.ckpt").is_file():
        return cache_dir() / f"{default}.ckpt"
    if found or not download_missing:
        raise CheckpointError("no checkpoint given: pass --checkpoint PATH, set PSM_CHECKPOINT, or "
                              "`psm-map weights download NAME` (list: `psm-map weights`)"
                              + (f"; the cache {cache_dir()} holds {len(found)} files, pick one" if found else ""),
                              option="checkpoint")
    return download(default, quiet=quiet)


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
