"""The trade-off sweep at the tiny size: points are files, ratios their sizes, the best point the table's."""
import math

import pytest
import torch

from compress import bench, modelfile
from compress.bench import tradeoff
from compress.codec import container
from tests.bench.helpers import run_tiny
from compress.models import MLP


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    return run_tiny("tradeoff", tmp_path_factory)


def test_tradeoff_every_point_is_a_file_whose_size_gives_its_ratio(done):
    out, result = done
    for name, f in result.figures.items():
        assert f["points"]
        for p in f["points"]:
            path = out / name / p["file"]
            assert p["file_bytes"] == path.stat().st_size
            assert p["ratio"] == pytest.approx(f["dense_bytes"] / p["file_bytes"])
            assert p["loss"] == pytest.approx(f["baseline_accuracy"] - p["accuracy"])


def test_tradeoff_sweep_covers_every_family_step_and_bit_width(done):
    _, result = done
    sweep = tradeoff.SWEEPS[bench.Size.TINY]
    for f in result.figures.values():
        steps = f["rounds"] + sweep.beyond
        families = [p["family"] for p in f["points"]]
        assert families.count(tradeoff.QUANTIZATION) == 2 * len(sweep.quant_bits)
        assert families.count(tradeoff.PRUNING) == steps
        shared_steps = [s for s in range(1, steps + 1) if s >= math.ceil(sweep.share_from * f["rounds"])]
        assert families.count(tradeoff.BOTH) == 2 * len(shared_steps) * len(sweep.bits)
        pruned = sorted((p for p in f["points"] if p["family"] == tradeoff.PRUNING), key=lambda p: p["step"])
        kept = [p["kept_pct"] for p in pruned]
        assert kept == sorted(kept, reverse=True) and kept[-1] < kept[0]
        assert [p["prune_epochs"] for p in pruned] == [s * sweep.prune_epochs for s in range(1, steps + 1)]
        by_step = {p["step"]: p["kept_pct"] for p in pruned}
        for p in f["points"]:
            if p["family"] == tradeoff.BOTH:
                assert p["kept_pct"] == by_step[p["step"]]
            if p["family"] == tradeoff.QUANTIZATION:
                assert p["kept_pct"] == 100.0


def test_tradeoff_fixed_and_huffman_files_of_a_point_decode_alike(done):
    out, result = done
    f = result.figures["lenet300"]
    pairs = {}
    for p in f["points"]:
        if p["bits"]:
            pairs.setdefault((p["family"], p["step"], p["bits"]), {})[p["coder"]] = p
    for pair in pairs.values():
        fixed, huff = pair["fixed width"], pair["Huffman"]
        assert fixed["accuracy"] == huff["accuracy"]
        a = modelfile.decode(out / "lenet300" / fixed["file"])
        b = modelfile.decode(out / "lenet300" / huff["file"])
        assert not modelfile.differing(a, b, list(a))
        for name, w in a.items():
            if name.endswith("weight"):
                assert torch.unique(w[w != 0]).numel() <= 2 ** fixed["bits"]


def test_tradeoff_best_within_budget_is_the_highest_ratio_in_the_table(done):
    out, result = done
    md = (out / "result.md").read_text()
    for f in result.figures.values():
        for budget in tradeoff.BUDGETS:
            best = f["best"][str(budget)]
            fit = [p for p in f["points"] if p["loss"] <= budget]
            if not fit:
                assert best is None
                continue
            assert best["ratio"] == max(p["ratio"] for p in fit) and best["loss"] <= budget
            assert f"**{best['ratio']:.1f}×** (loss {best['loss']:.2f}" in md
    assert (out / "tradeoff.png").stat().st_size > 10_000


def test_tradeoff_rerun_reuses_every_point_and_file(done, tmp_path):
    out, result = done
    before = {p: p.stat().st_mtime_ns for p in (out / "lenet300" / "files").iterdir()}
    again = tradeoff.run_sweep("lenet300", bench.Size.TINY, tradeoff.SWEEPS[bench.Size.TINY], out / "lenet300")
    assert again["points"] == result.figures["lenet300"]["points"]
    assert again["baseline_cached"]
    assert {p: p.stat().st_mtime_ns for p in (out / "lenet300" / "files").iterdir()} == before


def test_write_pruned_round_trips_exactly_and_stores_float32_values(tmp_path):
    torch.manual_seed(0)
    model = MLP((1, 4, 4), 3, hidden=(8,))
    state = model.state_dict()
    masks = {"fc1.weight": state["fc1.weight"].abs() > 0.1, "fc2.weight": torch.zeros(3, 8, dtype=torch.bool)}
    masks["fc2.weight"][1, 2] = True
    for name, m in masks.items():
        state[name] = torch.where(m, state[name], torch.zeros(()))
    i, j = masks["fc1.weight"].nonzero()[0].tolist()
    state["fc1.weight"][i, j] = -0.0  # a kept weight that happens to be -0.0 comes back as -0.0
    path = tmp_path / "p.dcz"
    size = tradeoff.write_pruned(path, state, masks)
    assert size == path.stat().st_size
    decoded = tradeoff.read_pruned(path)
    assert set(decoded) == set(state)
    assert not modelfile.differing(state, decoded, list(state))
    reader = container.Reader(path)
    kept = int(masks["fc1.weight"].sum())
    assert reader.info("fc1.weight.kept_values").shape == (kept,)
    assert reader.info("fc1.weight.kept_values").dtype == "float32"
    assert reader.record("fc2.weight").positions.tolist() == [1 * 8 + 2]


def test_best_within_and_frontier_by_hand():
    pts = [{"ratio": 10.0, "loss": 0.1}, {"ratio": 20.0, "loss": 0.5}, {"ratio": 30.0, "loss": 0.6},
           {"ratio": 15.0, "loss": 0.7}, {"ratio": 25.0, "loss": -0.2}]
    assert tradeoff.best_within(pts, 0.5) == {"ratio": 25.0, "loss": -0.2}
    assert tradeoff.best_within(pts, 0.0) == {"ratio": 25.0, "loss": -0.2}
    assert tradeoff.best_within(pts, -1.0) is None
    assert tradeoff.frontier(pts) == [{"ratio": 25.0, "loss": -0.2}, {"ratio": 30.0, "loss": 0.6}]
