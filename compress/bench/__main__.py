"""python -m compress.bench NAME [--size tiny|full] [--out DIR] | --list"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from compress import bench, cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.bench", description="Run a benchmark.")
    p.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    p.add_argument("--size", choices=[s.value for s in bench.Size], default=bench.Size.FULL.value,
                   help="tiny: seconds, proves it works; full: the published figures (default)")
    p.add_argument("--out", type=Path, help="output folder (default: artifacts/bench/NAME)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (_, doc) in sorted(bench.discover().items()):
            print(f"{name:<16} {doc}")
        return 0
    if not args.name:
        p.error("name a benchmark (--list shows them)")
    command = "python -m compress.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))

    def go() -> int:
        out, result = bench.run(args.name, bench.Size(args.size), args.out, command)
        print(f"done: {out}/result.md")
        return 0

    return cli.guarded(go)


if __name__ == "__main__":
    sys.exit(main())
