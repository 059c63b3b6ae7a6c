"""The linear quantization stage: records that decode to the model bit for bit, masks kept, QAT."""
import logging
import types

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.errors import RecipeError
from compress.quant import Granularity, ScaleMethod
from compress.record import Affine
from compress.stages import State
from compress.stages.base import Context, REGISTRY
from compress.stages.linear import LinearConfig, run
from compress.train import Optimizer, TrainConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def data(n: int = 128):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum(dim=(1, 2)) > 0).long() + (x[:, 0, 4:].sum(dim=(1, 2)) > 2).long()
    ds = TensorDataset(x, y)
    return types.SimpleNamespace(train=ds, test=ds, calibration=None, input_shape=(1, 8, 8), num_classes=3,
                                 name="tiny")


def context(tmp_path, datasets=None) -> Context:
    recipe = types.SimpleNamespace(data=types.SimpleNamespace(batch_size=32), model=types.SimpleNamespace(name="t"))
    return Context(data=datasets, device=torch.device("cpu"), seed=0, run_dir=tmp_path,
                   log=logging.getLogger("compress.test"), recipe=recipe)


def pruned(seed: int = 0, density: float = 0.4) -> tuple[Net, State]:
    torch.manual_seed(seed)
    model, state = Net(), State()
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            mask = torch.rand(p.shape) < density
            state.masks[name] = mask
            with torch.no_grad():
                p.copy_(torch.where(mask, p, torch.zeros(())))
    return model, state


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("granularity", [Granularity.TENSOR, Granularity.CHANNEL])
def test_linear_round_trip_record_equals_model_weight_bit_for_bit(tmp_path, symmetric, granularity):
    torch.manual_seed(0)
    model = Net()
    state = State()
    result = run(model, state, LinearConfig(bits=4, symmetric=symmetric, granularity=granularity),
                 context(tmp_path))
    assert set(state.records) == {"conv.weight", "fc1.weight", "fc2.weight"}
    for name, record in state.records.items():
        w = model.get_parameter(name)
        assert torch.equal(w.detach(), torch.from_numpy(record.to_dense()))
        assert isinstance(record.table, Affine) and record.table.levels == 16
        assert record.table.per_channel == (granularity is Granularity.CHANNEL)
        assert len(record.positions) == w.numel()  # a dense tensor keeps every position
        figures = result["tensors"][name]
        assert figures["bits"] == 4 and figures["mse"] >= 0
        assert len(figures["scale"]) == (w.shape[0] if granularity is Granularity.CHANNEL else 1)


def test_linear_pruned_weights_stay_zero_and_are_absent_from_the_record(tmp_path):
    model, state = pruned()
    masks = {n: m.clone() for n, m in state.masks.items()}
    run(model, state, LinearConfig(bits=3, symmetric=False), context(tmp_path))
    for name, mask in masks.items():
        w = model.get_parameter(name).detach()
        assert torch.all(w[~mask] == 0) and not torch.any(torch.signbit(w[~mask]))
        record = state.records[name]
        assert np.array_equal(record.positions, np.flatnonzero(mask.numpy().reshape(-1)))
        assert torch.equal(state.masks[name], mask)


def test_linear_dense_tensor_keeps_exact_zeros_as_kept_weights(tmp_path):
    torch.manual_seed(1)
    model = Net()
    with torch.no_grad():
        model.fc2.weight[0, :5] = 0.0
    state = State()
    run(model, state, LinearConfig(bits=8, include=("fc2.weight",)), context(tmp_path))
    record = state.records["fc2.weight"]
    assert len(record.positions) == model.fc2.weight.numel()
    assert np.all(record.values()[:5] == 0.0)


@pytest.mark.parametrize("granularity", [Granularity.TENSOR, Granularity.CHANNEL])
def test_linear_leaves_at_most_2_bits_values(tmp_path, granularity):
    torch.manual_seed(2)
    model = Net()
    cfg = LinearConfig(bits=3, granularity=granularity, scale_method=ScaleMethod.MINMAX,
                       layers={"conv.*": {"bits": 2}})
    run(model, State(), cfg, context(tmp_path))
    for name, p in model.named_parameters():
        if not name.endswith("weight"):
            continue
        limit = 4 if name == "conv.weight" else 8
        rows = p.detach().reshape(p.shape[0], -1) if granularity is Granularity.CHANNEL else p.detach().reshape(1, -1)
        assert max(torch.unique(r).numel() for r in rows) <= limit


def test_linear_qat_keeps_masks_and_changes_weights(tmp_path):
    model, state = pruned(seed=3)
    masks = {n: m.clone() for n, m in state.masks.items()}
    reference, ref_state = pruned(seed=3)
    ctx = context(tmp_path, data())
    run(reference, ref_state, LinearConfig(bits=4), ctx)
    qat = LinearConfig(bits=4, include=("fc*",),
                       finetune=TrainConfig(epochs=2, lr=1e-2, optimizer=Optimizer.ADAM, weight_decay=0.0))
    run(model, state, qat, ctx)
    assert set(state.records) == {"fc1.weight", "fc2.weight"}
    for name, mask in masks.items():  # conv.weight is not quantized but its mask still held
        w = model.get_parameter(name).detach()
        assert torch.all(w[~mask] == 0)
        assert torch.equal(state.masks[name], mask)
    for name in ("fc1.weight", "fc2.weight"):
        w = model.get_parameter(name).detach()
        assert torch.equal(w, torch.from_numpy(state.records[name].to_dense()))
        assert not torch.equal(w, reference.get_parameter(name).detach())
        assert np.array_equal(state.records[name].positions, ref_state.records[name].positions)


def test_linear_qat_without_data_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError) as err:
        run(Net(), State(), LinearConfig(finetune=TrainConfig(epochs=1)), context(tmp_path))
    assert err.value.key == "finetune.epochs"


def test_linear_config_validates_its_fields():
    with pytest.raises(RecipeError, match="restricted_range"):
        LinearConfig(symmetric=False, restricted_range=True)
    with pytest.raises(RecipeError, match="bits"):
        LinearConfig(bits=1)
    with pytest.raises(RecipeError, match="percentile"):
        LinearConfig(percentile=40.0)
    with pytest.raises(RecipeError, match="'tensor', 'channel'"):
        LinearConfig(granularity="layer")
    assert LinearConfig(scale_method="percentile").scale_method is ScaleMethod.PERCENTILE


def test_linear_is_registered_as_a_quantize_method():
    spec = REGISTRY["quantize"]["linear"]
    assert spec.config is LinearConfig and not spec.needs_data


def test_linear_records_survive_the_model_file_bit_for_bit(tmp_path):
    from compress import modelfile

    model, state = pruned(seed=4)
    run(model, state, LinearConfig(bits=5, symmetric=False, granularity=Granularity.CHANNEL), context(tmp_path))
    path = tmp_path / "model.dcz"
    modelfile.save(path, model.state_dict(), state.records)
    decoded = modelfile.decode(path)
    assert modelfile.differing(model.state_dict(), decoded, list(state.records)) == []
