"""The fast-mode section of ``python -m jetdet.bench``: it measures jetdet.patch's default and quality="fast" on
the bundled model against full compute, prints the table and writes the PNG it names."""

import math

import pytest

from jetdet import bench
from jetdet.models import bundled


@pytest.mark.skipif(not bundled.DIT_FILE.exists(), reason="the bundled model is not trained in this checkout")
def test_fast_mode_section(tmp_path, capsys, restore_threads):
    png = tmp_path / "fast.png"
    rows = bench.fast_mode(seeds=1, plot=str(png), steps=10)
    out = capsys.readouterr().out
    assert [r["name"] for r in rows] == ["full", "defaults", "quality=fast"]
    full, default, fast = rows
    assert full["psnr_mean"] == 100.0 and full["fme_reduction"] == 1.0
    for r in (default, fast):
        assert math.isfinite(r["psnr_mean"]) and 0.0 < r["psnr_mean"] < 100.0
        assert r["fme"] < full["fme"] and r["calls"] <= full["calls"]
        assert 0.0 <= r["accuracy"] <= 1.0
    assert fast["fme"] <= default["fme"]  # the faster preset does less work
    assert 'jetdet.patch(model, mode="fast")' in out and 'quality="fast"' in out
    assert "100.00" not in out  # full compute's PSNR is the reference, not a measured 100 dB
    assert next(line for line in out.splitlines() if "full compute" in line).split()[-3:-1] == ["ref", "ref"]
    pytest.importorskip("matplotlib")
    assert f"plot: {png}" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
