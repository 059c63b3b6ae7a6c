"""Compare two run folders of the same recipe, e.g. one process against torchrun with N.

    python benchmarks/compare_runs.py artifacts/quick-1 artifacts/quick-2

Prints, per compressed tensor, whether the masks (from the prune checkpoint) and the codes
and positions (decoded from each model.dcz) are identical, the largest centroid difference,
then both runs' decoded-file accuracy and file size (from report.json).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from compress.codec import container
from compress.record import Codebook


def masks(run: Path) -> dict[str, torch.Tensor]:
    """The masks of the run's prune stage checkpoint (empty without one)."""
    found = sorted((run / "stages").glob("*-prune.pt"))
    return torch.load(found[0], map_location="cpu", weights_only=True)["masks"] if found else {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    ma, mb = masks(args.a), masks(args.b)
    ra, rb = container.Reader(args.a / "model.dcz"), container.Reader(args.b / "model.dcz")
    print("| tensor | masks identical | positions and codes identical | max centroid difference |")
    print("|---|---|---|---|")
    for name in ra.names:
        if ra.info(name).encoding == "raw":
            continue
        a, b = ra.record(name), rb.record(name)
        same_mask = "–" if name not in ma else ("yes" if torch.equal(ma[name], mb[name]) else "NO")
        same_codes = np.array_equal(a.positions, b.positions) and np.array_equal(a.codes, b.codes)
        values_a, values_b = (r.table.values if isinstance(r.table, Codebook) else r.table.scale for r in (a, b))
        diff = float(np.abs(values_a - values_b).max()) if values_a.shape == values_b.shape else float("nan")
        print(f"| `{name}` | {same_mask} | {'yes' if same_codes else 'NO'} | {diff:.3g} |")
    for run in (args.a, args.b):
        r = json.loads((run / "report.json").read_text())
        print(f"{run}: decoded-file accuracy {r['final_accuracy']:.2f} %, {r['file_bytes']:,} bytes, "
              f"{json.loads((run / 'versions.json').read_text()).get('processes', 1)} process(es)")


if __name__ == "__main__":
    main()
