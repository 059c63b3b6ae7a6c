"""modelfile: state_dict <-> .dcz, loading one tensor at a time."""
import pytest
import torch
from torch import nn

from compress import modelfile
from compress.codec import container
from compress.errors import FormatError
from compress.stages.kmeans import share
from compress.kmeans1d import Init


def small_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    w = model[0].weight
    record = share(w, w.abs() > 0.1, bits=2, init=Init.LINEAR, seed=0, max_iter=50)
    with torch.no_grad():
        w.copy_(torch.from_numpy(record.to_dense()))
    path = tmp_path / "m.dcz"
    modelfile.save(path, model.state_dict(), {"0.weight": record})
    return model, path


def test_iter_decode_decodes_lazily_in_file_order(tmp_path):
    model, path = small_file(tmp_path)
    reader = container.Reader(path)
    calls = []
    real = reader.array
    reader.array = lambda name: calls.append(name) or real(name)
    stream = modelfile.iter_decode(reader)
    assert calls == []  # nothing decoded before it is asked for
    name, tensor = next(stream)
    assert calls == [name] == [reader.names[0]]
    assert torch.equal(tensor, model.state_dict()[name])
    assert [n for n, _ in stream] == reader.names[1:]


def test_load_into_fills_the_model_own_tensors_bit_exactly(tmp_path):
    model, path = small_file(tmp_path)
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    weight = fresh[0].weight
    modelfile.load_into(fresh, path)
    assert fresh[0].weight is weight  # copied in place: no second copy of the model is built
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name].view(torch.int32), tensor.view(torch.int32)), name


def test_load_into_checks_every_shape_before_loading_anything(tmp_path):
    _, path = small_file(tmp_path)
    other = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))  # last layer differs
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(FormatError, match="tensor '2.weight'.*shape"):
        modelfile.load_into(other, path)
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, before[name]), name
