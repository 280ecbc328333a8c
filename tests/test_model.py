"""Model behaviour: metadata, masking, fusion, heads, ProbEmbedding, csd, position embedding, bf16."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from psm_mapping import PSM, InputError, Metadata, ProbEmbedding, csd
from psm_mapping.model.factory import tiny_clap_config
from psm_mapping.model.heads import l2norm
from psm_mapping.model.vit import gsd_pos_embed, sincos_1d


@pytest.fixture(scope="module")
def model(tiny_ckpt) -> PSM:
    return PSM.from_checkpoint(tiny_ckpt, clap_config=tiny_clap_config())


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def z_img(model, images) -> torch.Tensor:
    return model.image_features(images, torch.tensor([1, 3, 5]))


def fused(model, z, md):
    return model.embed_image_features(z, md)


# ---------------------------------------------------------------------------- Metadata validation
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(month=13), r"month 13 out of range: use 1\.\.12"),
    (dict(month=[1, 2.5]), r"month 2\.5 out of range"),
    (dict(hour=24), r"hour 24 out of range: use 0\.\.23"),
    (dict(hour=-2), r"hour -2 out of range"),
    (dict(lat=91, lon=0), r"latitude out of range: use degrees in -90\.\.90"),
    (dict(lat=0, lon=181), r"longitude out of range: use degrees in -180\.\.180"),
    (dict(lat=[0, float("nan")], lon=[0, 0]), r"latitude"),
    (dict(lat=10), r"both lat and lon"),
    (dict(audio_source="youtube"), r"unknown audio source 'youtube': use one of yfcc, iNat, aporee, freesound"),
    (dict(caption_source="gpt"), r"unknown caption source 'gpt': use one of meta, qwen, pengi"),
    (dict(audio_source=4), r"audio source index 4 is out of range: use 0\.\.3"),
    (dict(caption_source=[0, -1]), r"caption source index -1 is out of range: use 0\.\.2"),
    (dict(month="May"), r"'month' is not numeric"),
    (dict(lat=[1, None], lon=[1, 2]), r"'lat' has missing values"),
])
def test_metadata_out_of_range(kwargs, pattern):
    with pytest.raises(InputError, match=pattern) as ei:
        Metadata(**kwargs)
    assert "\n" not in str(ei.value)


def test_metadata_encodings_follow_the_formulas():
    md = Metadata(lat=[45.0, -30.0], lon=[90.0, -170.0], month=[5, 0], hour=[14, -1],
                  audio_source=["iNat", "freesound"], caption_source=["pengi", "meta"])
    enc = md.encode(2)
    lat, lon = np.array([45.0, -30.0]), np.array([90.0, -170.0])
    want_ll = np.stack([np.sin(np.pi * lat / 90), np.cos(np.pi * lat / 90),
                        np.sin(np.pi * lon / 180), np.cos(np.pi * lon / 180)], 1)
    np.testing.assert_allclose(enc["latlong"][0].numpy(), want_ll, atol=1e-7)
    np.testing.assert_allclose(enc["month"][0].numpy(),
                               [[math.sin(2 * math.pi * 5 / 12), math.cos(2 * math.pi * 5 / 12)], [0, 0]], atol=1e-7)
    # the hour divisor is 23 (the checkpoints were trained with it), and unknown hours are zeroed
    np.testing.assert_allclose(enc["time"][0].numpy(),
                               [[math.sin(2 * math.pi * 14 / 23), math.cos(2 * math.pi * 14 / 23)], [0, 0]], atol=1e-7)
    assert enc["month"][1].tolist() == [True, False] and enc["time"][1].tolist() == [True, False]
    assert enc["asource"][0].tolist() == [1, 3] and enc["tsource"][0].tolist() == [2, 0]
    assert enc["latlong"][1].all() and enc["asource"][1].all()


def test_source_names_case_insensitive(model, z_img):
    a = fused(model, z_img, Metadata(audio_source="INAT", caption_source=" Qwen "))
    b = fused(model, z_img, Metadata(audio_source=1, caption_source=1))
    c = fused(model, z_img, Metadata(audio_source="yfcc", caption_source="qwen"))
    assert torch.equal(a.mean, b.mean)
    assert (a.mean - c.mean).abs().max() > 1e-4


def test_scalars_broadcast_and_lengths_are_checked(model, z_img):
    a = fused(model, z_img, Metadata(lat=10.0, lon=20.0, month=5, hour=14, audio_source="yfcc"))
    b = fused(model, z_img, Metadata(lat=[10.0] * 3, lon=np.full(3, 20.0), month=torch.tensor([5, 5, 5]),
                                     hour=[14, 14, 14], audio_source=["yfcc"] * 3))
    assert torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
    with pytest.raises(InputError, match=r"'lat' has 2 values for a batch of 3"):
        fused(model, z_img, Metadata(lat=[1.0, 2.0], lon=3.0))
    with pytest.raises(InputError, match=r"'month' has 2 values for a batch of 3"):
        fused(model, z_img, Metadata(month=[1, 2]))


def test_none_items_in_arrays_mean_unknown(model, z_img):
    a = fused(model, z_img, Metadata(month=[5, None, 7], hour=[None, 3, 4]))
    b = fused(model, z_img, Metadata(month=[5, 0, 7], hour=[-1, 3, 4]))
    assert torch.equal(a.mean, b.mean)


# ---------------------------------------------------------------------------- masking and fusion
def test_masked_items_never_reach_cls(model, z_img):
    none = fused(model, z_img, None)
    for md in (Metadata(), Metadata(month=None), Metadata(month=0), Metadata(month=0, hour=-1)):
        e = fused(model, z_img, md)
        assert torch.allclose(e.mean, none.mean, atol=1e-6) and torch.allclose(e.logvar, none.logvar, atol=1e-6)
    month5 = fused(model, z_img, Metadata(month=5))
    assert (month5.mean - none.mean).abs().max() > 1e-4  # a valid item does change the output


def test_masked_token_value_is_irrelevant(tiny_ckpt, z_img):
    """Scrambling the month encoder changes nothing while the month is unknown."""
    m = PSM.from_checkpoint(tiny_ckpt, clap_config=tiny_clap_config())
    before_unknown = fused(m, z_img, Metadata(lat=1.0, lon=2.0, month=0))
    before_known = fused(m, z_img, Metadata(lat=1.0, lon=2.0, month=6))
    month_fc = m.sat_encoder.encoder.meta_fuser.meta_embed.month_fc
    with torch.no_grad():
        month_fc.fc2.bias.add_(3.0)
        month_fc.fc2.weight.mul_(-5.0)
    after_unknown = fused(m, z_img, Metadata(lat=1.0, lon=2.0, month=0))
    after_known = fused(m, z_img, Metadata(lat=1.0, lon=2.0, month=6))
    assert torch.allclose(after_unknown.mean, before_unknown.mean, atol=1e-6)
    assert (after_known.mean - before_known.mean).abs().max() > 1e-3


def test_token_order_does_not_matter(tiny_ckpt, z_img):
    m = PSM.from_checkpoint(tiny_ckpt, clap_config=tiny_clap_config())
    md = Metadata(lat=[10.0, -20.0, 30.0], lon=[5.0, 60.0, -70.0], month=[1, 6, 0], hour=[2, 13, 23],
                  audio_source=["yfcc", "iNat", "aporee"], caption_source="pengi")
    a = fused(m, z_img, md)
    embed = m.sat_encoder.encoder.meta_fuser.meta_embed
    embed.items = tuple(reversed(embed.items))
    b = fused(m, z_img, md)
    assert torch.allclose(a.mean, b.mean, atol=1e-5) and torch.allclose(a.logvar, b.logvar, atol=1e-4)


def test_unfused_equals_heads_on_projector_output(model, images, z_img):
    e = model.embed_images(images, torch.tensor([1, 3, 5]), fuse=False)
    enc = model.sat_encoder.encoder
    with torch.inference_mode():
        raw, lv = enc.mean_head(z_img), enc.std_head(z_img)
    assert torch.equal(e.raw_mean, raw) and torch.equal(e.logvar, lv)
    assert torch.allclose(e.mean, raw / raw.norm(dim=-1, keepdim=True), atol=1e-7)
    assert (e.mean - model.embed_images(images, torch.tensor([1, 3, 5])).mean).abs().max() > 1e-4
    # embed_images == image_features + embed_image_features (the store re-runs only the second)
    md = Metadata(lat=1.0, lon=2.0, month=3)
    assert torch.equal(model.embed_images(images, torch.tensor([1, 3, 5]), md).mean,
                       model.embed_image_features(z_img, md).mean)


def test_zoom_levels_checked_and_broadcast(model, images):
    with pytest.raises(InputError, match="2 zoom levels for 3 images"):
        model.embed_images(images, [1, 3])
    with pytest.raises(InputError, match=r"images must be \[B, 3, H, W\]"):
        model.embed_images(images[:, :2], [1, 1, 1])
    assert torch.equal(model.embed_images(images, 3).mean, model.embed_images(images, [3, 3, 3]).mean)


# ---------------------------------------------------------------------------- ProbEmbedding
def _emb(n=4, d=8, seed=0, prob=True) -> ProbEmbedding:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, d, generator=g)
    lv = torch.randn(n, d, generator=g) - 3 if prob else None
    return ProbEmbedding.from_heads(raw, lv)


def test_prob_embedding_container():
    e = _emb()
    assert len(e) == 4 and e.probabilistic and not _emb(prob=False).probabilistic
    assert torch.allclose(e.mean.norm(dim=-1), torch.ones(4), atol=1e-6)
    one = e[1]
    assert len(one) == 1 and torch.equal(one.raw_mean[0], e.raw_mean[1]) and torch.equal(one.logvar[0], e.logvar[1])
    assert torch.equal(e[-1].mean[0], e.mean[3]) and len(e[-1]) == 1
    assert torch.equal(e[1:3].logvar, e.logvar[1:3]) and len(e[[0, 2]]) == 2
    d = e.to(torch.float64)
    assert d.mean.dtype == d.raw_mean.dtype == d.logvar.dtype == torch.float64
    c = ProbEmbedding.cat([e[:2], e[2:]])
    assert torch.equal(c.mean, e.mean) and torch.equal(c.raw_mean, e.raw_mean) and torch.equal(c.logvar, e.logvar)
    assert ProbEmbedding.cat([e, _emb(prob=False)]).logvar is None
    with pytest.raises(ValueError):
        ProbEmbedding.cat([])


def test_uncertainty_and_var_sum():
    e = _emb()
    lv = e.logvar.double().numpy()
    np.testing.assert_allclose(e.uncertainty().numpy(), np.exp(0.5 * lv).sum(1), rtol=1e-6)
    np.testing.assert_allclose(e.var_sum().numpy(), np.exp(lv).sum(1), rtol=1e-6)
    assert e.var_sum().dtype == torch.float64


def test_combine_is_their_add_text():
    a, b = _emb(seed=1), _emb(seed=2)
    c = a.combine(b)
    raw = (a.raw_mean + b.raw_mean).double().numpy()
    np.testing.assert_allclose(c.mean.numpy(), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert torch.equal(c.logvar, a.logvar + b.logvar) and torch.equal((a + b).mean, c.mean)
    # a single query combines with every row
    q = _emb(n=1, seed=3)
    r = a.combine(q)
    assert torch.allclose(r.mean[2], l2norm(a.raw_mean[2] + q.raw_mean[0]), atol=1e-7)
    with pytest.raises(ValueError, match="cannot combine 4 with 3"):
        a.combine(_emb(n=3))
    assert a.combine(_emb(prob=False)).logvar is None


def test_csd_matches_float64_formula():
    a, b = _emb(n=5, d=16, seed=4), _emb(n=3, d=16, seed=5)
    got = csd(a, b)
    assert got.dtype == torch.float64 and got.shape == (5, 3)
    mu_a, mu_b = a.mean.double().numpy(), b.mean.double().numpy()
    va = np.exp(a.logvar.float().numpy()).astype(np.float64).sum(1)
    vb = np.exp(b.logvar.float().numpy()).astype(np.float64).sum(1)
    want = -(2 - 2 * mu_a @ mu_b.T + va[:, None] + vb[None, :])
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-6)  # exp: float32 ulps
    # deterministic embeddings fall back to the cosine of the means
    da, db = _emb(n=5, seed=6, prob=False), _emb(n=3, seed=7, prob=False)
    np.testing.assert_allclose(csd(da, db).numpy(), da.mean.numpy() @ db.mean.numpy().T, atol=1e-6)


def test_csd_on_model_embeddings(model, images):
    s = model.embed_images(images, [1, 1, 1])
    t = model.embed_text(torch.randint(5, 1000, (2, 10), generator=torch.Generator().manual_seed(1)))
    want = -(2 - 2 * s.mean.double() @ t.mean.double().T + s.var_sum()[:, None] + t.var_sum()[None])
    assert torch.equal(csd(s, t), want)


# ---------------------------------------------------------------------------- position embedding
def _sincos_np(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    out = pos[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], 1)


def test_gsd_pos_embed_halves():
    dim, grid = 64, 14
    res = torch.tensor([10.0, 0.6])
    pe = gsd_pos_embed(dim, grid, res).numpy()
    assert pe.shape == (2, grid * grid, dim)
    for b, r in enumerate([10.0, 0.6]):
        for i, j in [(0, 0), (0, 1), (1, 0), (3, 7), (13, 2), (13, 13)]:
            t = i * grid + j
            np.testing.assert_allclose(pe[b, t, : dim // 2], _sincos_np(dim // 2, np.array([j * r]))[0], atol=2e-5)
            np.testing.assert_allclose(pe[b, t, dim // 2:], _sincos_np(dim // 2, np.array([i * r]))[0], atol=2e-5)
    # the first column (j = 0) has the zero-position encoding in its first half
    np.testing.assert_array_equal(pe[0, 5 * grid, : dim // 2], np.r_[np.zeros(dim // 4), np.ones(dim // 4)])
    assert np.abs(pe[0, 1, : dim // 2] - pe[0, grid, : dim // 2]).max() > 0.1  # halves are not symmetric
    # each half is built from the 1-D formula with omega_i = 1/10000^(i/(D/4))
    pos = torch.tensor([0.0, 3.0, 130.0])
    np.testing.assert_allclose(sincos_1d(32, pos).numpy(), _sincos_np(32, pos.double().numpy()), atol=2e-5)


def test_zoom_changes_the_embedding(model, images):
    a = model.embed_images(images[:1], [1]).mean
    b = model.embed_images(images[:1], [3]).mean
    assert (a - b).abs().max() > 1e-4


# ---------------------------------------------------------------------------- bf16
def test_bfloat16_autocast_on_cpu_is_close(tiny_ckpt, model, images):
    m16 = PSM.from_checkpoint(tiny_ckpt, clap_config=tiny_clap_config(), dtype="bfloat16")
    assert m16.compute_dtype == torch.bfloat16
    md = Metadata(lat=[1.0, 2.0, 3.0], lon=4.0, month=5, hour=6)
    ref, got = model.embed_images(images, [1, 3, 5], md), m16.embed_images(images, [1, 3, 5], md)
    assert got.mean.dtype == torch.float32
    err = (got.mean - ref.mean).abs().max()
    assert 0 < err < 2e-2, float(err)  # it did run in bf16, and is close
    ids = torch.randint(5, 1000, (2, 16), generator=torch.Generator().manual_seed(2))
    assert (m16.embed_text(ids).mean - model.embed_text(ids).mean).abs().max() < 2e-2
    with pytest.raises(InputError, match="unknown dtype"):
        PSM.from_checkpoint(tiny_ckpt, clap_config=tiny_clap_config(), dtype="int8")


def test_prob_embedding_natural_call_and_shape_checks():
    import torch

    from psm_mapping import InputError, ProbEmbedding

    mean = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    logvar = torch.randn(3, 8)
    e = ProbEmbedding(mean, logvar)  # the natural call: second positional field is logvar
    assert e.logvar is logvar and e.raw_mean is mean and e.probabilistic
    assert ProbEmbedding(mean).logvar is None
    for bad in (dict(logvar=torch.randn(3, 7)), dict(raw_mean=torch.randn(2, 8))):
        with pytest.raises(InputError, match="shape"):
            ProbEmbedding(mean, **bad)
    with pytest.raises(InputError):
        ProbEmbedding(torch.randn(8))
