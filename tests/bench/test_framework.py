import json

import pytest

from compress import bench
from compress.errors import InputError


@pytest.fixture
def toy_benchmark():
    @bench.register("toy")
    def toy(size: bench.Size, out):
        """A toy benchmark."""
        (out / "plot.png").write_bytes(b"png")
        return bench.Result(figures={"n": 3 if size is bench.Size.TINY else 30},
                            tables=[("Toy", bench.table(["a", "b"], [[1, "x"]]))], notes=["a note"], files=["plot.png"])

    yield
    bench.REGISTRY.pop("toy")


def test_run_writes_json_and_markdown_with_machine_stamp(toy_benchmark, tmp_path):
    out, result = bench.run("toy", bench.Size.TINY, tmp_path / "toy", command="python -m compress.bench toy --size tiny")
    record = json.loads((out / "result.json").read_text())
    assert record["figures"] == {"n": 3}
    assert record["size"] == "tiny" and record["files"] == ["plot.png"]
    assert record["machine"]["cores"] >= 1 and record["machine"]["torch"]
    md = (out / "result.md").read_text()
    assert "`python -m compress.bench toy --size tiny`" in md
    assert "| a | b |\n|---|---|\n| 1 | x |" in md and "a note" in md


def test_run_unknown_name_lists_the_known_ones(toy_benchmark, tmp_path):
    with pytest.raises(InputError, match="unknown benchmark 'nope'; known: .*toy"):
        bench.run("nope", bench.Size.TINY, tmp_path)
    assert not any(tmp_path.iterdir())


def test_cli_unknown_name_exits_2_with_one_line(capsys):
    from compress.bench.__main__ import main

    assert main(["nope", "--size", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown benchmark 'nope'" in err[0]
