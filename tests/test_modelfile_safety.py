"""Loading a .dcz file into a model: names and shapes are checked against the model before anything is decoded."""
import runpy

import numpy as np
import pytest
import torch

from compress import modelfile
from compress.codec import container
from compress.errors import FormatError
from compress.models import MLP
from compress.record import Codebook, TensorRecord


def test_modelfile_load_into_refuses_a_misfit_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "m.dcz"
    container.write(path, {"fc1.weight": np.zeros((16, 64), np.float32), "fc1.bias": np.zeros(16, np.float32),
                           "fc2.weight": np.zeros((10, 999), np.float32), "fc2.bias": np.zeros(10, np.float32)})
    decoded = []
    monkeypatch.setattr(container.Reader, "array", lambda self, name: decoded.append(name))
    with pytest.raises(FormatError, match=r"tensor 'fc2.weight'.*\(10, 999\) in the file, \(10, 16\) in the model"):
        modelfile.load_into(MLP((1, 8, 8), 10, hidden=(16,)), path)
    assert decoded == []


def test_modelfile_load_into_allows_what_the_model_holds(tmp_path):
    model = MLP((1, 8, 8), 10, hidden=(16,))
    path = tmp_path / "m.dcz"
    container.write(path, {k: v.numpy() for k, v in model.state_dict().items()})
    fresh = modelfile.load_into(MLP((1, 8, 8), 10, hidden=(16,)), path)
    for k, v in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_modelfile_decode_cli_refuses_a_bomb_in_one_line(tmp_path, capsys):
    # the CLI's main without importing compress.decode, which would rebind the API function of that name
    decode_main = runpy.run_module("compress.decode")["main"]
    path = tmp_path / "bomb.dcz"
    container.write(path, {"w": TensorRecord((1 << 26,), [0], [0], Codebook([1.0]))}, gap_bits=10)
    assert decode_main([str(path), "-o", str(tmp_path / "w.pt")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "decompression bomb" in err[0] and "--allow-elements" in err[0]
    assert not (tmp_path / "w.pt").exists()
