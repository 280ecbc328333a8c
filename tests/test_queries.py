"""Text and audio queries: tokenizer folders, offline mode, audio files (PSM_SPEC.md section 5)."""
from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from psm_mapping import PSM, AudioError, TokenizerError
from psm_mapping.model.clap import audio_features, load_audio, load_tokenizer
from psm_mapping.model.factory import tiny_clap_config


@pytest.fixture(scope="module")
def model(tiny_ckpt) -> PSM:
    return PSM.from_checkpoint(tiny_ckpt, clap_config=tiny_clap_config())


def sine(path, seconds: float, sr: int = 44100, channels: int = 2, freq: float = 440.0, fmt=None):
    t = np.arange(int(seconds * sr)) / sr
    wave = 0.3 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 0.7 * t))
    data = np.stack([wave * (1 - 0.2 * c) for c in range(channels)], 1).astype(np.float32)
    sf.write(str(path), data, sr, format=fmt)
    return path


# ---------------------------------------------------------------------------- text
def test_text_queries_equal_manual_tokenisation(model, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["birds chirping", "waves crashing on the beach"]
    enc = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    assert enc["input_ids"].shape == (2, 128) and enc["input_ids"][0, 0] == 0  # <s>, RoBERTa ids
    assert enc["attention_mask"][0].sum() == 4 and enc["input_ids"][0, 127] == 1  # 2 words + <s> </s>, <pad>
    want = model.embed_text(enc["input_ids"], enc["attention_mask"])
    got = model.embed_text_queries(texts, tokenizer=tokenizer_dir)
    assert torch.equal(got.mean, want.mean) and torch.equal(got.logvar, want.logvar)
    one = model.embed_text_queries("birds chirping", tokenizer=str(tokenizer_dir))
    assert torch.allclose(one.mean, want.mean[:1], atol=1e-6)  # batch of 1 vs 2: float order only
    # batching does not change anything
    batched = model.embed_text_queries(texts, tokenizer=tokenizer_dir, batch_size=1)
    assert torch.allclose(batched.mean, got.mean, atol=1e-6)
    # padding is masked: a different sentence gives a different embedding
    assert (got.mean[0] - got.mean[1]).abs().max() > 1e-4


def test_long_text_is_truncated_to_128(model, tokenizer_dir):
    long = " ".join(["birds chirping in the forest"] * 60)
    e = model.embed_text_queries([long], tokenizer=tokenizer_dir)
    assert e.mean.shape == (1, 512) and torch.isfinite(e.mean).all()


def test_empty_text_query_is_an_input_error(model, tokenizer_dir):
    from psm_mapping import InputError

    with pytest.raises(InputError, match="empty"):
        model.embed_text_queries(["  "], tokenizer=tokenizer_dir)


def test_missing_tokenizer_folder(model, tmp_path):
    with pytest.raises(TokenizerError, match="pass tokenizer") as ei:
        model.embed_text_queries(["birds"], tokenizer=tmp_path / "nope")
    assert "not found" in str(ei.value) and "\n" not in str(ei.value)


def test_folder_without_tokenizer_files(tmp_path):
    (tmp_path / "junk.txt").write_text("nothing here")
    with pytest.raises(TokenizerError, match="vocab.json"):
        load_tokenizer(tmp_path)


def test_offline_without_cache_says_pass_tokenizer(model, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    home = tmp_path / "hf_home"
    home.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    # huggingface_hub read its settings at import time: point those at the empty home too
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hub"), raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(TokenizerError) as ei:
        model.embed_text_queries(["birds chirping"], tokenizer=None)
    msg = str(ei.value)
    assert "pass tokenizer" in msg and "offline" in msg and "\n" not in msg
    assert not any(home.rglob("*roberta*"))  # nothing was downloaded


# ---------------------------------------------------------------------------- audio
def test_audio_file_query(model, tmp_path):
    path = sine(tmp_path / "tone.wav", 3.0)
    wave = load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1 and abs(len(wave) - 3 * 48000) <= 2
    feats = audio_features([wave])
    assert feats["input_features"].shape == (1, 4, 1001, 64) and feats["is_longer"].tolist() == [[True]]
    e1 = model.embed_audio_files([path])
    e2 = model.embed_audio_files(path)
    assert e1.mean.shape == (1, 512) and torch.equal(e1.mean, e2.mean) and torch.equal(e1.logvar, e2.logvar)
    direct = model.embed_audio(feats["input_features"], feats["is_longer"])
    assert torch.equal(direct.mean, e1.mean)
    other = model.embed_audio_files([sine(tmp_path / "other.wav", 3.0, freq=2500.0)])
    assert (other.mean - e1.mean).abs().max() > 1e-5


def test_stereo_is_averaged_and_resampled(tmp_path):
    sr = 44100
    t = np.arange(sr) / sr
    left, right = np.sin(2 * np.pi * 300 * t), 0.5 * np.sin(2 * np.pi * 300 * t)
    sf.write(str(tmp_path / "s.wav"), np.stack([left, right], 1).astype(np.float32), sr, subtype="FLOAT")
    sf.write(str(tmp_path / "m.wav"), ((left + right) / 2).astype(np.float32), sr, subtype="FLOAT")
    a, b = load_audio(tmp_path / "s.wav"), load_audio(tmp_path / "m.wav")
    assert len(a) == 48000 and np.allclose(a, b, atol=1e-6)
    assert 0.7 < np.abs(a).max() < 0.8  # amplitude 0.75 survives the resampling


def test_long_clip_fusion_chunks_are_seeded(tmp_path):
    path = sine(tmp_path / "long.wav", 25.0, sr=16000, channels=1, freq=220.0)
    rng_state = np.random.get_state()
    wave = load_audio(path)
    # a chirp-like envelope so that different chunks differ
    wave = wave * np.linspace(0.2, 1.0, len(wave), dtype=np.float32)
    a = audio_features([wave], seed=5)["input_features"]
    b = audio_features([wave], seed=5)["input_features"]
    c = audio_features([wave], seed=6)["input_features"]
    assert a.shape == (1, 4, 1001, 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 0], c[:, 0])  # the global (downsampled) view does not depend on the seed
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), rng_state))


def test_long_clip_embedding_deterministic(model, tmp_path):
    path = sine(tmp_path / "long.flac", 25.0, sr=22050, channels=1, freq=330.0, fmt="FLAC")
    e1, e2 = model.embed_audio_files([path], seed=1), model.embed_audio_files([path], seed=1)
    assert torch.equal(e1.mean, e2.mean)


@pytest.mark.parametrize("ext,fmt", [("ogg", "OGG"), ("flac", "FLAC")])
def test_ogg_and_flac(model, tmp_path, ext, fmt):
    wav = model.embed_audio_files([sine(tmp_path / "a.wav", 3.0)])
    other = model.embed_audio_files([sine(tmp_path / f"a.{ext}", 3.0, fmt=fmt)])
    assert other.mean.shape == (1, 512)
    # lossless flac decodes to the same samples as wav (up to 16-bit quantisation); ogg is close
    tol = 2e-3 if fmt == "FLAC" else 5e-2
    assert (other.mean - wav.mean).abs().max() < tol


@pytest.mark.parametrize("kind,pattern", [
    ("silent", "is silent"), ("zero_frames", "is empty"), ("zero_bytes", "cannot decode"),
    ("garbage", "cannot decode"), ("missing", "not found"),
])
def test_bad_audio_files(model, tmp_path, kind, pattern):
    path = tmp_path / f"{kind}.wav"
    if kind == "silent":
        sf.write(str(path), np.zeros((44100, 2), np.float32), 44100)
    elif kind == "zero_frames":
        sf.write(str(path), np.zeros((0, 1), np.float32), 44100)
    elif kind == "zero_bytes":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(AudioError, match=pattern) as ei:
        model.embed_audio_files([path])
    assert "\n" not in str(ei.value) and path.name in str(ei.value)
