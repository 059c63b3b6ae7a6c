"""The paper's tables at the tiny size: every figure recomputed from the files the benchmark wrote."""
import json
from pathlib import Path

import pytest
import torch

import compress
from compress import bench, data as data_mod, pipeline, train
from compress.bench import _recipes, paper
from compress.codec import container
from tests.bench.helpers import run_tiny


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    return run_tiny("paper", tmp_path_factory)


def test_paper_figures_for_both_lenets_with_ratios_from_file_sizes(done):
    out, result = done
    assert set(result.figures) == {"lenet300", "lenet5"}
    for name, f in result.figures.items():
        recipe = _recipes.lenet_recipe(name, bench.Size.TINY)
        model = pipeline.build_model(recipe, data_mod.load(recipe.data))
        dense = 4 * sum(p.numel() for p in model.parameters())
        assert f["dense_bytes"] == dense
        assert f["file_bytes_huffman"] == Path(f["file"]).stat().st_size
        assert f["file_bytes_fixed"] == Path(f["fixed_file"]).stat().st_size
        assert f["ratio_huffman"] == pytest.approx(dense / f["file_bytes_huffman"])
        assert f["ratio_fixed"] == pytest.approx(dense / f["file_bytes_fixed"])
        # the fixed-width rewrite is the very file the encode stage sized for its own comparison
        run_report = json.loads((Path(f["run_dir"]) / "report.json").read_text())
        assert f["file_bytes_fixed"] == run_report["stage_figures"]["encode"]["file_bytes_none"]


def test_paper_rows_add_up_to_each_file_exactly(done):
    _, result = done
    for f in result.figures.values():
        for coder in ("fixed", "huffman"):
            parts = sum(r[f"bytes_{coder}"] for r in f["layers"]) + f["raw"]["bytes"] + f["overhead_bytes"][coder]
            assert parts == f[f"file_bytes_{coder}"]
        assert f["weights"]["bytes_huffman"] == sum(r["bytes_huffman"] for r in f["layers"])
        assert f["raw"]["params"] + f["weights"]["weights"] == f["params"]
        for r in f["layers"]:
            assert r["code_bits_fixed"] == r["code_width_fixed"] * r["kept"]  # fixed width: bits x kept weights
            assert r["bytes_huffman"] * 8 >= r["code_bits_huffman"] + r["gap_bits_huffman"]


def test_paper_weights_kept_match_the_masks_and_the_decoded_file(done):
    _, result = done
    for name, f in result.figures.items():
        run_dir = Path(f["run_dir"])
        masks = torch.load(run_dir / "stages" / "01-prune.pt", weights_only=True)["masks"]
        decoded = compress.decode(f["file"])
        recipe = _recipes.lenet_recipe(name, bench.Size.TINY)
        model = pipeline.build_model(recipe, data_mod.load(recipe.data))
        sparsity = {n: c.sparsity for n, c in _recipes.stage(recipe, "prune").config.select(model).items()}
        for r in f["layers"]:
            assert r["kept"] == int(masks[r["name"]].sum()) == int((decoded[r["name"]] != 0).sum())
            assert r["kept_pct"] == pytest.approx(100 * (1 - sparsity[r["name"]]), abs=100 / r["weights"])
            assert r["paper_kept_pct"] == paper.PAPER[name]["kept"][r["name"]]


def test_paper_accuracy_is_that_of_a_fresh_model_loaded_from_each_file(done):
    _, result = done
    f = result.figures["lenet5"]
    recipe = _recipes.lenet_recipe("lenet5", bench.Size.TINY)
    datasets = data_mod.load(recipe.data)
    for path, key in ((f["file"], "accuracy_huffman"), (f["fixed_file"], "accuracy_fixed")):
        model = compress.load(path, pipeline.build_model(recipe, datasets))
        assert train.evaluate(model, datasets, device=torch.device("cpu")) == pytest.approx(f[key])
    assert f["accuracy_loss"] == pytest.approx(f["baseline_accuracy"] - f["accuracy_huffman"])


def test_paper_markdown_sets_the_paper_beside_ours(done):
    out, result = done
    md = (out / "result.md").read_text()
    assert "Table 2 layout" in md and "Table 3 layout" in md
    assert "1,070 KB → 27 KB, 40×" in md and "1,720 KB → 44 KB, 39×" in md
    f = result.figures["lenet300"]
    assert f"**{f['ratio_huffman']:.1f}×**" in md and "weights only" in md


def test_paper_fixed_rewrite_keeps_records_and_raw_tensors(done, tmp_path):
    _, result = done
    f = result.figures["lenet300"]
    src, dst = container.Reader(f["file"]), container.Reader(f["fixed_file"])
    assert src.names == dst.names and src.metadata == dst.metadata
    for name in src.names:
        if src.info(name).encoding == "raw":
            assert dst.info(name).dtype == src.info(name).dtype
        else:
            a, b = src.record(name), dst.record(name)
            assert (a.positions == b.positions).all() and (a.codes == b.codes).all()
            assert dst.info(name).code_coder == "none" and src.info(name).code_coder == "huffman"
