"""python -m compress.decode MODEL.dcz -o WEIGHTS.pt

Decodes a model file into a plain state_dict, loadable with ``torch.load(..., weights_only=True)``.
Exit codes: 0 success, 2 damaged or unreadable file (one line on stderr), 1 runtime failure.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from compress import cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress.decode", description="Decode a .dcz model file.")
    p.add_argument("file", type=Path, help="the .dcz model file")
    p.add_argument("-o", "--output", type=Path, required=True, help="where to write the state_dict (.pt)")
    p.add_argument("--allow-elements", type=int, default=0, metavar="N",
                   help="decode a file of nearly empty giant tensors adding up to N elements, past the reader's "
                        "default bound of max(2**24, 4096 x file bytes)")
    args = p.parse_args(argv)
    return cli.guarded(lambda: cli.decode_file(args.file, args.output, args.allow_elements))


if __name__ == "__main__":
    sys.exit(main())
