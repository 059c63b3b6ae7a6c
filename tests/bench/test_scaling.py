import numpy as np
import pytest

from compress import bench
from compress.bench import scaling


def test_scaling_tiny_measures_every_size_and_draws_the_plot(tmp_path):
    out, result = bench.run("scaling", bench.Size.TINY, tmp_path)
    rows = result.figures["rows"]
    assert [r["weights"] for r in rows] == list(scaling.SIZES[bench.Size.TINY])
    assert [r["kept"] for r in rows] == [n // 10 for n in scaling.SIZES[bench.Size.TINY]]  # 90 % pruned
    assert np.all(np.diff([r["file_bytes"] for r in rows]) > 0)
    for r in rows:
        assert all(r[c]["median_s"] > 0 and r[c]["runs"] == scaling.REPEAT[bench.Size.TINY] for c in scaling.CURVES)
    assert set(result.figures["slopes"]) == set(scaling.CURVES)
    assert (out / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slope_of_exact_power_laws():
    rows = [{"weights": n, "a": {"median_s": 3e-9 * n}, "b": {"median_s": 1e-12 * n ** 2}} for n in (10, 100, 1000)]
    assert scaling.slope(rows, "a") == pytest.approx(1.0)
    assert scaling.slope(rows, "b") == pytest.approx(2.0)
