"""Training: PCME++ / InfoNCE numbers, metadata dropout, augmentation, and a short real training run
on synthetic shards whose image colour and audio spectrum are correlated (10 classes): the loss
falls, validation R@10% rises well above chance, and the best checkpoint maps a region."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from psm_mapping.model.heads import ProbEmbedding, l2norm
from psm_mapping.train.data import (Collate, DataConfig, ShardDataset, apply_metadata_dropout, drop_metadata,
                                    make_loader, prepare, zoom_crop)
from psm_mapping.train.loss import InfoNCELoss, PCMEppLoss, total_loss
from psm_mapping.train.shards import Sample, write_shards

#: a CLAP small enough to train on 2 CPU cores (64 x 64 mel "images", 2 Swin stages)
MICRO_CLAP = {
    "audio_config": {"enable_fusion": True, "patch_embeds_hidden_size": 8, "hidden_size": 16, "depths": [1, 1],
                     "num_attention_heads": [1, 1], "projection_dim": 64, "spec_size": 64, "window_size": 4},
    "text_config": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
                    "vocab_size": 1000, "projection_dim": 64, "max_position_embeddings": 160},
    "projection_dim": 64,
}
COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230], [128, 128, 0], [0, 0, 128]], dtype=np.float32)
WORDS = ["birds", "waves", "traffic", "wind", "rain", "bells", "frogs", "train", "children", "river"]
SOURCES = ["yfcc", "iNat", "aporee", "freesound"]


def synthetic_samples(n: int, seed: int, size: int = 24, frames: int = 64, mels=(1,)):
    """Class c = i % 10: a solid colour image (+ noise) and a class-specific mel spectrum profile."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = i % len(COLOURS)
        img = np.clip(COLOURS[c] + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        prof = np.random.default_rng(100 + c).normal(0, 1.5, 64).astype(np.float32)
        mel = {v: torch.from_numpy((prof[None, None] + rng.normal(0, 0.3, (4, frames, 64))).astype(np.float32))
               for v in mels}
        src = SOURCES[i % 4]
        key = f"{src}-s{seed}n{i}"
        meta = {"sample_id": key, "latitude": float(rng.uniform(-60, 60)), "longitude": float(rng.uniform(-170, 170)),
                "date": f"2020-{1 + i % 12:02d}-03 {i % 24:02d}:15:00", "text": f"the sound of {WORDS[c]} here"}
        yield Sample.create(key, meta, image=img, mels=mel)


def write_synthetic(out: Path, n_train=80, n_val=40, n_test=20, mels=(1,)) -> Path:
    write_shards(synthetic_samples(n_train, 1, mels=mels), out, "train", max_count=40)
    write_shards(synthetic_samples(n_val, 2, mels=mels), out, "val")
    write_shards(synthetic_samples(n_test, 3, mels=mels), out, "test")
    return out


# ------------------------------------------------------------------------- loss numbers
def _emb(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, d, generator=g)
    return ProbEmbedding.from_heads(raw, torch.randn(n, d, generator=g) * 0.5 - 2)


def _bce(x, y):
    return -(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x))))


def test_pcmepp_matches_reference_computation():
    n, d = 6, 5
    a, b = _emb(n, d, 0), _emb(n, d, 1)
    # make pair (0, 3) as close as the true pair so pseudo-positives exist
    b.mean[3] = a.mean[0].clone()
    crit = PCMEppLoss(5.0, 5.0, vib_beta=1e-4, pseudo_match_alpha=0.1)
    with torch.no_grad():
        crit.shift.fill_(3.0)
        crit.negative_scale.fill_(0.7)
    loss, stats = crit(a, b)
    # straightforward reference, entry by entry
    A, B = a.mean.double().tolist(), b.mean.double().tolist()
    VA, VB = a.logvar.double().exp().tolist(), b.logvar.double().exp().tolist()
    L = [[-0.7 * (sum((A[i][k] - B[j][k]) ** 2 for k in range(d)) + sum(VA[i]) + sum(VB[j])) + 3.0
          for j in range(n)] for i in range(n)]
    base = sum(_bce(L[i][j], float(i == j)) for i in range(n) for j in range(n)) / n ** 2
    p1 = sum(_bce(L[i][j], float(L[i][j] >= L[i][i])) for i in range(n) for j in range(n)) / n ** 2
    p2 = sum(_bce(L[j][i], float(L[j][i] >= L[i][i])) for i in range(n) for j in range(n)) / n ** 2

    def kl(mu, lv):
        return -0.5 * sum(1 + lv[i][k] - mu[i][k] ** 2 - math.exp(lv[i][k]) for i in range(n) for k in range(d)) / (n * d)

    vib = kl(A, a.logvar.double().tolist()) + kl(B, b.logvar.double().tolist())
    ref = 2 * base + 1e-4 * vib + 0.1 * (p1 + p2)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    assert sum(L[0][j] >= L[0][0] for j in range(n)) >= 2  # the pseudo-positive is really there
    assert int(stats["n_pseudo"]) >= 1
    loss.backward()
    assert crit.shift.grad is not None and crit.negative_scale.grad is not None
    assert set(dict(crit.named_parameters())) == {"shift", "negative_scale"}


def test_infonce_and_total_loss():
    a, b, t = _emb(5, 4, 0), _emb(5, 4, 1), _emb(5, 4, 2)
    crit = InfoNCELoss()
    assert set(dict(crit.named_parameters())) == {"tau"} and crit.tau.item() == 1.0
    loss, _ = crit(a, b)
    cos = a.mean @ b.mean.T
    ref = (torch.nn.functional.cross_entropy(cos, torch.arange(5)) +
           torch.nn.functional.cross_entropy(cos.T, torch.arange(5))) / 2
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    tot, parts = total_loss(crit, a, b, t)
    ref_tot = 0.5 * crit(a, b)[0] + 0.5 * (crit(a, t)[0] + crit(b, t)[0])
    assert tot.item() == pytest.approx(ref_tot.item(), rel=1e-6)
    assert total_loss(crit, a, b, None)[0].item() == pytest.approx(loss.item())


# ------------------------------------------------------------------------- metadata dropout
@pytest.mark.parametrize("b,rate,invalid", [(8, 0.5, 0), (8, 0.5, 2), (8, 0.5, 6), (7, 0.5, 0), (10, 0.3, 1)])
def test_metadata_dropout_exact_count(b, rate, invalid):
    g = torch.Generator().manual_seed(0)
    valid = torch.ones(b, dtype=torch.bool)
    valid[:invalid] = False
    out = drop_metadata(valid, rate, g)
    assert int((~out).sum()) == max(int(rate * b), invalid)
    assert not bool((out & ~valid).any())  # never revalidates
    enc = torch.ones(b, 2)
    meta = apply_metadata_dropout({"month": (enc, valid), "asource": (torch.arange(b), valid)}, rate, g)
    for name, (x, v) in meta.items():
        assert int((~v).sum()) == max(int(rate * b), invalid)
    x, v = meta["month"]
    assert torch.all(x[~v] == 0) and torch.all(x[v] == 1)


# ------------------------------------------------------------------------- data pipeline
def test_zoom_crop_and_views(tmp_path):
    # official size: exact reference crop (z * 256 px) then 256 px
    img = np.random.default_rng(0).integers(0, 255, (1280, 1280, 3), dtype=np.uint8)
    z5 = zoom_crop(img, 5, "sentinel")
    assert z5.shape == (3, 256, 256)
    z1 = zoom_crop(img, 1, "sentinel")
    ref = torch.from_numpy(img[512:768, 512:768]).permute(2, 0, 1).float() / 255
    assert torch.equal(z1, ref)  # 256 -> 256: no resampling
    # small image: the crop scales with the image (same footprint)
    small = np.zeros((40, 40, 3), np.uint8)
    small[:, :20] = 255
    assert zoom_crop(small, 5, "sentinel").shape == (3, 256, 256)
    left = zoom_crop(small, 5, "sentinel")
    assert left[:, :, :100].mean() > 0.95 and left[:, :, -100:].mean() < 0.05

    write_synthetic(tmp_path, n_train=8, n_val=4, n_test=1)
    s = next(iter(synthetic_samples(1, 9)))
    cfg = DataConfig(metadata_type="latlong_month_time_asource_tsource", mel_versions=(1,))
    g = torch.Generator().manual_seed(0)
    items = [prepare(s, cfg, g) for _ in range(20)]
    assert {it.zoom_level for it in items} == {1, 3, 5}
    assert all(it.image.shape == (3, 224, 224) for it in items)
    ev = prepare(s, DataConfig(train=False, mel_versions=(1,)))
    assert ev.zoom_level == 1 and ev.mel_version == 1
    assert torch.equal(ev.image, prepare(s, DataConfig(train=False, mel_versions=(1,))).image)
    fs = [x for x in synthetic_samples(8, 4) if x.source == "freesound"][0]
    assert prepare(fs, DataConfig(train=False)).hour == -1
    # a batch, from the stream of training shards
    ds = ShardDataset(str(tmp_path / "train_*.tar"), cfg, shuffle_buffer=4)
    batch = next(iter(make_loader(ds, 4, Collate(cfg.metadata_type))))
    assert batch["image"].shape == (4, 3, 224, 224) and batch["input_features"].shape == (4, 4, 64, 64)
    assert set(batch["meta"]) >= {"latlong", "month", "time", "asource", "tsource", "time_valid"}


def test_training_forward_equals_psm_inference():
    """The module's image path in eval mode gives PSM's inference numbers (fusion with metadata)."""
    from psm_mapping.model.metadata import Metadata
    from psm_mapping.train.data import Item, meta_inputs, unflatten_meta
    from psm_mapping.train.module import PSMLightning

    torch.manual_seed(0)
    m = PSMLightning(embed_dim=64, depth=1, num_heads=1, fc_dim=16, clap_config=MICRO_CLAP).eval()
    psm = m.to_psm()
    images = torch.randn(3, 3, 224, 224)
    zoom = torch.tensor([1, 3, 5])
    items = [Item("k", images[i], int(zoom[i]), torch.zeros(4, 8, 64), 1, "", 10.0 * i, 20.0, [0, 5, 12][i],
                  [3, -1, 23][i], i, 1) for i in range(3)]
    meta = unflatten_meta(meta_inputs(items, m.hparams.metadata_type))
    from psm_mapping.train.evaluate import image_embedding, keep_metadata

    with torch.no_grad():
        ours = image_embedding(m.sat_encoder, "sentinel", True, images, zoom, meta)
        masked = image_embedding(m.sat_encoder, "sentinel", True, images, zoom, keep_metadata(meta, "none"))
    md = Metadata(lat=[0, 10, 20], lon=20.0, month=[0, 5, 12], hour=[3, -1, 23], audio_source=[0, 1, 2],
                  caption_source=1)
    ref = psm.embed_images(images, zoom, md)
    ref_masked = psm.embed_images(images, zoom, None)
    assert torch.allclose(ours.mean, ref.mean, atol=1e-6) and torch.allclose(ours.logvar, ref.logvar, atol=1e-6)
    assert torch.allclose(masked.mean, ref_masked.mean, atol=1e-6)
    assert set(k.split(".")[0] for k in m.state_dict()) == {"sat_encoder", "audio_encoder", "text_encoder", "criterion"}


# ------------------------------------------------------------------------- SatMAE / CLAP init
def test_satmae_and_clap_init(tmp_path):
    from transformers import ClapModel

    from psm_mapping.errors import CheckpointError
    from psm_mapping.model.clap import resolve_clap_config
    from psm_mapping.train.module import PSMLightning

    m = PSMLightning(embed_dim=64, depth=1, num_heads=1, fc_dim=16, clap_config=MICRO_CLAP,
                     metadata_type="none")
    bb = m.sat_encoder.encoder.backbone
    sd = {k: torch.randn_like(v) for k, v in bb.state_dict().items() if k != "fc_norm.weight" and k != "fc_norm.bias"}
    sd.update({"cls_token": torch.zeros(1, 1, 64), "pos_embed": torch.zeros(1, 197, 64),
               "decoder_embed.weight": torch.zeros(8, 64), "norm.weight": torch.ones(64)})
    path = tmp_path / "satmae.pth"
    torch.save({"model": sd, "epoch": 199, "args": argparse.Namespace(model="mae_vit_base")}, path)
    missing, unexpected = m.load_satmae(path)
    assert sorted(missing) == ["fc_norm.bias", "fc_norm.weight"]
    assert set(unexpected) == {"cls_token", "pos_embed", "decoder_embed.weight", "norm.weight"}
    assert torch.equal(bb.blocks[0].attn.qkv.weight, sd["blocks.0.attn.qkv.weight"])
    bad = tmp_path / "bad.pth"
    torch.save({"model": {"patch_embed.proj.weight": torch.zeros(768, 3, 16, 16)}}, bad)
    with pytest.raises(CheckpointError, match="patch_embed.proj.weight"):
        m.load_satmae(bad)

    clap = ClapModel(resolve_clap_config(MICRO_CLAP))
    clap.save_pretrained(tmp_path / "clap")
    m.load_clap(tmp_path / "clap")
    hf_a = m.audio_encoder.model.model
    assert torch.equal(hf_a.audio_projection.linear1.weight, clap.audio_projection.linear1.weight)
    assert torch.equal(m.text_encoder.model.model.text_model.embeddings.word_embeddings.weight,
                       clap.text_model.embeddings.word_embeddings.weight)


# ------------------------------------------------------------------------- the real run
def test_training_run_learns_and_maps(tmp_path, tokenizer_dir, capsys):
    import json

    from psm_mapping.cli import main
    from psm_mapping.model import PSM
    from psm_mapping.model.checkpoint import load_torch_file

    from servers import write_scene

    data = write_synthetic(tmp_path / "shards")
    clap_json = tmp_path / "micro_clap.json"
    clap_json.write_text(json.dumps(MICRO_CLAP))
    out = tmp_path / "train"
    args = ["train", "--shards", str(data / "train_*.tar"), "--val-shards", str(data / "val_*.tar"),
            "--sat-type", "sentinel", "--metadata", "none", "--probabilistic", "--tiny", "--fc-dim", "16",
            "--clap-config", str(clap_json), "--tokenizer", str(tokenizer_dir), "--max-steps", "120",
            "--val-every", "40", "--batch-size", "8", "--val-batch-size", "20", "--lr", "3e-3", "--workers", "0",
            "--mel-versions", "1", "--shuffle-buffer", "16", "--validate-first", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    steps = [line for line in printed.splitlines() if line.startswith("step")]
    recalls = [float(line.split("I2S R@10% ")[1].split()[0]) for line in steps]
    first_loss = float(printed.split("train loss: first ")[1].split(",")[0])
    last_loss = float(printed.split(", last ")[1].split()[0])
    best = Path(printed.split("best checkpoint")[1].split(": ", 1)[1].strip().splitlines()[0])
    print(printed)
    assert len(recalls) == 4  # before training and at steps 40, 80, 120
    assert recalls[0] <= 0.15  # chance is ~0.1 (4 of 40)
    assert max(recalls) >= 0.35 and max(recalls) >= 3 * max(recalls[0], 0.05)
    assert last_loss < 0.85 * first_loss

    # the best checkpoint: official keys and hyper_parameters, safe loading, psm-map
    raw = load_torch_file(best)
    hp = raw["hyper_parameters"]
    for k in ("metadata_type", "sat_type", "fc_dim", "loss_type", "probabilistic", "sat_encoder_type",
              "audio_encoder_type", "text_encoder_type", "modality_type", "clap_config"):
        assert k in hp, k
    assert hp["loss_type"] == "pcmepp" and hp["sat_encoder_type"] == "probSatMAE"
    assert {"criterion.shift", "criterion.negative_scale"} <= set(raw["state_dict"])
    model = PSM.from_checkpoint(best)
    assert model.config.fc_dim == 16 and model.config.metadata_type == "none"

    scene = tmp_path / "scene.tif"
    write_scene(scene, "EPSG:32632", 498000.0, 4986000.0, 10.0, 400, 400, seed=3)
    from test_map_e2e import write_region

    region = write_region(tmp_path / "region.geojson", center=(500000.0, 4984000.0))
    cog = tmp_path / "map.tif"
    assert main([str(region), "--imagery", str(scene), "--checkpoint", str(best), "--tokenizer", str(tokenizer_dir),
                 "--zoom-level", "1", "--stride", "40", "--device", "cpu", "--quiet", "--query", "birds",
                 "--out", str(cog), "--no-previews"]) == 0
    import rasterio

    with rasterio.open(cog) as src:
        arr = src.read(1)
    assert np.isfinite(arr).any()

    # evaluation of the trained model on the test shards
    res = tmp_path / "eval.json"
    assert main(["evaluate", "--checkpoint", str(best), "--shards", str(data / "test_*.tar"),
                 "--tokenizer", str(tokenizer_dir), "--out", str(res), "--quiet"]) == 0
    rep = json.loads(res.read_text())
    assert rep["n"] == 20 and len(rep["results"]) == 4

    # resuming reads the full training state (optimizer, loops) weights-only, with the allowlist
    last = next(out.rglob("last.ckpt"))
    resumed = [a if a != "120" else "124" for a in args]
    resumed[resumed.index(str(out))] = str(tmp_path / "train2")
    assert main(resumed + ["--resume", str(last)]) == 0
    assert "train loss" in capsys.readouterr().out
