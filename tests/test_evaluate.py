"""``psm-map evaluate``: the printed / JSON numbers equal retrieval_metrics on embeddings computed
directly with the PSM API (zoom 1, first mel draw, metadata masked, add_text via combine)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from psm_mapping.train.shards import Sample, iter_samples, write_shards


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    src = ["yfcc", "iNat", "aporee", "freesound"]
    for i in range(n):
        img = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
        mels = {v: torch.from_numpy(rng.normal(0, 1, (4, 1001, 64)).astype(np.float32)) for v in (1, 2)}
        key = f"{src[i % 4]}-e{i}"
        meta = {"sample_id": key, "latitude": float(rng.uniform(-50, 50)), "longitude": float(rng.uniform(-100, 100)),
                "date": "2019-07-01 08:00", "text": ["birds singing", "waves", "a busy road", "rain"][i % 4]}
        yield Sample.create(key, meta, image=img, mels=mels)


@pytest.mark.parametrize("probabilistic", [True, False])
def test_evaluate_equals_direct_metrics(tmp_path, ckpt_factory, tokenizer_dir, capsys, probabilistic):
    from psm_mapping.cli import main
    from psm_mapping.model import PSM
    from psm_mapping.model.clap import load_tokenizer, tokenize
    from psm_mapping.train.data import DataConfig, eval_view, zoom_crop
    from psm_mapping.train.metrics import retrieval_metrics

    ckpt = ckpt_factory(sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource",
                        probabilistic=probabilistic)
    write_shards(_samples(12), tmp_path, "test", max_count=5)
    out = tmp_path / "res.json"
    assert main(["evaluate", "--checkpoint", str(ckpt), "--shards", str(tmp_path / "test_*.tar"),
                 "--tokenizer", str(tokenizer_dir), "--out", str(out), "--batch-size", "4", "--quiet",
                 "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "image_to_sound" in printed and "R@10%" in printed
    rep = json.loads(out.read_text())
    assert rep["n"] == 12 and rep["zoom_level"] == 1 and rep["mel_version"] == 1 and rep["metadata"] == "none"

    # the same numbers the direct way
    model = PSM.from_checkpoint(ckpt)
    samples = list(iter_samples(str(tmp_path / "test_*.tar"), mel_versions=(1,)))
    cfg = DataConfig(train=False)
    images = torch.stack([eval_view(zoom_crop(s.image, 1, "sentinel"), cfg) for s in samples])
    img = model.embed_images(images, torch.ones(12, dtype=torch.long), metadata=None)
    aud = model.embed_audio(torch.stack([s.mels[1] for s in samples]))
    enc = tokenize([s.caption for s in samples], load_tokenizer(tokenizer_dir))
    txt = model.embed_text(enc["input_ids"], enc["attention_mask"])
    expect = {
        ("image_to_sound", False): retrieval_metrics(img, aud), ("sound_to_image", False): retrieval_metrics(aud, img),
        ("image_to_sound", True): retrieval_metrics(img.combine(txt), aud),
        ("sound_to_image", True): retrieval_metrics(aud.combine(txt), img),
    }
    assert len(rep["results"]) == 4
    for r in rep["results"]:
        e = expect[(r["direction"], r["add_text"])]
        assert r["recall"] == e.recall and r["median_rank"] == e.median_rank and r["n"] == 12
        assert r["similarity"] == ("csd" if probabilistic else "cosine")
        if probabilistic:
            assert r["query_uncertainty"] == pytest.approx(e.query_uncertainty, rel=1e-5)
            assert r["gallery_uncertainty"] == pytest.approx(e.gallery_uncertainty, rel=1e-5)


def test_evaluate_no_text_and_errors(tmp_path, ckpt_factory):
    from psm_mapping.errors import InputError
    from psm_mapping.train.evaluate import evaluate

    ckpt = ckpt_factory(sat_type="sentinel", metadata_type="none", probabilistic=True)
    write_shards(_samples(6, 1), tmp_path, "test")
    rep = evaluate(ckpt, str(tmp_path / "test_*.tar"), text=False, mel_version=2, progress=False, device="cpu")
    assert [(r.direction, r.add_text) for r in rep.rows] == [("image_to_sound", False), ("sound_to_image", False)]
    assert rep.mel_version == 2 and "median rank" in rep.table()
    with pytest.raises(InputError, match="no shard"):
        evaluate(ckpt, str(tmp_path / "nothing_*.tar"), text=False, progress=False)
