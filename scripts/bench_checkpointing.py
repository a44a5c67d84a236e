"""Gradient checkpointing on and off: peak memory and time per optimizer step, for extractive QA at 384 tokens and
the GPT pretraining recipe, each side measured in the same invocation.

    python scripts/bench_checkpointing.py                    # both recipes, 20 steps, off/on alternating, 2 repeats
    python scripts/bench_checkpointing.py --recipes qa --steps 40 --repeats 1 --set training.batch_size=32

Each run is a fresh subprocess of `hf-finetune train` (peak memory is the run's own: resident set on a CPU, CUDA's
max allocated on a GPU), with validation cut to a few rows so that the figure is training's. The runs alternate
off, on, on, off, ... so that drift of the machine hits both. Reported: the median over repeats and on/off ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from benchlib import last_loss, train_results

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "qa": (REPO / "recipes" / "question_answering" / "squad.yaml", ["training.max_length=384", "data.train.max_samples=2000"]),
    "lm": (REPO / "recipes" / "language_modeling" / "gpt_pretrain.yaml", ["training.eval_at_start=false"]),
}


def run(recipe: Path, overrides: list[str], out: Path) -> dict:
    results = train_results(recipe, out, overrides)
    return {
        "peak_memory_mb": results["peak_memory_mb"],
        "s_per_step": results["train_runtime_s"] / results["steps"],
        "loss": last_loss(out),
        "device": results["versions"].get("device"),
        "precision": "fp32" if results["precision"] == "no" else results["precision"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="qa,lm", help="comma-separated, of qa, lm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], help="extra key=value override for both sides")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    rows, everything = [], []
    with tempfile.TemporaryDirectory(prefix="bench_ckpt_") as tmp:
        for name in args.recipes.split(","):
            recipe, extra = RECIPES[name]
            common = [*extra, f"training.max_steps={args.steps}", "training.eval_every=null",
                      "data.validation.max_samples=8", "training.logging_every=5", *args.set]  # fmt: skip
            figures: dict[bool, list[dict]] = {False: [], True: []}
            for i in range(args.repeats):
                for on in (False, True) if i % 2 == 0 else (True, False):
                    print(f"bench_checkpointing: {name} checkpointing={'on' if on else 'off'} #{i}", file=sys.stderr)
                    result = run(recipe, [*common, f"training.gradient_checkpointing={str(on).lower()}"],
                                 Path(tmp) / f"{name}-{on}-{i}")  # fmt: skip
                    figures[on].append(result)
                    everything.append({"recipe": name, "checkpointing": on, **result})
            med = {on: {k: statistics.median(r[k] for r in rs) for k in ("peak_memory_mb", "s_per_step")}
                   for on, rs in figures.items()}  # fmt: skip
            rows.append((name, med, figures[True][0]))
    print("| recipe | device, precision | peak memory off -> on (MB) | ratio | s/step off -> on | ratio |")
    print("|---|---|---|---|---|---|")
    for name, med, sample in rows:
        off, on = med[False], med[True]
        print(f"| {name} | {sample['device']}, {sample['precision']} | {off['peak_memory_mb']:.0f} -> "
              f"{on['peak_memory_mb']:.0f} | {on['peak_memory_mb'] / off['peak_memory_mb']:.2f} | "
              f"{off['s_per_step']:.2f} -> {on['s_per_step']:.2f} | {on['s_per_step'] / off['s_per_step']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(everything, indent=2))


if __name__ == "__main__":
    main()
