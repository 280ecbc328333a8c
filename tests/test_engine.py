"""The engine over a real small store (built by the map pipeline with a tiny checkpoint): dense
maps equal the earlier formula, the session opens the store's checkpoint and text setup, fusion
re-runs exactly at full resolution and approximately (measured, flagged) at coarse levels."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pyproj import Transformer

from psm_mapping import StoreError, engine as E
from psm_mapping.embed import MetadataOptions
from psm_mapping.model.factory import tiny_clap_config
from psm_mapping.run import MapConfig, map_region
from psm_mapping.store import DONE

from geo_fixtures import texture, utm_scene

UTM = "EPSG:32633"
X0, Y0, RES, N = 500_000.0, 5_600_000.0, 20.0, 700


@pytest.fixture(scope="module")
def built(tmp_path_factory, ckpt_factory, tokenizer_dir):
    d = tmp_path_factory.mktemp("engine")
    scene = utm_scene(d / "scene.tif", texture(N, N, seed=3, smooth_px=20), RES, origin=(X0, Y0), crs=UTM)
    to_ll = Transformer.from_crs(UTM, 4326, always_xy=True)
    cx, cy, h = X0 + N * RES / 2, Y0 - N * RES / 2, 1400.0
    ring = [list(to_ll.transform(cx + dx * h, cy + dy * h)) for dx, dy in ((-1, -1), (1, -1), (1, 1), (-1, 1), (-1, -1))]
    (d / "r.geojson").write_text(json.dumps({"type": "Polygon", "coordinates": [ring]}))
    clap = d / "clap.json"
    tiny_clap_config().to_json_file(str(clap))
    ckpt = ckpt_factory(sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource")
    cfg = MapConfig(region=str(d / "r.geojson"), imagery=str(scene), queries=["birds singing"], checkpoint=str(ckpt),
                    clap_config=str(clap), tokenizer=str(tokenizer_dir), zoom_levels=(1, 3), stride=160.0,
                    device="cpu", block_size=8, batch_size=32, month=5, out=str(d / "map.tif"),
                    store=str(d / "store"), progress=False, previews=False)
    run = map_region(cfg, log_fn=lambda *a: None)
    return {"store": run.store, "ckpt": ckpt, "tokenizer": tokenizer_dir, "dir": d}


@pytest.fixture(scope="module")
def session(built):
    from psm_mapping import open_session

    return open_session(built["store"])  # checkpoint, tokenizer and CLAP config from the store


def _old_formula(store, qm: torch.Tensor, qvs: torch.Tensor) -> np.ndarray:
    """The map before the engine (query.py's slab path): float16 means -> float32, one product,
    ``2 dot - (2 + qvs) - var_sum``, NaN where not DONE."""
    m = torch.from_numpy(np.asarray(store.group["mean"][:])).float()
    Z, H, W, D = m.shape
    dot = (m.reshape(-1, D) @ qm.T.float()).numpy().reshape(Z, H, W, -1)
    vs = np.asarray(store.group["var_sum"][:])
    out = np.stack([2.0 * dot[..., q] - (2.0 + float(qvs[q])) - vs for q in range(qm.shape[0])])
    out[:, np.asarray(store.group["status"][:]) != DONE] = np.nan
    return out


def test_session_opens_what_the_store_names(session, built):
    assert session.checkpoint == Path(built["ckpt"]) and session.tokenizer == str(built["tokenizer"])
    assert session.model.encoders == ("text",)  # no image tower: answers fuse the stored z_img


def test_session_refuses_another_checkpoint(built, ckpt_factory):
    from psm_mapping import open_session

    other = ckpt_factory(sat_type="sentinel", metadata_type="none")
    with pytest.raises(StoreError, match="not the checkpoint"):
        open_session(built["store"], checkpoint=other)


def test_dense_maps_equal_the_earlier_formula(session):
    from psm_mapping.query import query_store

    qs = session.queries(["birds singing", "traffic noise"])
    maps = query_store(session.store, qs)
    qmat = session.query_matrix(qs)
    old = _old_formula(session.store, qmat.mean, qmat.var_sum)
    assert np.isfinite(old).sum() > 100
    for q in range(2):
        assert np.array_equal(np.isnan(maps.similarity[q]), np.isnan(old[q]))
        # not bit-identical: csd_from_parts adds in another order (-(2 - 2 dot + vs + qvs)), ~1 ulp
        np.testing.assert_allclose(maps.similarity[q], old[q], rtol=0, atol=1e-5)


def test_kernel_is_the_heads_csd(session):
    from psm_mapping.model import ProbEmbedding
    from psm_mapping.model.heads import csd

    g = torch.Generator().manual_seed(0)
    a = ProbEmbedding.from_heads(torch.randn(5, 512, generator=g), torch.randn(5, 512, generator=g) * 0.1 - 3)
    b = ProbEmbedding.from_heads(torch.randn(2, 512, generator=g), torch.randn(2, 512, generator=g) * 0.1 - 3)
    want = csd(a, b).numpy()  # float64 [5, 2]
    got = E.similarity(a.mean.numpy(), a.var_sum().numpy(), E.query_matrix(b))
    np.testing.assert_allclose(got.T, want, atol=2e-5)


def test_no_process_wide_state_on_the_request_path(session, monkeypatch):
    def refuse(*a):
        raise AssertionError("torch.set_num_threads on a request path")

    monkeypatch.setattr(torch, "set_num_threads", refuse)
    qmat = session.query_matrix(session.queries(["birds"]))
    E.window_similarity(session.store, 0, None, qmat)
    E.window_similarity(session.store, 1, None, qmat, level=2)


def _exact_refused(session, md, zi):
    """Reference: every pixel fused from its z_img at its centre, straight through the model."""
    st = session.store
    x, y = np.asarray(st.group["x"][:]), np.asarray(st.group["y"][:])
    xx, yy = np.meshgrid(x, y)
    lon, lat = Transformer.from_crs(st.spec.crs_wkt, 4326, always_xy=True).transform(xx, yy)
    z = np.asarray(st.group["z_img"][zi], np.float32)
    ok = (np.asarray(st.group["status"][zi]) == DONE) & np.isfinite(z).all(-1)
    emb = session.model.embed_image_features(torch.from_numpy(z[ok]), md.for_pixels(lon[ok], lat[ok]), fuse=md.fuse)
    return ok, emb


def test_refusion_exact_at_full_resolution_and_measured_at_levels(session, capsys):
    md = MetadataOptions(month=11, hour=22)
    assert session.needs_refusion(md)
    ref = session.refusion(md)
    qmat = session.query_matrix(session.queries(["birds singing"]))
    zi = 1
    ok, emb = _exact_refused(session, md, zi)
    exact = np.full(ok.shape, np.nan)
    exact[ok] = (2 * emb.mean.double().numpy() @ qmat.mean.double().numpy()[0] - 2
                 - emb.var_sum().numpy() - float(qmat.var_sum[0]))
    r0 = E.window_similarity(session.store, zi, None, qmat, refusion=ref)
    assert not r0.approximate
    np.testing.assert_allclose(r0.similarity[0], exact, atol=1e-4)
    assert np.array_equal(np.isnan(r0.similarity[0]), ~ok)
    # coarse levels: fusion of the averaged z_img, against the exact average of fused pixels
    errs = {}
    for k in (1, 2, 3):
        r = E.window_similarity(session.store, zi, None, qmat, level=k, refusion=ref)
        assert r.approximate and r.plane.approximate
        c = 1 << k
        h, w = r.plane.shape
        avg = np.full((h, w), np.nan)
        for i in range(h):
            for j in range(w):
                v = exact[i * c:(i + 1) * c, j * c:(j + 1) * c]
                if np.isfinite(v).any():
                    avg[i, j] = np.nanmean(v)
        spread = np.nanmax(exact) - np.nanmin(exact)
        e = np.nanmax(np.abs(r.similarity[0] - avg))
        errs[k] = (float(e), float(e / spread))
        assert e / spread < 0.25  # an approximation, but of the right field
    with capsys.disabled():
        print("\ncoarse re-fusion error (max abs, relative to the map's range):", errs)


@pytest.mark.parametrize("streamed", [True, False])
def test_query_command_streams_the_map_and_equals_query_store(built, session, tmp_path, monkeypatch, streamed):
    """`psm-map query` writes the map from lazy windows (dask writer, previews from the COG's
    overviews): the same values as the in-memory path, a valid COG, a STAC Item."""
    import rasterio
    from rio_cogeo.cogeo import cog_validate

    from psm_mapping import query as M
    from psm_mapping.query import query_store
    from psm_mapping.answer import map_from_store

    if streamed:  # as a map too large for memory: lazy windows into the dask writer
        monkeypatch.setattr(M, "EAGER_MAX_BYTES", 0)
    cfg = MapConfig(queries=["birds singing"], out=str(tmp_path / "q.tif"), progress=False, previews=True,
                    month=5)  # the store's metadata: no re-fusion
    run = map_from_store(built["store"], cfg, log_fn=lambda *a: None)
    assert cog_validate(str(tmp_path / "q.tif"))[0]
    assert (tmp_path / "q.tif.stac.json").is_file() and (tmp_path / "q.tif.preview" / "index.html").is_file()
    want = query_store(session.store, session.queries(["birds singing"]))
    with rasterio.open(tmp_path / "q.tif") as src:
        got = src.read()
        desc = list(src.descriptions)
    assert got.shape[0] == 2 + 2  # similarity per zoom, uncertainty per zoom
    np.testing.assert_allclose(got[:2], want.similarity[0], rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(got[2:], want.uncertainty, rtol=0, atol=0, equal_nan=True)
    assert run.pixels == int(np.isfinite(want.similarity[0][0]).sum()) and desc[0]


def test_checkpoint_hash_is_remembered_by_path_size_and_mtime(tmp_path, monkeypatch):
    """A session hashes a checkpoint once: the memo answers while the file's size and modification
    time stay, and a rewritten file (new mtime) is hashed again."""
    import hashlib
    import json
    import os

    from psm_mapping.session import SHA_MEMO_FILE, checkpoint_sha256

    monkeypatch.setenv("PSM_CACHE", str(tmp_path / "cache"))
    ck = tmp_path / "m.ckpt"
    ck.write_bytes(b"weights" * 1000)
    real = hashlib.sha256(ck.read_bytes()).hexdigest()
    assert checkpoint_sha256(ck) == real
    memo_path = tmp_path / "cache" / "checkpoints" / SHA_MEMO_FILE
    memo = json.loads(memo_path.read_text())
    assert list(memo.values()) == [real]
    memo_path.write_text(json.dumps({k: "f" * 64 for k in memo}))  # the memo is what answers now
    assert checkpoint_sha256(ck) == "f" * 64
    st = os.stat(ck)
    os.utime(ck, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert checkpoint_sha256(ck) == real
    memo_path.write_text("{not json")  # a damaged memo is a miss, then rewritten
    assert checkpoint_sha256(ck) == real and json.loads(memo_path.read_text())
