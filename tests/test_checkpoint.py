"""Official checkpoint formats load strictly and safely (issue 3, section 4; PSM_SPEC.md section 1)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from psm_mapping import PSM, CheckpointError, InputError, PSMConfig, csd
from psm_mapping.constants import FULL_METADATA, SAT_TYPES
from psm_mapping.model.checkpoint import _safe_globals
from psm_mapping.model.factory import build_model, hyper_parameters, tiny_clap_config

from conftest import REPO, fixtures_dir

#: the authors trained every `*_metadata_*` experiment, SoundingEarth included, with the default
#: metadata_type of geoclap/train.py (their ckpt_paths.py names no other)
METADATA_TYPES = (FULL_METADATA, "none")
EXPERIMENTS = [(s, loss, mt) for s in SAT_TYPES for loss in ("pcmepp", "infonce") for mt in METADATA_TYPES]
TEXT_BRANCH = "text_encoder.model.model.text_model.embeddings."
AUDIO_BN = "audio_encoder.model.model.audio_model.audio_encoder.batch_norm."


def load(path, **kw) -> PSM:
    return PSM.from_checkpoint(path, clap_config=tiny_clap_config(), **kw)


def inputs(n: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return {"images": torch.randn(n, 3, 224, 224, generator=g), "zoom": torch.tensor([1, 3, 5, 1][:n]),
            "ids": torch.randint(5, 1000, (n, 12), generator=g),
            "feats": torch.randn(n, 4, 1001, 64, generator=g)}


def all_outputs(m: PSM, x) -> dict[str, torch.Tensor]:
    s = m.embed_images(x["images"], x["zoom"])
    t = m.embed_text(x["ids"])
    a = m.embed_audio(x["feats"])
    out = {"sat": s.mean, "sat_raw": s.raw_mean, "text": t.mean, "audio": a.mean}
    if s.logvar is not None:
        out.update(sat_lv=s.logvar, text_lv=t.logvar, audio_lv=a.logvar)
    return out


def raw_ckpt(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def save_variant(ckpt: dict, path: Path) -> Path:
    torch.save(ckpt, path)
    return path


# ---------------------------------------------------------------------------- 12 experiments
@pytest.mark.parametrize("sat_type,loss,metadata_type", EXPERIMENTS)
def test_official_experiment_loads(ckpt_factory, sat_type, loss, metadata_type):
    path = ckpt_factory(sat_type=sat_type, metadata_type=metadata_type, probabilistic=loss == "pcmepp")
    keys = raw_ckpt(path)["state_dict"].keys()
    m = load(path)
    c = m.config
    assert (c.sat_type, c.metadata_type, c.loss_type, c.embed_dim, c.depth) == (
        sat_type, metadata_type, loss, 64, 1)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    assert has("sat_encoder.encoder.meta_fuser.") == (metadata_type != "none")
    if loss == "infonce":
        assert has("audio_encoder.head.linear1.") and has("text_encoder.head.linear2.")
        assert not has("sat_encoder.encoder.mean_head.") and not has("sat_encoder.encoder.std_head.")
        assert not has("audio_encoder.mean_head.") and not has("text_encoder.std_head.")
        assert "criterion.tau" in keys and "criterion.shift" not in keys
    else:
        assert has("sat_encoder.encoder.std_head.") and has("audio_encoder.mean_head.")
        assert not has("audio_encoder.head.")
        assert {"criterion.shift", "criterion.negative_scale"} <= set(keys)
    x = inputs()
    s, t = m.embed_images(x["images"], x["zoom"]), m.embed_text(x["ids"])
    assert s.mean.shape == (2, 512) and t.mean.shape == (2, 512)
    assert torch.allclose(s.mean.norm(dim=-1), torch.ones(2), atol=1e-6)
    assert (s.logvar is None) == (loss == "infonce") == (t.logvar is None)


@pytest.mark.parametrize("metadata_type", METADATA_TYPES)
def test_infonce_embeddings_are_cosine(ckpt_factory, metadata_type):
    """No variances; csd falls back to the float32 dot product of the normalised means."""
    m = load(ckpt_factory(sat_type="bingmap", metadata_type=metadata_type, probabilistic=False))
    x = inputs(3, seed=1)
    s, a, t = m.embed_images(x["images"], x["zoom"][:3]), m.embed_audio(x["feats"]), m.embed_text(x["ids"])
    assert s.logvar is None and a.logvar is None and t.logvar is None
    assert torch.isnan(s.uncertainty()).all()
    # manual: image mean = l2norm(projector output, or CLS of the fuser with everything masked)
    z = m.image_features(x["images"], x["zoom"][:3])
    enc = m.sat_encoder.encoder
    with torch.inference_mode():
        if metadata_type != "none":
            z = enc.meta_fuser(z, None)
        hf = m.audio_encoder.model.model(input_features=x["feats"], is_longer=torch.ones(3, 1, dtype=torch.bool))
        raw_a = m.audio_encoder.head(hf.audio_embeds)
    zn = z.double().numpy()
    np.testing.assert_allclose(s.mean.numpy(), zn / np.linalg.norm(zn, axis=1, keepdims=True), atol=1e-6)
    an = raw_a.double().numpy()
    an /= np.linalg.norm(an, axis=1, keepdims=True)
    np.testing.assert_allclose(a.mean.numpy(), an, atol=1e-6)
    sim = csd(s, a)
    assert sim.dtype == torch.float32 and sim.shape == (3, 3)
    np.testing.assert_allclose(sim.numpy(), s.mean.double().numpy() @ an.T, atol=1e-6)
    assert float(sim.abs().max()) <= 1.0 + 1e-6


def test_gsd_per_sat_type(ckpt_factory):
    """Same weights, different sat_type: the position embedding uses zoom * gsd metres per step."""
    kw = dict(metadata_type="none", probabilistic=True)
    models = {s: load(ckpt_factory(sat_type=s, **kw)) for s in SAT_TYPES}
    x = inputs(1, seed=2)["images"]

    def emb(sat, zoom):
        return models[sat].embed_images(x, torch.tensor([zoom])).mean

    assert models["sentinel"].resolution([1, 3]).tolist() == [10.0, 30.0]
    assert (emb("sentinel", 1) - emb("bingmap", 1)).abs().max() > 1e-4
    assert (emb("bingmap", 1) - emb("googleEarth", 1)).abs().max() > 1e-4
    # googleEarth zoom 3 and bingmap zoom 1 are both 0.6 m per pixel step: the same input
    assert torch.equal(emb("googleEarth", 3), emb("bingmap", 1))


# ---------------------------------------------------------------------------- full-size keys
@pytest.fixture(scope="module")
def official_keys() -> dict:
    path = fixtures_dir().parent / "psm_checkpoint_keys.json"
    if not path.is_file():
        reason = f"psm_checkpoint_keys.json not found beside {fixtures_dir()} (set PSM_FIXTURES)"
        if os.environ.get("PSM_REQUIRE_FIXTURES") == "1":
            pytest.fail(reason + " and PSM_REQUIRE_FIXTURES=1")
        pytest.skip(reason)
    return json.loads(path.read_text())


@pytest.mark.parametrize("metadata_type", METADATA_TYPES)
def test_full_size_model_matches_official_keys(official_keys, metadata_type):
    with torch.device("meta"):
        m = PSM(PSMConfig(metadata_type=metadata_type))  # default CLAP: laion/clap-htsat-fused
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    want = {k: v for k, v in official_keys[metadata_type].items() if not k.startswith("criterion.")}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    bad = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert bad == {}
    params = dict(m.named_parameters())
    assert set(params) <= set(want)
    assert sum(p.numel() for p in params.values()) > 200_000_000  # ViT-B + HTSAT + RoBERTa
    assert got["sat_encoder.encoder.backbone.blocks.11.mlp.fc1.weight"] == [3072, 768]


# ---------------------------------------------------------------------------- strictness
def _strict_error(tiny_ckpt, tmp_path, edit) -> str:
    ck = raw_ckpt(tiny_ckpt)
    edit(ck["state_dict"])
    with pytest.raises(CheckpointError) as ei:
        load(save_variant(ck, tmp_path / "edited.ckpt"))
    msg = str(ei.value)
    assert "\n" not in msg and "edited.ckpt" in msg
    return msg


def test_missing_parameter_is_named(tiny_ckpt, tmp_path):
    msg = _strict_error(tiny_ckpt, tmp_path, lambda sd: sd.pop("sat_encoder.encoder.mean_head.linear1.bias"))
    assert "missing 1: sat_encoder.encoder.mean_head.linear1.bias expected [512]" in msg


def test_unexpected_parameter_is_named(tiny_ckpt, tmp_path):
    msg = _strict_error(tiny_ckpt, tmp_path,
                        lambda sd: sd.__setitem__("sat_encoder.encoder.extra.weight", torch.zeros(3, 4)))
    assert "unexpected 1: sat_encoder.encoder.extra.weight found [3, 4]" in msg


def test_misshaped_parameter_is_named(tiny_ckpt, tmp_path):
    msg = _strict_error(tiny_ckpt, tmp_path,
                        lambda sd: sd.__setitem__("text_encoder.mean_head.linear2.weight", torch.zeros(512, 256)))
    assert "mis-shaped 1: text_encoder.mean_head.linear2.weight expected [512, 512] found [512, 256]" in msg


def test_many_mismatches_name_three_keys_per_category(tiny_ckpt, tmp_path):
    def edit(sd):
        for k in [k for k in sd if k.startswith("text_encoder.") and k.endswith(".weight")][:5]:
            sd["renamed_" + k] = sd.pop(k)

    msg = _strict_error(tiny_ckpt, tmp_path, edit)
    assert "missing 5: " in msg and "unexpected 5: " in msg
    assert msg.count("expected [") == 3 and msg.count(" found [") == 3
    assert msg.count("(+2 more)") == 2 and len(msg) < 800


def test_missing_batchnorm_statistics_is_an_error(tiny_ckpt, tmp_path):
    msg = _strict_error(tiny_ckpt, tmp_path, lambda sd: sd.pop(AUDIO_BN + "running_mean"))
    assert f"missing 1: {AUDIO_BN}running_mean expected [64]" in msg


def test_absent_index_buffers_load_and_give_identical_outputs(tiny_ckpt, tmp_path):
    ck = raw_ckpt(tiny_ckpt)
    opt = [k for k in ck["state_dict"] if k.endswith(("position_ids", "token_type_ids", "relative_position_index"))]
    assert TEXT_BRANCH + "position_ids" in opt and any(k.endswith("relative_position_index") for k in opt)
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items() if k not in opt}
    stripped = load(save_variant(ck, tmp_path / "stripped.ckpt"))
    full = load(tiny_ckpt)
    for k in opt:
        assert torch.equal(stripped.state_dict()[k], full.state_dict()[k]), k
    x = inputs()
    a, b = all_outputs(full, x), all_outputs(stripped, x)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------------------- safety
class _SystemCall:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Exec:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload,global_name", [(_SystemCall, "system"), (_Exec, "exec")])
def test_malicious_pickle_executes_nothing(tiny_ckpt, tmp_path, payload, global_name):
    marker = tmp_path / "PWNED"
    ck = raw_ckpt(tiny_ckpt)
    ck["hyper_parameters"]["evil"] = payload(marker)
    path = save_variant(ck, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError) as ei:
        load(path)
    msg = str(ei.value)
    assert "\n" not in msg and "needs the global" in msg and global_name in msg and "not allowed" in msg
    assert not marker.exists()


def _bad_files(tiny_ckpt, tmp_path) -> dict[str, Path]:
    data = tiny_ckpt.read_bytes()
    out = {"truncated": tmp_path / "truncated.ckpt", "text": tmp_path / "notes.ckpt",
           "empty": tmp_path / "empty.ckpt", "missing": tmp_path / "missing.ckpt",
           "truncated_st": tmp_path / "cut.safetensors"}
    out["truncated"].write_bytes(data[: len(data) // 2])
    out["text"].write_text("this is not a checkpoint\nbut some notes\n")
    out["empty"].write_bytes(b"")
    out["truncated_st"].write_bytes(b"\x00" * 7)
    return out


def test_broken_files_give_one_line_errors(tiny_ckpt, tmp_path):
    for kind, path in _bad_files(tiny_ckpt, tmp_path).items():
        with pytest.raises(CheckpointError) as ei:
            load(path)
        msg = str(ei.value)
        assert "\n" not in msg and len(msg) < 400, (kind, msg)
        assert path.name in msg, (kind, msg)
        assert ("not found" if kind == "missing" else "not a readable") in msg, (kind, msg)


def test_broken_files_through_cli(tiny_ckpt, tmp_path, capsys):
    from psm_mapping.cli import main

    for kind, path in _bad_files(tiny_ckpt, tmp_path).items():
        rc = main(["convert", str(path), str(tmp_path / f"{kind}.safetensors")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith("psm-map: error:"), (kind, err)
        assert not (tmp_path / f"{kind}.safetensors").exists()


def test_truncated_checkpoint_cli_subprocess(tiny_ckpt, tmp_path):
    """A real process: exit code 2 and one stderr line, no traceback."""
    bad = _bad_files(tiny_ckpt, tmp_path)["truncated"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "psm_mapping.cli", "convert", str(bad),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True, env=env,
                          timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("psm-map: error:"), proc.stderr
    assert "truncated.ckpt" in lines[0] and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------- a real Lightning checkpoint
def _lightning_checkpoint(tmp_path):
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch import nn

    class Criterion(nn.Module):
        def __init__(self):
            super().__init__()
            self.shift = nn.Parameter(torch.tensor([5.0]))
            self.negative_scale = nn.Parameter(torch.tensor([5.0]))

    class PSMTrainer(L.LightningModule):
        def __init__(self, **hparams):
            super().__init__()
            self.save_hyperparameters()
            psm = build_model(sat_type=hparams["sat_type"], embed_dim=64)
            self.sat_encoder, self.audio_encoder = psm.sat_encoder, psm.audio_encoder
            self.text_encoder, self.criterion = psm.text_encoder, Criterion()
            self._psm = [psm]  # a list: not a submodule, keys stay the PSM keys

        def training_step(self, batch, _):
            images, ids = batch
            enc = self.sat_encoder.encoder
            z = enc.projector(enc.backbone(images, torch.full((len(images),), 0.6)))
            z = enc.meta_fuser(z, None)
            t = self.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids))
            logits = -self.criterion.negative_scale * ((enc.mean_head(z) - t.raw_mean) ** 2).sum(-1)
            return (logits + self.criterion.shift).pow(2).mean() + enc.std_head(z).exp().mean()

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.2)
            sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=5000)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    hp = hyper_parameters("bingmap", FULL_METADATA, True, lr=np.float64(5e-5), batch_size=2)
    module = PSMTrainer(**hp)
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 224, 224, generator=g),
                                          torch.randint(5, 1000, (4, 16), generator=g))
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpts", save_top_k=1)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt_cb], num_sanity_val_steps=0)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    return module, Path(ckpt_cb.best_model_path)


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _lightning_checkpoint(tmp_path_factory.mktemp("lightning"))


def test_real_lightning_checkpoint_loads(lightning_ckpt):
    module, path = lightning_ckpt
    with torch.serialization.safe_globals(_safe_globals()):
        ck = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("optimizer_states", "lr_schedulers", "callbacks", "loops", "hparams_name", "hyper_parameters"):
        assert key in ck, key
    assert ck["optimizer_states"][0]["state"]  # AdamW moments were saved
    assert isinstance(ck["hyper_parameters"]["lr"], np.float64)
    m = load(path)
    assert (m.config.sat_type, m.config.metadata_type, m.config.probabilistic) == ("bingmap", FULL_METADATA, True)
    assert m.source["hyper_parameters"]["lr"] == 5e-5
    trained = module._psm[0].eval()
    x = inputs(2, seed=3)
    got, want = all_outputs(m, x), all_outputs(trained, x)
    for k in got:
        assert torch.equal(got[k], want[k]), k
    key = "sat_encoder.encoder.mean_head.linear2.weight"
    init = build_model(sat_type="bingmap", embed_dim=64).state_dict()[key]
    assert (m.state_dict()[key] - init).abs().max() > 1e-5  # training changed the weights we compare


def test_lightning_attributedict_hyper_parameters(lightning_ckpt, tmp_path):
    """Older Lightning saved ``hparams`` as its AttributeDict: allowed, nothing else is."""
    from lightning.fabric.utilities.data import AttributeDict

    _, path = lightning_ckpt
    with torch.serialization.safe_globals(_safe_globals()):
        ck = torch.load(path, map_location="cpu", weights_only=True)
    ck["hyper_parameters"] = AttributeDict(ck["hyper_parameters"])
    ck["hyper_parameters"]["sat_type"] = "sentinel"
    m = load(save_variant(ck, tmp_path / "attrdict.ckpt"))
    assert m.config.sat_type == "sentinel"


# ---------------------------------------------------------------------------- safetensors export
def test_safetensors_export_bit_identical_and_mapped(tiny_ckpt, tmp_path):
    from safetensors import safe_open

    m = load(tiny_ckpt)
    out = m.export_safetensors(tmp_path / "m.safetensors")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "psm-mapping/1"
    assert json.loads(meta["psm_config"]) == asdict(m.config)
    clap = json.loads(meta["clap_config"])
    assert clap["audio_config"]["hidden_size"] == 64 and clap["text_config"]["hidden_size"] == 32
    assert json.loads(meta["hyper_parameters"])["sat_type"] == "sentinel"
    m2 = PSM.from_checkpoint(out)  # CLAP config travels with the file
    assert m2.source["format"] == "safetensors" and m2.config == m.config
    if Path("/proc/self/maps").is_file():
        assert str(out.resolve()) in Path("/proc/self/maps").read_text()  # memory-mapped, not read
    x = inputs()
    a, b = all_outputs(m, x), all_outputs(m2, x)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_float16_checkpoint_computes_in_float32(ckpt_factory):
    path = ckpt_factory(sat_type="sentinel", metadata_type="none", dtype=torch.float16)
    assert raw_ckpt(path)["state_dict"]["sat_encoder.encoder.projector.linear1.weight"].dtype == torch.float16
    m = load(path)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert m.embed_images(inputs(1)["images"], [1]).mean.dtype == torch.float32


def test_encoders_loads_only_the_towers_asked_for(tiny_ckpt, tmp_path):
    """A store query needs no image encoder, a text query no audio one: leaving them out loads
    the rest with the same weights and outputs, and a call that needs a missing tower says so."""
    full = load(tiny_ckpt)
    text_only = load(tiny_ckpt, encoders=("text",))
    assert not hasattr(text_only, "audio_encoder") and not hasattr(text_only.sat_encoder.encoder, "backbone")
    n_full = sum(p.numel() for p in full.parameters())
    n_text = sum(p.numel() for p in text_only.parameters())
    n_left_out = sum(v.numel() for k, v in full.named_parameters()
                     if k.startswith(("audio_encoder.", "sat_encoder.encoder.backbone.")))
    assert n_left_out > 0 and n_text == n_full - n_left_out
    x = inputs()
    z = full.image_features(x["images"], x["zoom"])
    for a, b in ((full.embed_text(x["ids"]), text_only.embed_text(x["ids"])),
                 (full.embed_image_features(z), text_only.embed_image_features(z))):
        torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
        torch.testing.assert_close(a.logvar, b.logvar, rtol=0, atol=0)
    with pytest.raises(InputError, match="without its image encoder"):
        text_only.image_features(x["images"], x["zoom"])
    with pytest.raises(InputError, match="without its audio encoder"):
        text_only.embed_audio(x["feats"])
    with pytest.raises(InputError, match="unknown encoder"):
        load(tiny_ckpt, encoders=("text", "video"))
    # strictness stays for the towers that are loaded
    ck = raw_ckpt(tiny_ckpt)
    del ck["state_dict"]["text_encoder.mean_head.linear1.bias"]
    with pytest.raises(CheckpointError, match="missing 1: text_encoder.mean_head.linear1.bias"):
        load(save_variant(ck, tmp_path / "edited.ckpt"), encoders=("text",))
