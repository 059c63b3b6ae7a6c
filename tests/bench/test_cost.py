"""Pipeline cost at the tiny size: a fresh process per recipe, per-stage seconds and peak memory."""
import json

import pytest

from compress import bench
from compress.bench import _recipes, cost
from compress.errors import InputError


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    # the quick-start alone: one fresh process (~15 s, mostly imports); the LeNet commands are checked below
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(_recipes.MODELS_ENV, "quickstart")
        return bench.run("cost", bench.Size.TINY, tmp_path_factory.mktemp("bench") / "cost")


def test_cost_times_and_measures_every_stage_of_a_fresh_run(done):
    out, result = done
    assert list(result.figures) == ["quickstart"]
    f = result.figures["quickstart"]
    assert list(f["stages"]) == list(cost.STAGES)
    (run,) = f["runs"]
    assert sum(s["seconds"] for s in run["stages"].values()) < run["wall_seconds"]
    for name, s in f["stages"].items():
        assert s["seconds"] > 0, name
        assert s["peak_rss_scope"] == "stage"
        assert 0 < s["rss_start_bytes"] <= s["peak_rss_bytes"] <= f["max_rss_bytes"], name
    run_dir = out / "runs" / "quickstart-1"
    report = json.loads((run_dir / "report.json").read_text())
    assert not any(s.get("resumed") for s in report["stages"])  # from scratch
    assert report["stages"][0]["method"] == "pretrain"
    assert run["file_bytes"] == (run_dir / "model.dcz").stat().st_size
    md = (out / "result.md").read_text()
    assert "| quick-start (MLP on digits) (1 run" in md and "**whole process** (load average" in md


def test_cost_command_runs_the_shipped_recipe_shortened_on_digits(tmp_path):
    cmd = cost.command("lenet5", bench.Size.TINY, tmp_path / "r")
    assert cmd[1:4] == ["-m", "compress.run", str(_recipes.RECIPES / "lenet5_fashion.toml")]
    sets = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--set"]
    assert 'data.name="digits"' in sets and _recipes.TINY_MODEL["lenet5"] in sets
    assert cost.command("lenet300", bench.Size.FULL, tmp_path / "r")[-2:] == ["--out", str(tmp_path / "r")]


def test_cost_failed_run_is_one_line_naming_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(cost, "command", lambda name, size, run_dir: [
        "python", "-c", "import sys; print('error: dataset missing'); sys.exit(2)"])
    with pytest.raises(InputError, match=r"lenet300: .* exited with 2: error: dataset missing"):
        cost.run_once("lenet300", bench.Size.TINY, tmp_path / "r")


def test_selected_models_from_the_environment(monkeypatch):
    monkeypatch.setenv(_recipes.MODELS_ENV, "lenet5")
    assert _recipes.selected(["lenet300", "lenet5"]) == ["lenet5"]
    monkeypatch.setenv(_recipes.MODELS_ENV, "lenet5,resnet")
    with pytest.raises(InputError, match="COMPRESS_BENCH_MODELS: unknown model 'resnet'"):
        _recipes.selected(["lenet300", "lenet5"])
    monkeypatch.delenv(_recipes.MODELS_ENV)
    assert _recipes.selected(["lenet300", "lenet5"]) == ["lenet300", "lenet5"]
