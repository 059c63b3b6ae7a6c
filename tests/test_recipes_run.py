"""Recipes beyond the quick-start: sensitivity scans, data-free runs, Fashion-MNIST (slow), decode CLI."""
import json
import os
from pathlib import Path

import pytest
import torch

import subprocess
import sys

from compress import run as run_cli
from compress.data import find_fashion_mnist
from compress.errors import InputError

ROOT = Path(__file__).parent.parent
QUICK = ["--set", "pretrain.epochs=5", "--set", "stages.prune.rounds=1", "--set", "stages.prune.retrain.epochs=1",
         "--set", "stages.quantize.finetune.epochs=0", "--set", "run.threads=1"]


def has_fashion() -> bool:
    try:
        find_fashion_mnist(None)
        return True
    except InputError:
        return False


def test_sensitivity_scan_writes_table_and_plot_and_accuracy_falls(tmp_path):
    out = tmp_path / "s"
    args = [str(ROOT / "recipes/quickstart.toml"), "--out", str(out), *QUICK,
            "--set", "stages.sensitivity.sparsities=[0.0, 0.99]"]
    assert run_cli.main(args) == 0
    result = json.loads((out / "sensitivity.json").read_text())
    assert set(result["accuracy"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for row in result["accuracy"].values():
        assert row["0.99"] < row["0"]
    assert (out / "sensitivity.png").stat().st_size > 1000 and "| `fc1.weight` |" in (out / "sensitivity.md").read_text()


def test_data_free_recipe_compresses_without_accuracy(tmp_path):
    recipe = tmp_path / "free.toml"
    recipe.write_text('[model]\nname = "mlp"\nhidden = [32]\n[stages.prune]\nsparsity = 0.5\nretrain = { epochs = 0 }\n'
                      '[stages.quantize]\nmethod = "kmeans"\nbits = 3\nfinetune = { epochs = 0 }\n[stages.encode]\n')
    assert run_cli.main([str(recipe), "--out", str(tmp_path / "o")]) == 0
    r = json.loads((tmp_path / "o" / "report.json").read_text())
    assert r["final_accuracy"] is None and "no accuracy" in r["note"] and r["ratio"] > 3


def test_decode_cli_writes_a_weights_only_loadable_state_dict(tmp_path):
    recipe = tmp_path / "free.toml"
    recipe.write_text('[model]\nname = "mlp"\nhidden = [16]\n[stages.quantize]\nmethod = "kmeans"\nbits = 2\n'
                      'finetune = { epochs = 0 }\n[stages.encode]\n')
    assert run_cli.main([str(recipe), "--out", str(tmp_path / "o")]) == 0
    assert decode_main(str(tmp_path / "o" / "model.dcz"), "-o", str(tmp_path / "w.pt")).returncode == 0
    state = torch.load(tmp_path / "w.pt", weights_only=True)
    assert set(state) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert torch.unique(state["fc1.weight"]).numel() <= 4 + 1


def decode_main(*args: str) -> subprocess.CompletedProcess:
    # a subprocess: `import compress.decode` would rebind the API function compress.decode to the CLI module
    return subprocess.run([sys.executable, "-m", "compress.decode", *args], capture_output=True, text=True)


def test_decode_cli_refuses_a_damaged_file_in_one_line(tmp_path):
    bad = tmp_path / "bad.dcz"
    bad.write_bytes(b"\x89DCZ\r\n\x1a\n" + os.urandom(64))
    done = decode_main(str(bad), "-o", str(tmp_path / "w.pt"))
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "w.pt").exists()


@pytest.mark.slow
@pytest.mark.fashion
@pytest.mark.skipif(not has_fashion(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_lenet300_fashion_recipe_runs_end_to_end_on_real_data(tmp_path):
    out = tmp_path / "f"
    args = [str(ROOT / "recipes/lenet300_fashion.toml"), "--out", str(out), "--set", "pretrain.epochs=2",
            "--set", "stages.prune.rounds=1", "--set", "stages.prune.retrain.epochs=1",
            "--set", "stages.quantize.finetune.epochs=1"]
    assert run_cli.main(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["baseline_accuracy"] > 80 and r["final_accuracy"] > 75 and r["bit_exact"]
    assert r["ratio"] > 30
    assert r["file_bytes"] == (out / "model.dcz").stat().st_size


@pytest.mark.parametrize("method", ["adaround", "nearest"])
def test_resnet20_folded_batchnorm_survives_the_file(tmp_path, method):
    """BN folded before quantizing: the decoder must fold a fresh ResNet-20 the same way to load the file."""
    out = tmp_path / method
    args = [str(ROOT / f"recipes/resnet20_{method}_fashion.toml"), "--out", str(out), "--set", "data.name=digits",
            "--set", "pretrain.epochs=1", "--set", "run.threads=1"]
    if method == "adaround":
        args += ["--set", "stages.quantize.iterations=20", "--set", "stages.quantize.calibration_samples=64"]
    assert run_cli.main(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["bit_exact"] is True
    assert r["final_accuracy"] == pytest.approx(r["stages"][-1]["accuracy"])  # fresh folded model == evaluated one
    state = torch.load(out / "stages" / "02-encode.pt", weights_only=True)
    assert state["folded_bn"] is True
    assert not any("bn" in name for name in compress_decode(out / "model.dcz"))


def compress_decode(path):
    from compress import modelfile

    return modelfile.decode(path)


def test_imagenet_recipe_runs_as_shipped_on_a_tiny_imagefolder(tmp_path):
    """recipes/imagenet_resnet18.toml unchanged but for where the data and weights are, and sizes made tiny."""
    import numpy as np
    import torchvision
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("n01440764", "n01443537"):
            (tmp_path / "imagenet" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (40, 44, 3), dtype=np.uint8)).save(
                    tmp_path / "imagenet" / split / c / f"{i}.JPEG", format="JPEG")
    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pth"  # stands in for torchvision's ImageNet state_dict (2 classes here)
    torch.save(torchvision.models.resnet18(num_classes=2).state_dict(), weights)
    out = tmp_path / "run"
    args = [str(ROOT / "recipes/imagenet_resnet18.toml"), "--out", str(out),
            "--set", f"data.path={tmp_path / 'imagenet'}", "--set", f"model.checkpoint={weights}",
            "--set", "data.image_size=32", "--set", "data.batch_size=4", "--set", "data.eval_batch_size=4",
            "--set", "stages.prune.rounds=1", "--set", "stages.prune.retrain.epochs=1",
            "--set", "stages.encode.compare=false", "--set", "run.threads=1"]
    assert run_cli.main(args) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["bit_exact"] is True and r["baseline_accuracy"] is not None and r["final_accuracy"] is not None
    assert [s["stage"] for s in r["stages"]] == ["baseline", "prune", "quantize", "encode"]
    assert r["stages"][0]["method"] == "checkpoint"
    state = torch.load(out / "stages" / "01-prune.pt", map_location="cpu", weights_only=True)
    assert "conv1.weight" not in state["masks"]  # the stem is excluded from pruning, as the recipe says
    fc = state["masks"]["fc.weight"]
    assert (~fc).float().mean().item() == pytest.approx(0.8, abs=1 / fc.numel())
    assert r["ratio"] > 4
