"""Every malformed recipe in tests/recipes_bad/ through the real CLI: exit code 2, one line on stderr, nothing written.

Each corpus file says what it tests in its first comment line, then
``# expect: <text>`` lines that the error line must contain (the dotted key or the
path at fault, and what is allowed) and optionally ``# args: <cli arguments>``.
``{corpus}`` stands for the corpus folder and ``{tmp}`` for the test's scratch folder,
where ``{tmp}/afile`` is a regular file.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from compress import run as run_cli

CORPUS = Path(__file__).parent / "recipes_bad"
RECIPES = sorted(CORPUS.glob("*.toml"))
MARKER = Path("/tmp/compress-malicious-checkpoint-ran")  # what malicious.pt would create if it ran


def prepared(recipe: Path, tmp: Path) -> tuple[Path, list[str], list[str]]:
    """The recipe with its placeholders filled in, its extra arguments and its expected fragments."""
    raw = recipe.read_bytes()
    fill = {b"{corpus}": str(CORPUS).encode(), b"{tmp}": str(tmp).encode()}
    for key, value in fill.items():
        raw = raw.replace(key, value)
    path = tmp / recipe.name
    path.write_bytes(raw)
    header = [line[2:] for line in raw.decode("utf-8", "replace").splitlines() if line.startswith("# ")]
    expects = [h.removeprefix("expect: ") for h in header if h.startswith("expect: ")]
    args = next((h.removeprefix("args: ").split() for h in header if h.startswith("args: ")), [])
    return path, args, expects


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in folder.rglob("*")}


def test_recipes_bad_corpus_is_large_and_every_file_says_what_it_expects():
    assert len(RECIPES) >= 40
    for recipe in RECIPES:
        text = recipe.read_bytes().decode("utf-8", "replace")
        assert text.startswith("# ") and "# expect: " in text, recipe.name


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipes_bad_exit_2_with_one_line_naming_the_fault_and_leave_nothing(recipe, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"  # the current folder: where artifacts/<run> would appear
    work.mkdir()
    (tmp_path / "afile").write_text("not a folder\n")
    path, args, expects = prepared(recipe, tmp_path)
    before = files_under(tmp_path)
    monkeypatch.chdir(work)
    MARKER.unlink(missing_ok=True)
    code = run_cli.main([str(path), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    for fragment in expects:
        assert fragment in lines[0], (fragment, lines[0])
    assert files_under(tmp_path) == before  # no run folder, no log, no half-written file
    assert not MARKER.exists()


@pytest.mark.parametrize("name", ["checkpoint_malicious"])  # one: a process start costs ~5 s of CPU
def test_recipes_bad_in_a_real_process_print_exactly_one_line(name, tmp_path):
    path, args, expects = prepared(CORPUS / f"{name}.toml", tmp_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-m", "compress.run", str(path), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and all(e in done.stderr for e in expects), done.stderr
    assert not (tmp_path / "artifacts").exists()


def test_recipes_bad_missing_recipe_file(tmp_path, capsys):
    assert run_cli.main([str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.toml: no such file" in err
