"""Chips cut on the device (one uploaded window per zoom, ``unfold`` + gather) equal host cutting bit
for bit on CPU (same chips, same batches, same store); ``--batch-size auto``; ``--compile``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from psm_mapping.embed import auto_batch_size, gather_chips
from psm_mapping.errors import InputError
from psm_mapping.run import MapConfig, map_region
from psm_mapping.tiling import CHIP

from test_zoom_sampling import STRIDE, inputs  # noqa: F401  (the zoom-sampling scene)


def test_gather_equals_host_slices():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 300, 410), dtype=np.uint8)
    ro = rng.integers(0, 300 - CHIP + 1, 17)
    co = rng.integers(0, 410 - CHIP + 1, 17)
    got = gather_chips(torch.from_numpy(data), ro, co)
    assert got.dtype == torch.uint8 and got.shape == (17, 3, CHIP, CHIP)
    for n in range(17):
        assert np.array_equal(got[n].numpy(), data[:, ro[n]:ro[n] + CHIP, co[n]:co[n] + CHIP])


def _arrays(root: Path) -> dict:
    (p,) = Path(root).glob("*.zarr")
    g = zarr.open_group(str(p), mode="r")
    return {n: np.asarray(g[n][:]) for n in ("z_img", "mean", "var_sum", "uncertainty", "valid", "status")}


@pytest.mark.parametrize("sampling", ["dense", "scale"])
def test_device_cut_store_bit_identical_on_cpu(inputs, tmp_path, sampling):  # noqa: F811
    out = {}
    for cut in (False, True):
        d = tmp_path / f"cut{int(cut)}"
        d.mkdir()
        cfg = MapConfig(region=inputs["region"], imagery=inputs["scene"], queries=["birds"],
                        checkpoint=inputs["fast_ckpt"], clap_config=inputs["clap"], tokenizer=inputs["tokenizer"],
                        zoom_levels=(1, 3, 5), stride=STRIDE, device="cpu", block_size=6, batch_size=7,
                        device_cut=cut, zoom_sampling=sampling, out=str(d / "m.tif"), store=str(d / "store"),
                        progress=False, previews=False)
        run = map_region(cfg, log_fn=lambda *a: None)
        out[cut] = (_arrays(d / "store"), run.chips)
    assert out[False][1] == out[True][1] > 0
    for n in out[False][0]:
        assert np.array_equal(out[False][0][n], out[True][0][n], equal_nan=True), n


def test_batch_size_auto(inputs):  # noqa: F811
    from psm_mapping.model import PSM

    cfg = MapConfig(batch_size="auto").validate()
    assert cfg.batch_size == "auto"
    with pytest.raises(InputError, match="batch size 'many' is not a whole number"):
        MapConfig(batch_size="many").validate()
    m = PSM.from_checkpoint(inputs["fast_ckpt"], clap_config=inputs["clap"])
    assert auto_batch_size(m, torch.device("cpu")) == 64


def test_compile_matches_eager(inputs):  # noqa: F811
    from psm_mapping.embed import ImageEmbedder, MetadataOptions
    from psm_mapping.model import PSM

    m = PSM.from_checkpoint(inputs["fast_ckpt"], clap_config=inputs["clap"])
    x = torch.rand(3, 3, 224, 224)
    ref = m.image_features(x, 3)
    ImageEmbedder(m, torch.device("cpu"), MetadataOptions(), compile=True)
    assert getattr(m.sat_encoder.encoder, "_psm_compiled", False)
    got = m.image_features(x, 3)
    assert torch.allclose(got, ref, atol=1e-5)
