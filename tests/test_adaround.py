"""AdaRound: the relaxation, the schedule, floor-or-ceil rounding, masks, and the stage."""
import logging
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress import quant
from compress.errors import RecipeError
from compress.stages import State
from compress.stages.adaround import (
    AdaRoundConfig, CachedData, _Relaxation, adaround_layer, beta_at, execution_order, init_v,
    layer_data, rectified_sigmoid, reconstruction_loss, reconstruction_mse, relu_follows, round_loss, run)
from compress.stages.base import Context, REGISTRY


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def correlated_layer(seed: int = 0, n: int = 256, fin: int = 16, fout: int = 8):
    """A Linear layer whose inputs are strongly correlated (x = z @ A): where nearest rounding is not optimal."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(fin, fout)
    x = torch.randn(n, fin, generator=g) @ torch.randn(fin, fin, generator=g)
    with torch.no_grad():
        target = layer(x)
    return layer, x, target


class ConvNet(nn.Module):
    """conv-bn-relu, conv (functional relu), fc; registered in a different order than executed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6 * 4 * 4, 3)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.conv1 = nn.Conv2d(1, 4, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        x = self.act(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))


def data(n: int = 96):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    ds = TensorDataset(x, torch.zeros(n, dtype=torch.long))
    return types.SimpleNamespace(train=ds, test=ds, calibration=None, input_shape=(1, 8, 8), num_classes=3,
                                 name="tiny")


def context(tmp_path, datasets) -> Context:
    return Context(data=datasets, device=torch.device("cpu"), seed=0, run_dir=tmp_path,
                   log=logging.getLogger("compress.test"))


def trained_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    bn = model.bn1
    bn.running_mean.copy_(torch.randn(4, generator=g) * 0.1)
    bn.running_var.copy_(torch.rand(4, generator=g) + 0.5)
    bn.weight.data.copy_(torch.rand(4, generator=g) + 0.5)
    bn.bias.data.copy_(torch.randn(4, generator=g) * 0.1)
    return model.eval()


def test_h_starts_at_the_fractional_part():
    frac = torch.cat([torch.tensor([0.0, 0.5, 0.999]), torch.rand(1000)])
    torch.testing.assert_close(rectified_sigmoid(init_v(frac)), frac, atol=1e-5, rtol=0)
    layer, x, target = correlated_layer()
    g = quant.grid(layer.weight, bits=4, method=quant.ScaleMethod.MINMAX)  # no clipped weights
    w_over_s = layer.weight.detach() / g.scale
    r = adaround_layer(layer, x, target, *g, cfg=AdaRoundConfig(iterations=1, lr=1e-12))
    torch.testing.assert_close(r.soft, w_over_s - torch.floor(w_over_s), atol=1e-4, rtol=0)


def test_h_ends_at_exactly_0_or_1_and_every_weight_is_floor_or_ceil():
    layer, x, target = correlated_layer(1)
    for symmetric, per_channel in ((True, False), (False, True)):
        g = quant.grid(layer.weight, bits=3, symmetric=symmetric, per_channel=per_channel)
        cfg = AdaRoundConfig(iterations=500, lr=5e-2, reg_weight=0.1, bits=3)
        r = adaround_layer(layer, x, target, *g, cfg=cfg)
        assert ((r.soft == 0) | (r.soft == 1)).float().mean() >= 0.95  # the regulariser decided nearly all
        s = quant.broadcast_channels(g.scale, layer.weight)
        z = quant.broadcast_channels(g.zero_point, layer.weight)
        down = torch.floor(layer.weight.detach() / s).long() + z
        assert torch.equal(r.q, torch.clamp(down + r.up.long(), g.qmin, g.qmax))
        assert torch.all((r.q == torch.clamp(down, g.qmin, g.qmax)) | (r.q == torch.clamp(down + 1, g.qmin, g.qmax)))
        inside = (down >= g.qmin) & (down < g.qmax)
        step = s.expand_as(r.weight)
        assert torch.all((r.weight - layer.weight.detach()).abs()[inside] <= step[inside] * (1 + 1e-6))
        assert torch.equal(r.weight, quant.dequantize(r.q, g.scale, g.zero_point))


def test_adaround_beats_nearest_rounding_on_correlated_inputs():
    layer, x, target = correlated_layer(2)
    g = quant.grid(layer.weight, bits=3)
    r = adaround_layer(layer, x, target, *g, cfg=AdaRoundConfig(iterations=500, lr=5e-2, reg_weight=0.1))
    nearest = quant.dequantize(quant.quantize_nearest(layer.weight, *g), g.scale, g.zero_point)
    mse_nearest, mse_ada = reconstruction_mse(layer, CachedData(x, target), [nearest, r.weight], None)
    assert mse_ada < 0.8 * mse_nearest


def test_adaround_pruned_weights_stay_zero_and_frozen():
    layer, x, target = correlated_layer(3)
    mask = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    with torch.no_grad():
        layer.weight.copy_(torch.where(mask, layer.weight, 0.0))
    g = quant.grid(layer.weight, mask, bits=4, symmetric=False)
    r = adaround_layer(layer, x, target, *g, mask=mask, cfg=AdaRoundConfig(iterations=200, lr=1e-2))
    assert torch.all(r.weight[~mask] == 0) and not torch.any(torch.signbit(r.weight[~mask]))
    assert torch.all(r.soft[~mask] == 0) and not r.up[~mask].any()


def test_beta_follows_its_schedule():
    kw = dict(iterations=1000, warm_start=0.2, beta_start=20.0, beta_end=2.0)
    assert all(beta_at(t, **kw) is None for t in (0, 100, 199))  # warm start: no regulariser
    assert beta_at(200, **kw) == pytest.approx(20.0)
    assert beta_at(600, **kw) == pytest.approx(11.0)  # linear decay
    assert beta_at(1000, **kw) == pytest.approx(2.0)
    betas = [beta_at(t, **kw) for t in range(200, 1000)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    assert beta_at(0, iterations=10, warm_start=0.0, beta_start=20.0, beta_end=2.0) == pytest.approx(20.0)


def test_relaxation_gradient_matches_autograd():
    torch.manual_seed(0)
    layer = nn.Linear(12, 5)
    x, target = torch.randn(32, 12), torch.randn(32, 5)
    g = quant.grid(layer.weight, bits=4)
    s = g.scale
    w = layer.weight.detach()
    base = torch.floor(w / s)
    active = torch.rand(w.shape) > 0.2
    v0 = torch.where(active, torch.randn(w.shape) * 2, -10.0)  # as adaround_layer starts weights with no choice
    w_base = torch.where(active, s * base, 0.0)
    s_free = torch.where(active, s.expand_as(w), 0.0)
    for beta in (None, 2.0, 7.5):
        v = v0.clone().requires_grad_(True)
        h = rectified_sigmoid(v)
        out = torch.relu(nn.functional.linear(x, w_base + s_free * h, layer.bias))
        loss = reconstruction_loss(out, target, -1) + (0.01 * round_loss(h[active], beta) if beta else 0.0)
        loss.backward()
        relaxed = _Relaxation(v0.clone(), w_base, s_free)
        wq = relaxed.weight().clone().requires_grad_(True)
        reconstruction_loss(torch.relu(nn.functional.linear(x, wq, layer.bias)), target, -1).backward()
        torch.testing.assert_close(relaxed.grad(wq.grad, 0.01 if beta else 0.0, beta), v.grad, atol=1e-6, rtol=1e-4)


def test_execution_order_and_relu_detection():
    model = ConvNet().eval()
    x = torch.randn(2, 1, 8, 8)
    assert execution_order(model, ["fc", "conv2", "conv1"], x) == ["conv1", "conv2", "fc"]
    # conv1 is followed by BN, not by the ReLU, until the BN is folded into it
    assert relu_follows(model, ["conv1", "conv2", "fc"], x) == {"conv2"}
    model.bn1 = nn.Identity()
    assert relu_follows(model, ["conv1", "conv2", "fc"], x) == {"conv1", "conv2"}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(2 * 6 * 6, 2)

    def forward(self, x):
        x = self.relu(self.conv(x))
        return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))


def test_relu_detection_falls_back_to_execution_order_when_untraceable():
    assert relu_follows(Untraceable(), ["conv", "fc"], torch.randn(2, 1, 8, 8)) == {"conv"}


def test_recomputed_inputs_give_the_same_rounding_as_cached_ones():
    model = trained_bn(ConvNet())
    calib = data().train.tensors[0][:64]
    cached = layer_data(model, model, "conv2", calib, torch.relu, cache_mb=64)
    lazy = layer_data(model, model, "conv2", calib, torch.relu, cache_mb=0)
    assert isinstance(cached, CachedData) and not isinstance(lazy, CachedData)
    g = quant.grid(model.conv2.weight, bits=4)
    cfg = AdaRoundConfig(iterations=30, batch_size=8, lr=1e-2)
    a = adaround_layer(model.conv2, cached, None, *g, cfg=cfg, activation=torch.relu, seed=3)
    b = adaround_layer(model.conv2, lazy, None, *g, cfg=cfg, activation=torch.relu, seed=3)
    assert torch.equal(a.q, b.q)


def test_adaround_stage_folds_bn_and_writes_records_that_decode_to_the_model(tmp_path):
    torch.manual_seed(0)
    model = trained_bn(ConvNet())
    state = State()
    state.masks["conv2.weight"] = torch.rand(model.conv2.weight.shape) > 0.5
    with torch.no_grad():
        model.conv2.weight.mul_(state.masks["conv2.weight"])
    cfg = AdaRoundConfig(iterations=40, batch_size=8, calibration_samples=64, lr=1e-2,
                         layers={"fc.*": {"bits": 3}})
    result = run(model, state, cfg, context(tmp_path, data()))
    assert state.folded_bn and result["folded_bn"] == ["bn1"] and isinstance(model.bn1, nn.Identity)
    assert list(result["layers"]) == ["conv1.weight", "conv2.weight", "fc.weight"]  # network order
    assert result["layers"]["conv1.weight"]["activation"] == "relu"
    assert result["layers"]["fc.weight"]["bits"] == 3 and result["layers"]["fc.weight"]["activation"] == "none"
    for name, record in state.records.items():
        w = model.get_parameter(name).detach()
        assert torch.equal(w, torch.from_numpy(record.to_dense()))
        assert len(np.unique(record.codes)) <= 2 ** result["layers"][name]["bits"]
        figures = result["layers"][name]
        assert figures["seconds"] >= 0 and 0 <= figures["flipped"] <= 1
        assert figures["mse_adaround"] >= 0 and figures["mse_nearest"] >= 0
    mask = state.masks["conv2.weight"]
    assert torch.all(model.conv2.weight[~mask] == 0)
    assert np.array_equal(state.records["conv2.weight"].positions, np.flatnonzero(mask.numpy().reshape(-1)))


def test_adaround_stage_seed_defaults_to_the_run_seed_and_changes_the_calibration_draw(tmp_path):
    def quantized(seed):
        torch.manual_seed(0)
        model, state = trained_bn(ConvNet()), State()
        figures = run(model, state, AdaRoundConfig(iterations=10, batch_size=8, calibration_samples=32, seed=seed),
                      context(tmp_path, data()))
        return {n: r.codes for n, r in state.records.items()}, figures["layers"]["conv1.weight"]["mse_nearest"]

    unset, explicit, other = quantized(None), quantized(0), quantized(5)  # the context's run seed is 0
    assert unset[1] == explicit[1] and all(np.array_equal(unset[0][n], explicit[0][n]) for n in unset[0])
    assert other[1] != unset[1]  # other calibration samples: another error for the same nearest rounding


def test_adaround_stage_needs_data(tmp_path):
    assert REGISTRY["quantize"]["adaround"].needs_data
    with pytest.raises(RecipeError):
        run(ConvNet(), State(), AdaRoundConfig(iterations=1), context(tmp_path, None))


def test_adaround_config_validates_its_fields():
    for bad in (dict(bits=1), dict(iterations=0), dict(warm_start=1.0), dict(beta_start=1.5),
                dict(reg_weight=-1.0), dict(granularity="layer"), dict(beta_end=0.5, beta_start=0.5), dict(seed=-1)):
        with pytest.raises(RecipeError):
            AdaRoundConfig(**bad)


def test_adaround_file_decodes_into_a_fresh_folded_model_with_the_same_outputs(tmp_path):
    from compress import modelfile

    torch.manual_seed(0)
    model = trained_bn(ConvNet())
    state = State()
    run(model, state, AdaRoundConfig(iterations=20, batch_size=8, calibration_samples=32), context(tmp_path, data()))
    path = tmp_path / "model.dcz"
    modelfile.save(path, model.state_dict(), state.records, metadata={modelfile.FOLDED_BN: "1"})
    fresh = modelfile.load_into(ConvNet().eval(), path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(fresh(x), model(x))
    for name in state.records:
        assert torch.equal(fresh.get_parameter(name), model.get_parameter(name))
