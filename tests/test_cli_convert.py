"""``psm-map convert CKPT OUT.safetensors``."""
from __future__ import annotations

import json

import pytest
import torch

from psm_mapping import PSM
from psm_mapping.cli import main
from psm_mapping.model.factory import tiny_clap_config


@pytest.fixture(scope="module")
def clap_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("clap") / "clap_config.json"
    tiny_clap_config().to_json_file(str(path))
    return path


def test_convert_writes_a_loadable_file(tiny_ckpt, clap_json, tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["convert", str(tiny_ckpt), str(out), "--clap-config", str(clap_json)]) == 0
    assert "wrote" in capsys.readouterr().out and out.is_file()
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary name was renamed away
    ref = PSM.from_checkpoint(tiny_ckpt, clap_config=clap_json)
    m = PSM.from_checkpoint(out)
    assert m.config == ref.config and m.source["format"] == "safetensors"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.embed_images(x, [1, 5]).mean, ref.embed_images(x, [1, 5]).mean)
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(m.embed_text(ids).logvar, ref.embed_text(ids).logvar)
    assert set(m.state_dict()) == set(ref.state_dict())


def test_existing_output_needs_overwrite(tiny_ckpt, clap_json, tmp_path, capsys):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert main(["convert", str(tiny_ckpt), str(out), "--clap-config", str(clap_json)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("psm-map: error:") and "--overwrite" in err[0]
    assert out.read_bytes() == b"keep me"
    assert main(["convert", str(tiny_ckpt), str(out), "--clap-config", str(clap_json), "--overwrite"]) == 0
    assert PSM.from_checkpoint(out).config.metadata_type == "latlong_month_time_asource_tsource"


def test_wrong_clap_config_names_the_fix(tiny_ckpt, clap_json, tmp_path, capsys):
    """An official file carries no CLAP config: without --clap-config the default (full-size)
    CLAP does not match tiny weights, and the message says which option fixes it."""
    ck = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ck["hyper_parameters"].pop("clap_config", None)
    official = tmp_path / "official_like.ckpt"
    torch.save(ck, official)
    rc = main(["convert", str(official), str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--clap-config" in err[0] and "mis-shaped" in err[0]
    assert not (tmp_path / "x.safetensors").exists()
    assert main(["convert", str(official), str(tmp_path / "x.safetensors"), "--clap-config", str(clap_json)]) == 0


def test_missing_output_folder(tiny_ckpt, clap_json, tmp_path, capsys):
    rc = main(["convert", str(tiny_ckpt), str(tmp_path / "no" / "x.safetensors"), "--clap-config", str(clap_json)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_bad_clap_config_json(tiny_ckpt, tmp_path, capsys):
    bad = tmp_path / "clap.json"
    bad.write_text("{not json")
    rc = main(["convert", str(tiny_ckpt), str(tmp_path / "x.safetensors"), "--clap-config", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and "not valid JSON" in err and len(err.strip().splitlines()) == 1
    json.loads(tiny_clap_config().to_json_string())  # sanity: the good one is JSON
