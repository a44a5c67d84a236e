"""Train one recipe with several methods in turn and print a markdown table of dev accuracy, wall time and size.

    python scripts/sst2_methods.py --methods full,lora,adalora,prefix --output-root runs/sst2-full-data
    python scripts/sst2_methods.py --methods full,lora data.train.max_samples=4000

Each run is the plain `hf-finetune train` command, in its own process (so peak memory is per method); a run whose
results.json exists is reused. `hf-finetune compare` does the same (and more) inside the package.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/classification/sst2.yaml")
    parser.add_argument("--methods", default="full,lora,adalora,prefix")
    parser.add_argument("--output-root", default="runs/sst2-methods")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    rows = []
    for method in args.methods.split(","):
        out = Path(args.output_root) / method
        command = [sys.executable, "-m", "hf_finetune", "train", args.recipe, f"method.name={method}",
                   *args.overrides, f"output_dir={out}", "--overwrite"]  # fmt: skip
        # --overwrite: only reached without results.json, i.e. for a run that never finished
        if not (out / "results.json").exists():
            print("$", " ".join(command[1:]), file=sys.stderr, flush=True)
            subprocess.run(command, check=True)
        rows.append(json.loads((out / "results.json").read_text()))
    print(
        "| method | dev accuracy | dev F1 (macro) | trainable params | train time (s) | samples/s | peak RSS (MB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = r["metrics"]
        print(
            f"| {r['method']} | {m['accuracy']:.4f} | {m['f1_macro']:.4f} | {r['trainable_params']:,} "
            f"({100 * r['trainable_params'] / r['total_params']:.2f}%) | {r['train_runtime_s']:.0f} "
            f"| {r['train_samples_per_s']:.1f} | {r['peak_memory_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
