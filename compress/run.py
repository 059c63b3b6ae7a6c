"""python -m compress.run RECIPE.toml [--out DIR] [--check] [--resume] [--set key.path=value ...]

Exit codes: 0 success, 2 recipe or input error (one line on stderr), 1 runtime failure (a full disk: the
previous artifacts stay intact), 130 interrupted by Ctrl-C, 143 by SIGTERM. One run at a time per run folder.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress import cli


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m compress.run", description="Run a compression recipe.")
    p.add_argument("recipe", nargs="?", default=None,
                   help="recipe TOML (default: the embedded quick-start on scikit-learn's digits)")
    p.add_argument("--out", type=Path, help="run folder (default: artifacts/<run.name>)")
    p.add_argument("--check", action="store_true", help="validate the recipe and print the plan; train nothing")
    p.add_argument("--resume", action="store_true", help="skip stages whose checkpoint matches the recipe")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a recipe key (repeatable), recorded in the run folder's recipe.toml")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return cli.guarded(lambda: cli.run_recipe(args.recipe, args.out, args.check, args.resume, args.overrides),
                       interrupted="interrupted: finished stages are kept; run again with --resume to continue")


if __name__ == "__main__":
    sys.exit(main())
