"""Warnings a run gives before work: imagery far coarser than the chips, or meant for another sat type."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import pytest

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


def test_library_messages_name_settings_and_the_cli_names_flags(capsys, tmp_path):
    """A notebook sees the setting (``min_valid``), the command line the flag (``--min-valid``);
    commands quoted in a message keep their flags."""
    from psm_mapping.cli import main
    from psm_mapping.config import MapConfig
    from psm_mapping.errors import InputError

    with pytest.raises(InputError) as ei:
        MapConfig(min_valid=2.0, out="m.tif").validate()
    assert "min valid 2" in str(ei.value) and "--" not in str(ei.value), str(ei.value)
    assert ei.value.option == "min_valid"
    from psm_mapping.checks import _check_output
    from psm_mapping.errors import OutputError

    (tmp_path / "m.tif").write_bytes(b"x")
    with pytest.raises(OutputError) as ei:
        _check_output(str(tmp_path / "m.tif"), overwrite=False)
    assert "--overwrite" in ei.value.cli_message and "--" not in str(ei.value), str(ei.value)
    assert "pass overwrite" in str(ei.value)
    assert "zoom_levels" in str(InputError("pass --zoom-level 1,3,5 or `psm-map --demo`"))
    assert "`psm-map --demo`" in str(InputError("pass --zoom-level 1,3,5 or `psm-map --demo`"))
    rc = main(["--bbox", "8.5,47.3,8.51,47.31", "--query", "q", "--min-valid", "2", "--out", "m.tif"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--min-valid" in err[0], err
