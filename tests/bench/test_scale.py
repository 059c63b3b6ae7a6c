"""The scale benchmarks at a size that takes seconds: full-size pipeline memory meter, AdaRound cost model."""
import pytest

from compress.bench import adaround_cost, fullsize


def test_fullsize_measure_round_trips_a_torchvision_model_bit_exactly(tmp_path, one_thread):
    r = fullsize.measure("squeezenet1_1", str(tmp_path), 1)
    assert r["bit_exact"] is True
    assert list(r["stages"]) == list(fullsize.STAGES)
    assert r["density"] == pytest.approx(1 - fullsize.SPARSITY, abs=1e-3)
    assert r["file_bytes"] == (tmp_path / "model.dcz").stat().st_size and r["ratio"] > 10
    if r["peak_is_per_stage"]:  # the meter sees the model itself while it is built
        assert r["stages"]["build"]["peak_bytes"] >= 0.9 * r["dense_bytes"]


def test_adaround_extrapolation_worked_example():
    # cached: 10k steps, plus computing 1024 samples' inputs once (32 batches of 32)
    assert adaround_cost.extrapolated_seconds({"cached": True, "step_s": 0.1, "batch_inputs_s": 2.0},
                                              10_000) == pytest.approx(10_000 * 0.1 + 32 * 2.0)
    # not cached: every step recomputes its batch's inputs
    row = {"cached": False, "step_s": 0.1, "batch_inputs_s": 2.0}
    assert adaround_cost.extrapolated_seconds(row, 10_000) == pytest.approx(10_000 * 2.1)
    assert adaround_cost.extrapolated_seconds(row, 10_000, cached=True) == pytest.approx(10_000 * 0.1 + 32 * 2.0)


def test_adaround_layer_costs_sizes_the_calibration_cache(one_thread):
    (row,) = adaround_cost.layer_costs(32, 1, only=("fc",))
    assert row["layer"] == "fc.weight" and row["weights"] == 512 * 1000
    # fc's input (512) and target (1000) floats for 1024 samples
    assert row["cache_mb_needed"] == pytest.approx((512 + 1000) * 4 * 1024 / 2 ** 20)
    assert row["cached"] and row["step_s"] >= 0 and row["batch_inputs_s"] > 0
