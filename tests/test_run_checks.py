"""Warnings a run gives before work: imagery far coarser than the chips, or meant for another sat type."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from geo_fixtures import texture, utm_scene  # noqa: E402

from psm_mapping.imagery.local import LocalRasterSource  # noqa: E402
from psm_mapping.run import _warn_imagery_mismatch  # noqa: E402


def test_coarse_imagery_for_aerial_chips_warns(tmp_path, caplog):
    scene = utm_scene(tmp_path / "s2.tif", texture(64, 64), 10.0)
    with LocalRasterSource(scene) as src, caplog.at_level(logging.WARNING, logger="psm_mapping.run"):
        _warn_imagery_mismatch(src, "sentinel", (1, 3, 5))
        assert not caplog.records  # 10 m imagery, 11.4 m chips: fine
        _warn_imagery_mismatch(src, "bingmap", (1, 3, 5))
    assert len(caplog.records) == 1 and "blurry" in caplog.records[0].getMessage()


def test_preset_meant_for_other_sat_type_warns(caplog):
    from psm_mapping.imagery.presets import open_preset

    src = open_preset("esri-world-imagery")  # no request is made: nothing is read
    assert src.info.extra["sat_type"] == "bingmap"
    with caplog.at_level(logging.WARNING, logger="psm_mapping.run"):
        _warn_imagery_mismatch(src, "sentinel", np.array([1]))
    assert any("training distribution" in r.getMessage() for r in caplog.records)
