#!/usr/bin/env bash
# Run a recipe, then variants of its later stages that reuse its pretraining and pruning checkpoints.
#   benchmarks/variants.sh RECIPE OUTDIR [NAME "--set k=v ..."]...
# Each variant's run folder is OUTDIR/NAME; the base run is OUTDIR/base. A variant is the same as
# `python -m compress.run RECIPE --set k=v ...` from scratch: --resume only skips stages whose
# recipe (and everything before them) is unchanged.
set -euo pipefail
recipe=$1 out=$2
shift 2
python -m compress.run "$recipe" --out "$out/base"
while [ $# -ge 2 ]; do
    name=$1 sets=$2
    shift 2
    mkdir -p "$out/$name/stages"
    cp "$out/base/pretrain.pt" "$out/$name/"
    cp "$out/base/stages/01-prune.pt" "$out/$name/stages/" 2>/dev/null || true
    # shellcheck disable=SC2086
    python -m compress.run "$recipe" --out "$out/$name" --resume $sets
done
for d in "$out"/*/; do
    python - "$d" <<'PY'
import json, sys
r = json.load(open(sys.argv[1] + "report.json"))
print(f"{sys.argv[1]:<40} ratio {r['ratio']:6.1f}x  baseline {r['baseline_accuracy']:.2f}  "
      f"decoded {r['final_accuracy']:.2f}  loss {r['accuracy_loss']:+.2f}  bytes {r['file_bytes']}")
PY
done
