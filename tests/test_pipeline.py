"""End to end: the quick-start recipe through the CLI, resume, determinism, and the report's honesty."""
import json
from pathlib import Path

import pytest
import torch

from compress import decode, pipeline, run as run_cli
from compress.models import MLP

RECIPE = Path(__file__).parent.parent / "recipes" / "quickstart.toml"
FAST = ["--set", "pretrain.epochs=8", "--set", "stages.prune.rounds=2", "--set", "stages.prune.retrain.epochs=1",
        "--set", "stages.quantize.finetune.epochs=1"]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    assert run_cli.main([str(RECIPE), "--out", str(out)]) == 0
    return out


def test_quickstart_writes_every_artifact(quickstart):
    for name in ("model.dcz", "report.json", "report.md", "recipe.toml", "versions.json", "run.log",
                 "pretrain.pt", "accuracy.png", "weights.png", "stages/01-prune.pt", "stages/02-quantize.pt",
                 "stages/03-encode.pt"):
        assert (quickstart / name).is_file(), name
    assert not list(quickstart.glob("**/.*tmp*")) and not list(quickstart.glob("**/*.tmp"))


def test_quickstart_report_figures_come_from_the_file(quickstart):
    r = json.loads((quickstart / "report.json").read_text())
    size = (quickstart / "model.dcz").stat().st_size
    model = MLP((1, 8, 8), 10, hidden=(256, 128))
    dense = 4 * sum(p.numel() for p in model.parameters())
    assert r["file_bytes"] == size and r["dense_bytes"] == dense
    assert r["ratio"] == pytest.approx(dense / size)
    assert r["bit_exact"] is True
    # the final accuracy is that of a fresh model loaded from the file
    import compress
    from compress import data as data_mod, train

    loaded = compress.load(quickstart / "model.dcz", model)
    datasets = data_mod.load(data_mod.DataConfig(), seed=0)
    assert train.evaluate(loaded, datasets, device=torch.device("cpu")) == pytest.approx(r["final_accuracy"])
    assert r["baseline_accuracy"] > 90 and r["final_accuracy"] > r["baseline_accuracy"] - 3
    assert r["ratio"] > 20


def test_quickstart_decoded_file_is_sparse_and_shared(quickstart):
    state = decode(quickstart / "model.dcz")
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        w = state[name]
        assert (w != 0).float().mean() == pytest.approx(0.1, abs=0.002)
        assert torch.unique(w[w != 0]).numel() <= 16


def test_resume_skips_every_stage_and_rewrites_the_same_file(quickstart, tmp_path):
    before = (quickstart / "model.dcz").read_bytes()
    assert run_cli.main([str(RECIPE), "--out", str(quickstart), "--resume"]) == 0
    r = json.loads((quickstart / "report.json").read_text())
    assert [s.get("resumed", False) for s in r["stages"]] == [True, True, True, True]
    assert (quickstart / "model.dcz").read_bytes() == before


def test_same_seed_gives_a_byte_identical_file(tmp_path):
    # one thread: with more, CPU BLAS may split sums differently under load and change the last bits of training
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_cli.main([str(RECIPE), "--out", str(a), *FAST, "--set", "run.threads=1"]) == 0
    assert run_cli.main([str(RECIPE), "--out", str(b), *FAST, "--set", "run.threads=1"]) == 0
    assert (a / "model.dcz").read_bytes() == (b / "model.dcz").read_bytes()
    # and the override is recorded in the resolved recipe
    assert "epochs = 8" in (a / "recipe.toml").read_text()


def test_changed_stage_invalidates_its_checkpoint_on_resume(tmp_path):
    out = tmp_path / "r"
    assert run_cli.main([str(RECIPE), "--out", str(out), *FAST]) == 0
    assert run_cli.main([str(RECIPE), "--out", str(out), "--resume", *FAST, "--set", "stages.quantize.bits=3"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert [s.get("resumed", False) for s in r["stages"]] == [True, True, False, False]
    w = decode(out / "model.dcz")["fc1.weight"]
    assert torch.unique(w[w != 0]).numel() <= 8


def test_check_prints_the_plan_and_trains_nothing(tmp_path, capsys):
    assert run_cli.main([str(RECIPE), "--check", "--out", str(tmp_path / "none")]) == 0
    out = capsys.readouterr().out
    assert "fc1.weight" in out and "256x64" in out and "sparsity=0.9" in out and "bits=4" in out
    assert not (tmp_path / "none").exists()


def test_bad_recipe_exits_2_with_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(RECIPE.read_text().replace("sparsity = 0.9", "sparsity = 9"))
    assert run_cli.main([str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "stages.prune.sparsity" in err
    assert not (tmp_path / "o").exists()


def test_embedded_default_recipe_is_the_quickstart():
    import compress

    embedded = Path(compress.__file__).parent / "quickstart.toml"
    assert embedded.read_text() == RECIPE.read_text()


def test_api_build_from_recipe_then_load_the_file(quickstart):
    import compress

    model = compress.load(quickstart / "model.dcz", compress.build(RECIPE))
    for name, tensor in decode(quickstart / "model.dcz").items():
        assert torch.equal(model.state_dict()[name], tensor)


def test_load_stage_whose_model_file_is_gone_returns_none_and_leaves_the_model_untouched(tmp_path):
    from torch import nn

    from compress.stages import State

    saved = nn.Linear(3, 2)
    state = State(masks={"weight": torch.ones(2, 3, dtype=torch.bool)}, file=tmp_path / "gone.dcz")
    pipeline.save_stage(tmp_path / "03-encode.pt", "fp", saved, state, {"stage": "encode"})
    model, fresh = nn.Linear(3, 2), State()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert pipeline.load_stage(tmp_path / "03-encode.pt", "fp", model, fresh) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert fresh.masks == {} and fresh.file is None
    (tmp_path / "gone.dcz").write_bytes(b"x")  # with the file back, the same checkpoint loads
    assert pipeline.load_stage(tmp_path / "03-encode.pt", "fp", model, fresh) == {"stage": "encode"}
    assert torch.equal(model.weight, saved.weight) and fresh.file == tmp_path / "gone.dcz"
