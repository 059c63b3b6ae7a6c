"""Uniform grids: scale search, zero points, codes and the record they become."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress import quant
from compress.quant import ScaleMethod


def random_weights(seed: int, shape=(6, 5, 3, 3), outliers: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)
    if outliers:
        w.view(-1)[::37] *= 8
    return w


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), bits=st.integers(2, 8), symmetric=st.booleans(),
       per_channel=st.booleans(), sparsity=st.sampled_from([0.0, 0.5, 0.9]), outliers=st.booleans(),
       shift=st.sampled_from([0.0, 0.7]))
def test_grid_mse_scale_is_never_worse_than_minmax(seed, bits, symmetric, per_channel, sparsity, outliers, shift):
    w = random_weights(seed, outliers=outliers) + shift
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(seed + 1)) >= sparsity
    kw = dict(mask=mask, bits=bits, symmetric=symmetric, per_channel=per_channel)
    mse = quant.grid(w, method=ScaleMethod.MSE, **kw)
    minmax = quant.grid(w, method=ScaleMethod.MINMAX, **kw)
    err_mse = quant.quant_error(w, mask, mse.scale, mse.zero_point, mse.qmin, mse.qmax, per_channel)
    err_minmax = quant.quant_error(w, mask, minmax.scale, minmax.zero_point, minmax.qmin, minmax.qmax, per_channel)
    assert torch.all(err_mse <= err_minmax)
    assert err_mse.sum() <= err_minmax.sum()


def test_grid_mse_clips_outliers_and_beats_minmax_clearly():
    w = random_weights(0, shape=(4096,), outliers=True)
    mse = quant.grid(w, bits=4)
    minmax = quant.grid(w, bits=4, method=ScaleMethod.MINMAX)
    assert mse.scale.item() < minmax.scale.item()
    assert quant.quant_error(w, None, *mse).item() < 0.8 * quant.quant_error(w, None, *minmax).item()


@pytest.mark.parametrize("per_channel", [False, True])
def test_grid_asymmetric_maps_zero_exactly(per_channel):
    w = random_weights(3).abs() + 0.25  # all positive: the range must be widened to include 0
    w[0, 0, 0, 0] = 0.0
    w[1, 2, 1, 1] = 0.0
    g = quant.grid(w, bits=4, symmetric=False, per_channel=per_channel)
    assert g.qmin == 0 and g.qmax == 15
    assert torch.all((g.zero_point >= 0) & (g.zero_point <= 15))
    q = quant.quantize_nearest(w, *g)
    values = quant.dequantize(q, g.scale, g.zero_point)
    assert values[0, 0, 0, 0].item() == 0.0 and values[1, 2, 1, 1].item() == 0.0
    record = quant.to_record(tuple(w.shape), None, q, g.scale, g.zero_point, 4, per_channel, qmin=g.qmin)
    dense = record.to_dense()
    assert dense[0, 0, 0, 0] == 0.0 and dense[1, 2, 1, 1] == 0.0
    assert np.signbit(dense[0, 0, 0, 0]) == False  # noqa: E712  (+0.0, not -0.0)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_at_most_2_bits_values_per_tensor_or_channel(symmetric, per_channel, bits):
    w = random_weights(7)
    g = quant.grid(w, bits=bits, symmetric=symmetric, per_channel=per_channel)
    values = quant.dequantize(quant.quantize_nearest(w, *g), g.scale, g.zero_point)
    groups = values.reshape(values.shape[0], -1) if per_channel else values.reshape(1, -1)
    for row in groups:
        assert torch.unique(row).numel() <= 2 ** bits


@pytest.mark.parametrize("symmetric,restricted", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("per_channel", [False, True])
def test_to_record_round_trip_is_bit_exact_and_skips_pruned(symmetric, restricted, per_channel):
    w = random_weights(11)
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(5)) > 0.6
    w = torch.where(mask, w, 0.0)
    w[0, 0, 0, 0], mask[0, 0, 0, 0] = 0.0, True  # a kept weight that is exactly zero stays in the record
    g = quant.grid(w, mask, bits=4, symmetric=symmetric, restricted=restricted, per_channel=per_channel)
    q = quant.quantize_nearest(w, *g)
    record = quant.to_record(tuple(w.shape), mask, q, g.scale, g.zero_point, 4, per_channel, qmin=g.qmin)
    assert np.array_equal(record.positions, np.flatnonzero(mask.numpy().reshape(-1)))
    assert record.codes.min() >= 0 and record.codes.max() < 16
    expected = torch.where(mask, quant.dequantize(q, g.scale, g.zero_point), 0.0)
    assert torch.equal(torch.from_numpy(record.to_dense()), expected)
    if symmetric:
        assert np.all(record.table.zero_point == 8)  # levels // 2, as the record documents
    if restricted:
        assert record.codes.min() >= 1 and g.qmin == -7


def test_grid_ignores_pruned_weights():
    w = random_weights(2, shape=(200,))
    w[17] = 50.0
    mask = torch.ones_like(w, dtype=torch.bool)
    mask[17] = False
    g = quant.grid(w, mask, bits=4, method=ScaleMethod.MINMAX)
    expected = quant.grid(w[mask], None, bits=4, method=ScaleMethod.MINMAX)
    assert torch.equal(g.scale, expected.scale)


def test_grid_percentile_clips_below_minmax():
    w = random_weights(4, shape=(5000,), outliers=True)
    p = quant.grid(w, bits=8, method=ScaleMethod.PERCENTILE, percentile=99.0)
    m = quant.grid(w, bits=8, method=ScaleMethod.MINMAX)
    assert p.scale.item() < m.scale.item()
    expected = np.percentile(np.abs(w.numpy()), 99.0) / 127
    assert p.scale.item() == pytest.approx(expected, rel=1e-6)


def test_grid_all_zero_or_empty_tensor_is_finite():
    w = torch.zeros(3, 4)
    for symmetric in (True, False):
        g = quant.grid(w, bits=4, symmetric=symmetric, per_channel=True)
        assert torch.all(torch.isfinite(g.scale)) and torch.all(g.scale > 0)
        assert torch.all(quant.dequantize(quant.quantize_nearest(w, *g), g.scale, g.zero_point) == 0)
    g = quant.grid(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool), bits=4)
    assert torch.isfinite(g.scale).all()


def test_int_range_symmetric_restricted_and_asymmetric():
    assert quant.int_range(4, True) == (-8, 7)
    assert quant.int_range(4, True, restricted=True) == (-7, 7)
    assert quant.int_range(4, False) == (0, 15)
    with pytest.raises(ValueError):
        quant.int_range(4, False, restricted=True)
    with pytest.raises(ValueError):
        quant.int_range(1, True)


def test_to_record_rejects_codes_off_the_grid():
    g = quant.grid(torch.randn(10), bits=3)
    with pytest.raises(ValueError):
        quant.to_record((10,), None, torch.full((10,), 9), g.scale, g.zero_point, 3, False, qmin=g.qmin)
