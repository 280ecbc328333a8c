"""The official-format fixture reproduces the authors' outputs (PSM_SPEC.md section 7)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from psm_mapping import PSM, Metadata, csd

TOL = {"sat_uncertainty": 1e-4}


@pytest.fixture(scope="module")
def ref(official_fixtures):
    return dict(np.load(official_fixtures / "psm_tiny_meta_sentinel_io.npz"))


@pytest.fixture(scope="module")
def model(official_fixtures):
    return PSM.from_checkpoint(official_fixtures / "psm_tiny_meta_sentinel.ckpt",
                               clap_config=official_fixtures / "psm_tiny_meta_sentinel_clap_config.json")


def fixture_metadata(ref) -> Metadata:
    return Metadata(ref["lat"], ref["lon"], month=np.where(ref["month_valid"] > 0, ref["month"], 0),
                    hour=np.where(ref["hour_valid"] > 0, ref["hour"], -1),
                    audio_source=ref["audio_source"], caption_source=ref["caption_source"])


def outputs(model, ref) -> dict[str, torch.Tensor]:
    s = model.embed_images(torch.from_numpy(ref["images"]), torch.from_numpy(ref["zoom_levels"]),
                           metadata=fixture_metadata(ref))
    t = model.embed_text(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]))
    a = model.embed_audio(torch.from_numpy(ref["input_features"]), torch.from_numpy(ref["is_longer"]))
    return {"sat_mean": s.mean, "sat_logvar": s.logvar, "sat_uncertainty": s.uncertainty(),
            "text_mean": t.mean, "text_logvar": t.logvar, "audio_mean": a.mean, "audio_logvar": a.logvar,
            "csd_sat_text": csd(s, t), "csd_sat_audio": csd(s, a)}


def test_fixture_config(model):
    c = model.config
    assert (c.sat_type, c.metadata_type, c.probabilistic, c.depth, c.embed_dim) == (
        "sentinel", "latlong_month_time_asource_tsource", True, 1, 768)


def test_every_output_matches_reference(model, ref):
    got = outputs(model, ref)
    errs = {k: float(np.abs(v.double().numpy() - ref[k]).max()) for k, v in got.items()}
    print("max abs errors:", errs)
    for k, e in errs.items():
        assert e <= TOL.get(k, 1e-5), (k, e)
    assert got["csd_sat_text"].dtype == torch.float64


def test_known_mistakes_are_caught(model, ref):
    """The bar is tight enough: masking the metadata or shifting hours moves outputs far past it."""
    s = model.embed_images(torch.from_numpy(ref["images"]), torch.from_numpy(ref["zoom_levels"]))
    assert np.abs(s.mean.numpy() - ref["sat_mean"]).max() > 1e-3
    md = fixture_metadata(ref)
    md.hour = np.where(ref["hour_valid"] > 0, (ref["hour"] + 1) % 24, -1)
    s = model.embed_images(torch.from_numpy(ref["images"]), torch.from_numpy(ref["zoom_levels"]), metadata=md)
    assert np.abs(s.mean.numpy() - ref["sat_mean"]).max() > 1e-4


def test_absent_index_buffers_give_same_outputs(official_fixtures, ref, model, tmp_path):
    ck = torch.load(official_fixtures / "psm_tiny_meta_sentinel.ckpt", weights_only=True)
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items()
                        if not k.endswith(("position_ids", "token_type_ids", "relative_position_index"))}
    torch.save(ck, tmp_path / "stripped.ckpt")
    m2 = PSM.from_checkpoint(tmp_path / "stripped.ckpt",
                             clap_config=official_fixtures / "psm_tiny_meta_sentinel_clap_config.json")
    for k, v in outputs(m2, ref).items():
        assert np.abs(v.double().numpy() - ref[k]).max() <= TOL.get(k, 1e-5), k


def test_safetensors_export_identical(model, ref, tmp_path):
    out = model.export_safetensors(tmp_path / "m.safetensors")
    m2 = PSM.from_checkpoint(out)  # CLAP config travels in the metadata
    a, b = outputs(model, ref), outputs(m2, ref)
    for k in a:
        assert torch.equal(a[k], b[k]), k
