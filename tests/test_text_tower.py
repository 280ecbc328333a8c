"""The CLAP text tower in plain torch (model/text.py), its tokenizer (model/tokenizer.py) and the
text-query cache (textcache.py): equal to transformers, no transformers import, cached queries."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO
from psm_mapping.model import PSM
from psm_mapping.model.text import ClapTextTower, text_config
from psm_mapping.model.tokenizer import load_tokenizer, tokenizer_identity

TOL = 1e-5
TEXTS = [
    "birds chirping", "Waves crashing on the beach!", "  leading and trailing spaces  ",
    "naïve café — Zürich, São Paulo, Kraków", "東京の雨の音", "🐦 birds 🌊 waves 🚗", "tab\tand\nnewline",
    "a <mask> in the forest", "<s> fake specials </s>", "x", "UPPER lower MiXeD 123 4.56",
    " ".join(["birds chirping in the forest"] * 60),  # far over 128 tokens: truncated
]


def hf_tower(clap_dict):
    from transformers import ClapConfig, ClapTextModelWithProjection

    cfg = ClapConfig.from_dict(clap_dict)
    return ClapTextModelWithProjection(cfg.text_config).eval()


def ours_from(hf) -> ClapTextTower:
    tower = ClapTextTower(text_config({"text_config": hf.config.to_dict(),
                                       "projection_dim": hf.config.projection_dim,
                                       "projection_hidden_act": hf.config.projection_hidden_act}))
    tower.load_state_dict(hf.state_dict(), strict=True)
    return tower.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ---------------------------------------------------------------------------- the tower
def test_tower_equals_transformers_on_the_fixture(official_fixtures, tokenizer_dir):
    clap = json.loads((official_fixtures / "psm_tiny_meta_sentinel_clap_config.json").read_text())
    ck = torch.load(official_fixtures / "psm_tiny_meta_sentinel.ckpt", weights_only=True, map_location="cpu")
    pre = "text_encoder.model.model."
    sd = {k[len(pre):]: v for k, v in ck["state_dict"].items() if k.startswith(pre)}
    hf = hf_tower(clap)
    hf.load_state_dict(sd, strict=False)
    ours = ClapTextTower(text_config(clap)).eval()
    missing, unexpected = ours.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.endswith(("position_ids", "token_type_ids")) for k in missing)
    ref = dict(np.load(official_fixtures / "psm_tiny_meta_sentinel_io.npz"))
    enc = load_tokenizer(tokenizer_dir)(TEXTS)
    with torch.no_grad():
        for ids, mask in ((torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"])),
                          (enc["input_ids"], enc["attention_mask"])):
            want = hf(input_ids=ids, attention_mask=mask).text_embeds
            got = ours(ids, mask)
            d = max_diff(got, want)
            print(f"fixture text tower: max abs diff {d:.2e} over {tuple(got.shape)}")
            assert d <= TOL and float(want.abs().max()) > 1e-2
    # and the whole text path of the PSM model against the authors' outputs
    m = PSM.from_checkpoint(official_fixtures / "psm_tiny_meta_sentinel.ckpt",
                            clap_config=official_fixtures / "psm_tiny_meta_sentinel_clap_config.json",
                            encoders=("text",))
    e = m.embed_text(torch.from_numpy(ref["input_ids"]), torch.from_numpy(ref["attention_mask"]))
    d_mean, d_lv = max_diff(e.mean, torch.from_numpy(ref["text_mean"])), max_diff(e.logvar, torch.from_numpy(ref["text_logvar"]))
    print(f"fixture PSM text: mean {d_mean:.2e}, logvar {d_lv:.2e}")
    assert d_mean <= TOL and d_lv <= TOL


@pytest.mark.parametrize("act", ["gelu", "gelu_new"])
def test_tower_equals_transformers_on_a_random_config(act):
    torch.manual_seed(1)
    clap = {"text_config": {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 4,
                            "intermediate_size": 80, "vocab_size": 300, "max_position_embeddings": 64,
                            "layer_norm_eps": 1e-5, "hidden_act": act, "type_vocab_size": 1},
            "projection_dim": 24, "projection_hidden_act": "relu"}
    hf = hf_tower(clap)
    with torch.no_grad():  # weights far from init, so a wrong op shows
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = ours_from(hf)
    assert ours.text_projection.linear2.out_features == 24  # the top-level projection_dim wins
    ids = torch.randint(3, 300, (5, 40))
    mask = torch.ones_like(ids)
    for i, n in enumerate((40, 31, 7, 2, 19)):  # <s> ... </s> then padding, as the tokenizer does
        ids[i, 0], ids[i, n - 1] = 0, 2
        ids[i, n:], mask[i, n:] = 1, 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).text_embeds
        got = ours(ids, mask)
        d = max_diff(got, want)
        print(f"random config ({act}): max abs diff {d:.2e}")
        assert d <= TOL
        # padding changes nothing, a token does
        assert max_diff(ours(ids[3:4, :2], mask[3:4, :2]), got[3:4]) <= TOL
        other = ids.clone()
        other[0, 5] = 7 if ids[0, 5] != 7 else 8
        assert max_diff(ours(other[:1], mask[:1]), got[:1]) > 1e-4


def test_state_dict_keys_are_the_checkpoints():
    from transformers import ClapConfig, ClapTextModelWithProjection

    with torch.device("meta"):
        hf = ClapTextModelWithProjection(ClapConfig().text_config)
        ours = ClapTextTower(text_config(None))
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs
    keys_file = REPO.parent / "shared" / "psm_checkpoint_keys.json"
    if keys_file.is_file():  # the official full-size checkpoint's text keys
        official = json.loads(keys_file.read_text())["none"]
        pre = "text_encoder.model.model."
        want = {k[len(pre):]: tuple(v) for k, v in official.items() if k.startswith(pre)}
        assert mine == want


def test_meta_build_touches_no_global_init():
    import torch.nn.init as init

    saved = (init.normal_, torch.nn.init.normal_)
    with torch.device("meta"):
        tower = ClapTextTower(text_config(None))
    assert (init.normal_, torch.nn.init.normal_) == saved
    assert all(p.is_meta for p in tower.parameters())
    import psm_mapping.model.psm as psm_mod

    assert not hasattr(psm_mod, "_skip_normal_init")


def test_deferred_text_tower_equals_eager(tiny_ckpt, tokenizer_dir):
    lazy = PSM.from_checkpoint(tiny_ckpt, encoders=("text",))
    eager = PSM.from_checkpoint(tiny_ckpt, encoders=("text",), defer_text=False)
    assert lazy._deferred_text is not None and not hasattr(lazy, "text_encoder")
    a = lazy.embed_text_queries(["birds chirping"], tokenizer=tokenizer_dir)
    b = eager.embed_text_queries(["birds chirping"], tokenizer=tokenizer_dir)
    assert lazy._deferred_text is None and torch.equal(a.mean, b.mean) and torch.equal(a.logvar, b.logvar)
    fresh = PSM.from_checkpoint(tiny_ckpt, encoders=("text",))
    sd, want = fresh.state_dict(), eager.state_dict()  # listing the weights builds the tower
    assert sd.keys() == want.keys() and all(torch.equal(sd[k], want[k]) for k in want)


def test_unknown_activation_is_an_input_error():
    from psm_mapping import InputError

    with pytest.raises(InputError, match="activation 'mish'"):
        text_config({"text_config": {"hidden_act": "mish"}})


# ---------------------------------------------------------------------------- the tokenizer
def _hf_ids(folder, texts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(texts, padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize("files", ["tokenizer.json", "vocab+merges"])
def test_tokenizer_equals_transformers(tokenizer_dir, tmp_path, files):
    import shutil

    folder = tokenizer_dir
    if files == "vocab+merges":
        folder = tmp_path / "tok"
        folder.mkdir()
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folder / name)
    ids, mask = _hf_ids(folder, TEXTS)
    enc = load_tokenizer(folder)(TEXTS)
    assert enc["input_ids"].shape == (len(TEXTS), 128) and enc["input_ids"].dtype == torch.long
    assert torch.equal(enc["input_ids"], ids) and torch.equal(enc["attention_mask"], mask)
    assert enc["attention_mask"][-1].sum() == 128 and enc["input_ids"][-1, -1] == 2  # truncated, </s> kept
    ident = tokenizer_identity(folder)
    assert ident == load_tokenizer(folder).identity and len(ident) == 64


def test_tokenizer_identity_follows_the_files(tokenizer_dir, tmp_path):
    import shutil

    other = tmp_path / "tok2"
    shutil.copytree(tokenizer_dir, other)
    assert tokenizer_identity(other) == tokenizer_identity(tokenizer_dir)
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["vocab"]["zzzz"] = len(data["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(data))
    assert tokenizer_identity(other) != tokenizer_identity(tokenizer_dir)


# ---------------------------------------------------------------------------- no transformers
def make_store(folder, ckpt, tokenizer, side: int = 16):
    """A small synthetic map store that names ``ckpt`` and ``tokenizer`` (as a run records them)."""
    from affine import Affine
    from pyproj import CRS

    from psm_mapping.model.checkpoint import file_sha256
    from psm_mapping.store import DONE, EmbeddingStore, StoreSpec

    spec = StoreSpec(crs_wkt=CRS.from_epsg(32633).to_wkt(),
                     transform=tuple(Affine(40.0, 0, 500_000.0, 0, -40.0, 5_600_000.0))[:6],
                     width=side, height=side, stride=40.0, block_size=16, zoom_levels=(1,),
                     sat_type="sentinel", checkpoint_sha256=file_sha256(ckpt), imagery="synthetic",
                     min_valid=0.5, fc_dim=512, probabilistic=True)
    path = folder / "store.zarr"
    store = EmbeddingStore.open_or_create(str(path), spec, attrs={
        "metadata_options": None, "provenance": {"imagery": "synthetic"}, "checkpoint_path": str(ckpt),
        "tokenizer": str(tokenizer)})
    rng = np.random.default_rng(0)
    m = rng.standard_normal((1, side, side, 512), dtype=np.float32)
    m /= np.linalg.norm(m, axis=-1, keepdims=True)
    g = store.group
    g["mean"][:] = m.astype(np.float16)
    g["z_img"][:] = m.astype(np.float16)  # a real store holds z_img wherever it holds a mean
    g["var_sum"][:] = rng.uniform(15, 25, (1, side, side)).astype(np.float32)
    g["uncertainty"][:] = 50.0
    g["valid"][:] = 1.0
    g["status"][:] = DONE
    return path


def test_text_path_imports_no_transformers(tiny_ckpt, tokenizer_dir, tmp_path):
    store = make_store(tmp_path, tiny_ckpt, tokenizer_dir)
    code = f"""
import sys
from psm_mapping.model import PSM
m = PSM.from_checkpoint({str(tiny_ckpt)!r}, encoders=("text",))
e = m.embed_text_queries(["birds chirping"], tokenizer={str(tokenizer_dir)!r})
assert e.mean.shape == (1, 512)
assert not [k for k in sys.modules if k.split(".")[0] == "transformers"], "model"
from psm_mapping.cli import main
assert main(["query", {str(store)!r}, "--query", "rain on a roof", "--out", {str(tmp_path / 'q.tif')!r},
             "--quiet", "--no-previews"]) == 0
bad = sorted({{k.split(".")[0] for k in sys.modules}} & {{"transformers", "dask", "distributed", "matplotlib"}})
bad += [k for k in ("psm_mapping.places", "pyogrio", "geopandas") if k in sys.modules]  # a map store needs no point code
assert not bad, bad
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**_env(), "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    assert (tmp_path / "q.tif").is_file()


def _env():
    import os

    return {k: v for k, v in os.environ.items() if k != "PSM_CHECKPOINT"}


# ---------------------------------------------------------------------------- the cache
def test_second_query_builds_no_text_tower(tiny_ckpt, tokenizer_dir, tmp_path, caplog, monkeypatch):
    import rasterio

    from psm_mapping.cli import main

    monkeypatch.delenv("PSM_CHECKPOINT", raising=False)
    store = make_store(tmp_path, tiny_ckpt, tokenizer_dir)

    def query(out, *texts):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="psm_mapping.model.psm"):
            args = ["query", str(store), "--out", str(tmp_path / out), "--quiet", "--no-previews"]
            assert main(args + [x for t in texts for x in ("--query", t)]) == 0
        with rasterio.open(tmp_path / out) as ds:
            bands = ds.read()
        return bands, sum("building the text tower" in r.getMessage() for r in caplog.records)

    first, built1 = query("a.tif", "birds chirping")
    entries = sorted((store / "text_cache").glob("*.npy"))
    assert built1 == 1 and len(entries) == 1
    second, built2 = query("b.tif", "birds chirping")
    assert built2 == 0 and np.array_equal(first, second, equal_nan=True)
    # one new text among cached ones: the tower is built for it alone
    _, built3 = query("c.tif", "birds chirping", "rain on a roof")
    assert built3 == 1 and len(list((store / "text_cache").glob("*.npy"))) == 2
    # the store is still a store: zarr and xarray pass over the cache folder
    import xarray as xr

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not recognized as a component of a Zarr hierarchy"
        with xr.open_zarr(store, consolidated=False) as ds:
            assert "mean" in ds and "text_cache" not in ds
        from psm_mapping.store import EmbeddingStore

        assert EmbeddingStore.open(str(store)).spec.width == 16


def test_cache_keys_and_read_only_stores(tmp_path, tiny_ckpt, tokenizer_dir):
    from psm_mapping.textcache import TextCache, embed_texts, text_cache_for

    m = PSM.from_checkpoint(tiny_ckpt, encoders=("text",))
    root = tmp_path / "store.zarr"
    root.mkdir()
    cache = text_cache_for(str(root), m, "a" * 64, tokenizer_dir)
    e1 = embed_texts(m, ["birds", "waves", "birds"], tokenizer_dir, cache)
    assert cache.misses == 2 and cache.writes == 2 and len(e1) == 3
    again = text_cache_for(str(root), m, "a" * 64, tokenizer_dir)
    e2 = embed_texts(m, ["waves", "birds"], tokenizer_dir, again)
    assert again.hits == 2 and again.writes == 0
    assert torch.equal(e2.mean, e1.mean[[1, 0]]) and torch.equal(e2.logvar, e1.logvar[[1, 0]])
    assert torch.equal(e2.raw_mean, e1.raw_mean[[1, 0]])
    # another checkpoint, tokenizer or dtype is another key
    keys = {TextCache(str(root), c, t, dtype=d).key("birds")
            for c, t, d in (("a" * 64, "t", "float32"), ("b" * 64, "t", "float32"),
                            ("a" * 64, "u", "float32"), ("a" * 64, "t", "bfloat16"))}
    assert len(keys) == 4
    # a damaged entry is a miss (and is rewritten)
    entry = next((root / "text_cache").glob("*.npy"))
    entry.write_bytes(b"not an array")
    c3 = text_cache_for(str(root), m, "a" * 64, tokenizer_dir)
    embed_texts(m, ["birds", "waves"], tokenizer_dir, c3)
    assert c3.misses == 1 and c3.writes == 1
    # a store that cannot be written is answered without caching: an HTTP URL (nothing listens),
    # a read-only folder (when not root, whom permissions do not stop)
    import os

    c4 = text_cache_for("http://127.0.0.1:9/store.zarr", m, "a" * 64, tokenizer_dir)
    e4 = embed_texts(m, ["birds"], tokenizer_dir, c4)
    assert torch.allclose(e4.mean, e1.mean[:1], atol=1e-6) and c4.writes == 0 and not c4.writable
    if os.geteuid() != 0:
        ro = tmp_path / "ro.zarr"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            c5 = text_cache_for(str(ro), m, "a" * 64, tokenizer_dir)
            assert len(embed_texts(m, ["birds"], tokenizer_dir, c5)) == 1 and not c5.writable
            assert not (ro / "text_cache").exists()
        finally:
            ro.chmod(0o755)


def test_the_program_collects_no_garbage_during_start_up_then_as_usual():
    """`psm-map` (main() without arguments) turns the collector off for its start-up, then freezes
    what start-up made and collects again; main() called with arguments (a notebook, the tests)
    leaves the collector alone."""
    code = """
import gc, sys, time
from psm_mapping import cli
sys.argv = ["psm-map", "levels", "--help"]
try:
    cli.main()
except SystemExit:
    pass
assert not gc.isenabled(), "collector on during start-up"
time.sleep(cli.STARTUP_SECONDS + 1.0)
assert gc.isenabled() and gc.get_freeze_count() > 10000, gc.get_freeze_count()
print("ok")
"""
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**_env(), "PYTHONPATH": str(REPO)}, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stderr[-3000:]
    import gc

    from psm_mapping.cli import main

    assert gc.isenabled()
    with pytest.raises(SystemExit):
        main(["levels", "--help"])
    assert gc.isenabled()  # with arguments: untouched
