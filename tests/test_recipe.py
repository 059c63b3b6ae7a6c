from pathlib import Path

import pytest

from compress import recipe
from compress.errors import RecipeError

BASE = """
[run]
name = "t"
[data]
name = "digits"
[model]
name = "mlp"
[stages.prune]
sparsity = 0.5
[stages.quantize]
method = "kmeans"
bits = 4
[stages.encode]
"""


def write(tmp_path, text):
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


def test_recipe_loads_typed_configs_in_listed_order(tmp_path):
    r = recipe.load(write(tmp_path, BASE))
    assert [s.name for s in r.stages] == ["prune", "quantize", "encode"]
    assert r.stages[1].spec.method == "kmeans" and r.stages[1].config.bits == 4
    assert r.data.name.value == "digits" and r.run.seed == 0


@pytest.mark.parametrize("edit, key, allowed", [
    ("[stages.prune]\nsparsity = 0.5\nsparsty = 1", "stages.prune.sparsty", "allowed: "),
    ("[stages.prune]\nsparsity = 1.5", "stages.prune.sparsity", "[0, 1)"),
    ("[stages.prune]\nsparsity = \"high\"", "stages.prune.sparsity", "expected"),
    ("[stages.shrink]\nx = 1", "stages.shrink", "allowed: prune"),
    ("[stages.quantize]\nmethod = \"magic\"", "stages.quantize.method", "allowed: kmeans"),
    ("[stages.quantize]\nmethod = \"kmeans\"\ninit = \"best\"", "stages.quantize.init", "'linear'"),
    ("[stages.quantize]\nmethod = \"kmeans\"\nbits = 40", "stages.quantize.bits", "[1, 16]"),
    ("[stages.encode]\n[stages.prune]\nsparsity = 0.5", "stages.prune", "before"),
    ("[stages.prune]\nsparsity = 0.5\nretrain = { epochs = -1 }", "stages.prune.retrain.epochs", ">= 0"),
    ("[stages.prune]\nsparsity = 0.5\nlayers = { \"fc*\" = { rounds = 2 } }", 'stages.prune.layers."fc*".rounds',
     "cannot be set per tensor"),
    ("[bogus]\nx = 1", "bogus", "allowed: run"),
])
def test_recipe_errors_name_the_dotted_key(tmp_path, edit, key, allowed):
    text = "[run]\nname = \"t\"\n[data]\nname = \"digits\"\n[model]\nname = \"mlp\"\n" + edit
    with pytest.raises(RecipeError) as e:
        recipe.load(write(tmp_path, text))
    assert e.value.key == key and allowed in e.value.message and "\n" not in str(e.value)


def test_recipe_syntax_error_and_missing_file_are_one_line(tmp_path):
    with pytest.raises(RecipeError, match="not valid TOML"):
        recipe.load(write(tmp_path, "[run\nname="))
    with pytest.raises(RecipeError, match="no such file"):
        recipe.load(tmp_path / "absent.toml")


def test_set_overrides_by_dotted_path_and_parses_values(tmp_path):
    r = recipe.load(write(tmp_path, BASE), ["stages.prune.sparsity=0.8", "run.name=other",
                                            "stages.encode.gap_bits=auto"])
    assert r.stages[0].config.sparsity == 0.8 and r.run.name == "other"
    assert r.stages[2].config.gap_bits == "auto"
    assert r.source["stages"]["prune"]["sparsity"] == 0.8
    with pytest.raises(RecipeError, match="stages.prune.sparsity"):
        recipe.load(write(tmp_path, BASE), ["stages.prune.sparsity=2"])


def test_to_toml_round_trips_the_resolved_recipe(tmp_path):
    import tomllib

    r = recipe.load(write(tmp_path, BASE + "gap_bits = 7\n[stages.prune.layers.\"fc1.weight\"]\nsparsity = 0.2\n"))
    assert tomllib.loads(recipe.to_toml(r.source)) == r.source


def test_data_free_recipe_rejects_stages_that_need_data(tmp_path):
    text = "[model]\nname = \"mlp\"\n[stages.sensitivity]\n"
    with pytest.raises(RecipeError, match="needs a dataset"):
        recipe.load(write(tmp_path, text))


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_recipe_validates(path):
    r = recipe.load(path)
    assert r.stages and r.run.name == path.stem  # the run folder is named after the recipe
