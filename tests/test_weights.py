"""`psm-map weights`: the 12 official experiments, verify, and download up to the network step
(gdown's Google Drive calls are replaced by local copies: the network cannot be reached here)."""
from __future__ import annotations

import json
import shutil
import types

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


def _fake_gdown(monkeypatch, files: dict[str, str]):
    """gdown whose folder listing and download serve local files (id -> path)."""
    calls = []

    def download_folder(id=None, skip_download=False, quiet=True, **kw):
        assert id == weights.DRIVE_FOLDER_ID and skip_download
        return [types.SimpleNamespace(id=fid, path=f"best_ckpts/{rel}") for fid, (rel, _) in files.items()]

    def download(id=None, output=None, quiet=False, resume=False, **kw):
        calls.append((id, resume))
        shutil.copy(files[id][1], output)
        return output

    monkeypatch.setitem(__import__("sys").modules, "gdown",
                        types.SimpleNamespace(download_folder=download_folder, download=download))
    return calls


def test_download_fetches_only_that_file_and_verifies(ckpt_factory, cache, monkeypatch):
    e = weights.EXPERIMENTS["GeoSound_pcmepp_metadata_sentinel"]
    good = ckpt_factory(sat_type="sentinel")
    other = ckpt_factory(sat_type="bingmap", metadata_type="none")
    calls = _fake_gdown(monkeypatch, {"F1": (e.drive_path, good), "F2": ("zgameb0q/x.ckpt", other)})
    out = weights.download(e.name)
    assert out == cache / f"{e.name}.ckpt" and file_sha256(out) == file_sha256(good)
    assert calls == [("F1", True)]
    assert weights.download(e.name) == out and len(calls) == 1  # cached: no second download


def test_download_of_wrong_file_is_refused(ckpt_factory, cache, monkeypatch):
    e = weights.EXPERIMENTS["GeoSound_pcmepp_metadata_sentinel"]
    wrong = ckpt_factory(sat_type="bingmap", metadata_type="none")
    _fake_gdown(monkeypatch, {"F1": (e.drive_path, wrong)})
    with pytest.raises(CheckpointError, match="wrong file"):
        weights.download(e.name)
    assert not (cache / f"{e.name}.ckpt").exists()


def test_download_errors_are_one_line(cache, monkeypatch, capsys):
    _fake_gdown(monkeypatch, {})
    assert main(["weights", "download", "GeoSound_pcmepp_sentinel"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "download it by hand" in err[0]
    assert main(["weights", "download", "nope"]) == 2
    assert "psm-map weights" in capsys.readouterr().err


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
