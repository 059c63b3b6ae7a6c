"""Markdown table of nearest rounding vs AdaRound from run folders' report.json files.

    python benchmarks/adaround_table.py BITS:NEAREST_RUN:ADAROUND_RUN ...

Each run folder comes from `python -m compress.run recipes/lenet5_{nearest,adaround}_fashion.toml
--set stages.quantize.bits=BITS --out RUN`. Prints accuracy and, per layer, the reconstruction MSE
of both roundings on the calibration set (the AdaRound stage measures both on the same grid).
"""
import json
import sys


def main() -> None:
    print("| bits | nearest % | AdaRound % | layer | MSE nearest | MSE AdaRound | flipped | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for spec in sys.argv[1:]:
        bits, near, ada = spec.split(":")
        n = json.load(open(f"{near}/report.json"))
        a = json.load(open(f"{ada}/report.json"))
        for i, (layer, f) in enumerate(a["stage_figures"]["quantize"]["layers"].items()):
            head = f"| {bits} | {n['final_accuracy']:.2f} | {a['final_accuracy']:.2f} |" if i == 0 else "| | | |"
            print(f"{head} {layer} | {f['mse_nearest']:.5f} | {f['mse_adaround']:.5f} | "
                  f"{100 * f['flipped']:.1f} % | {f['seconds']:.1f} |")


if __name__ == "__main__":
    main()
