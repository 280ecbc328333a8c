"""Shared test fixtures: the official-format fixtures in ../shared, tiny checkpoints, a tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def fixtures_dir() -> Path:
    return Path(os.environ.get("PSM_FIXTURES", REPO.parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def official_fixtures() -> Path:
    """../shared/fixtures (or $PSM_FIXTURES). Absent: skip, unless PSM_REQUIRE_FIXTURES=1 (CI)."""
    d = fixtures_dir()
    if not (d / "psm_tiny_meta_sentinel.ckpt").is_file():
        reason = f"official fixtures not found in {d} (set PSM_FIXTURES)"
        if os.environ.get("PSM_REQUIRE_FIXTURES") == "1":
            pytest.fail(reason + " and PSM_REQUIRE_FIXTURES=1")
        pytest.skip(reason)
    return d


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """``ckpt_factory(sat_type=..., metadata_type=..., probabilistic=..., **kw) -> Path``, cached."""
    from psm_mapping.model.factory import make_checkpoint

    root = tmp_path_factory.mktemp("ckpts")
    cache: dict = {}

    def make(**kw):
        kw.setdefault("embed_dim", 64)
        key = tuple(sorted((k, str(v)) for k, v in kw.items()))
        if key not in cache:
            cache[key] = make_checkpoint(root / f"psm_{len(cache)}.ckpt", **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(ckpt_factory) -> Path:
    return ckpt_factory(sat_type="sentinel", metadata_type="latlong_month_time_asource_tsource")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from psm_mapping.model.factory import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))
