"""`psm-map weights`: the 12 official experiments, verify, and download from a Google Drive
stand-in on 127.0.0.1 (tests/servers.py DriveServer: folder pages, the "can't scan for viruses"
confirmation form, Range) with the same code that talks to Drive."""
from __future__ import annotations

import json

import pytest

from psm_mapping import weights
from psm_mapping.cli import main
from psm_mapping.errors import CheckpointError
from psm_mapping.model.checkpoint import file_sha256


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PSM_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "checkpoints"


def test_twelve_experiments(capsys, cache):
    assert len(weights.EXPERIMENTS) == 12
    kinds = {(e.sat_type, e.metadata, e.loss) for e in weights.EXPERIMENTS.values()}
    assert len(kinds) == 12
    assert main(["weights"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in weights.EXPERIMENTS) and str(cache) in out


def test_verify_records_sha256(ckpt_factory, cache, capsys):
    ck = ckpt_factory(sat_type="bingmap", metadata_type="none", probabilistic=False)
    assert main(["weights", "verify", str(ck)]) == 0
    assert "loss_type: infonce" in capsys.readouterr().out
    reg = json.loads((cache / "registry.json").read_text())
    rec = reg[file_sha256(ck)]
    assert (rec["sat_type"], rec["metadata_type"], rec["loss_type"]) == ("bingmap", "none", "infonce")


@pytest.fixture
def drive(monkeypatch, ckpt_factory):
    """A Google Drive stand-in on 127.0.0.1 holding the official layout: the sentinel PCME++
    metadata checkpoint (a tiny one of the same kind) and a bingmap one beside it."""
    from servers import DriveServer

    e = weights.EXPERIMENTS["GeoSound_pcmepp_metadata_sentinel"]
    good = ckpt_factory(sat_type="sentinel").read_bytes()
    other = ckpt_factory(sat_type="bingmap", metadata_type="none").read_bytes()
    with DriveServer(weights.DRIVE_FOLDER_ID, {e.drive_path: good, "zgameb0q/x.ckpt": other}) as srv:
        monkeypatch.setenv("PSM_DRIVE_URL", srv.url)
        monkeypatch.delenv("PSM_WEIGHTS_URL", raising=False)
        srv.good, srv.experiment = good, e
        yield srv


def test_download_from_drive_confirms_and_fetches_only_that_file(drive, cache):
    e = drive.experiment
    out = weights.download(e.name, quiet=True)
    assert out == cache / f"{e.name}.ckpt" and out.read_bytes() == drive.good
    assert drive.downloads == 1 and drive.count("/uc?") == 1  # the warning page, then its form
    assert drive.count("/download?") == 1 and drive.count("confirm=t") == 1
    assert not list(cache.glob("*.part"))
    n = len(drive.requests)
    assert weights.download(e.name) == out and len(drive.requests) == n  # cached: no request


def test_interrupted_download_keeps_a_part_and_resumes(drive, cache):
    e = drive.experiment
    drive.cut_after = 4096
    with pytest.raises(CheckpointError, match="rerun to resume"):
        weights.download(e.name, quiet=True)
    part = cache / f"{e.name}.ckpt.part"
    assert part.stat().st_size == 4096 and not (cache / f"{e.name}.ckpt").exists()
    out = weights.download(e.name, quiet=True)
    assert out.read_bytes() == drive.good and not part.exists()
    gets = [r for r in drive.requests if "/download?" in r]
    assert len(gets) == 2 and gets[-1].endswith("bytes=4096-")  # the rest only


def test_download_of_wrong_file_is_refused(drive, cache, ckpt_factory):
    e = drive.experiment
    wrong = ckpt_factory(sat_type="bingmap", metadata_type="none").read_bytes()
    fid = next(k for k, v in drive.files.items() if v == drive.good)
    drive.files[fid] = wrong
    with pytest.raises(CheckpointError, match="wrong file"):
        weights.download(e.name, quiet=True)
    assert not list(cache.glob(f"{e.name}*"))


def test_download_errors_are_one_line(drive, cache, capsys):
    drive.quota_exceeded = True
    assert main(["weights", "download", drive.experiment.name]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Quota exceeded" in err[0] and "by hand" in err[0], err
    assert main(["weights", "download", "GeoSound_pcmepp_sentinel"]) == 2  # not in the folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "k81mf7ro/" in err[0] and "by hand" in err[0], err
    assert main(["weights", "download", "nope"]) == 2
    assert "psm-map weights" in capsys.readouterr().err


def test_download_needs_no_gdown(drive, cache, tmp_path):
    """The base install downloads: with gdown unimportable, the CLI fetches the checkpoint."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import sys; sys.modules['gdown'] = None; from psm_mapping.cli import main; "
            f"sys.exit(main(['weights', 'download', {drive.experiment.name!r}]))")
    env = {**os.environ, "PYTHONPATH": str(repo)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (cache / f"{drive.experiment.name}.ckpt").read_bytes() == drive.good
    assert "downloading" in r.stderr  # the progress bar


def test_module_entry_points_know_every_subcommand(cache):
    """`python -m psm_mapping` and `python -m psm_mapping.cli` reach the registered subcommands."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[1])}
    for mod in ("psm_mapping", "psm_mapping.cli"):
        r = subprocess.run([sys.executable, "-m", mod, "weights"], capture_output=True, text=True, env=env,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        assert "GeoSound_pcmepp_metadata_sentinel" in r.stdout
