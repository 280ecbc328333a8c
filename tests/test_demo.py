"""``psm-map --demo`` runs offline and writes a valid COG, a Zarr, previews and an HTML page,
saying plainly that the weights are untrained."""
from __future__ import annotations

import numpy as np
import rasterio

from psm_mapping.cli import main


def test_demo_offline(tmp_path, monkeypatch, capsys):
    import rioxarray  # noqa: F401
    import xarray as xr
    from rio_cogeo.cogeo import cog_validate

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("PSM_CHECKPOINT", raising=False)
    out = tmp_path / "demo"
    assert main(["--demo", "--out", str(out)]) == 0
    cap = capsys.readouterr()
    log = cap.out + cap.err
    assert "UNTRAINED" in log
    assert str(out.resolve()) in log  # the folder is named at the end

    cog = out / "soundscape.tif"
    valid, errors, _ = cog_validate(str(cog))
    assert valid, errors
    with rasterio.open(cog) as src:
        tags = src.tags()
        desc = src.descriptions
        data = src.read()
        assert src.crs.is_projected
    assert "UNTRAINED" in tags["weights"]
    assert tags["checkpoint"] == "psm_demo_untrained.ckpt" and len(tags["checkpoint_sha256"]) == 64
    assert any("birds chirping" in d for d in desc) and any("chirps.wav" in d for d in desc)
    assert all("zoom" in d for d in desc)
    assert np.isfinite(data).any(axis=(1, 2)).all() and np.isnan(data).any()

    ds = xr.open_zarr(out / "soundscape.zarr")
    assert ds.rio.crs is not None and ds.rio.crs.is_projected
    assert "UNTRAINED" in str(dict(ds.attrs))

    previews = out / "soundscape.tif.preview"
    assert (previews / "index.html").is_file()
    pngs = list(previews.glob("*.png"))
    assert len(pngs) >= len(desc)
    html = (previews / "index.html").read_text()
    assert "UNTRAINED" in html.upper() or "untrained" in html
    assert "Untrained weights:" in html  # the warning banner, not only the provenance table
