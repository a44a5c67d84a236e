"""Every recipe under recipes/ on a short run: a few optimizer steps on the first rows of each split, then the
validation metrics. Refactors that must not change arithmetic are checked by running this before and after and
comparing the two JSON files (`--compare`).

    python scripts/recipe_check.py --output before.json              # on the old commit
    python scripts/recipe_check.py --output after.json               # on the new one
    python scripts/recipe_check.py --compare before.json after.json  # a table, and exit 1 if any metric moved

Recipes that start from another run's output (`model.name_or_path: runs/...`) use the short run of the recipe that
writes it. Runs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# a handful of steps on few rows: enough to move every weight, short enough for the whole set in minutes
SHORT = [
    "training.max_steps=6",
    "training.epochs=1",
    "training.eval_every=null",
    "training.save_every=null",
    "training.eval_at_start=false",
    "training.logging_every=2",
    "data.train.max_samples=96",
    "data.validation.max_samples=24",
]
# per recipe: its own extra settings for a short run (a test split, when it has one, is cut as well)
EXTRA = {
    "translation/multi30k_en_de.yaml": ["training.batch_size=16"],
    "language_modeling/gpt_pretrain.yaml": ["training.batch_size=8"],
    "language_modeling/bert_mlm.yaml": ["training.batch_size=8"],
}
# recipes whose model is another recipe's output_dir
NEEDS = {"summarization/scitldr_gpt.yaml": "language_modeling/gpt_pretrain.yaml"}


def run_all(output: Path, only: list[str]) -> dict:
    import yaml

    from hf_finetune.engine import train
    from hf_finetune.recipe import load_recipe

    recipes = sorted(str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").rglob("*.yaml"))
    order = sorted(recipes, key=lambda r: r in NEEDS)  # the runs others start from go first
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        outs: dict[str, str] = {}
        for name in order:
            if only and name not in only and name not in NEEDS.values():
                continue
            path = REPO / "recipes" / name
            raw = yaml.safe_load(path.read_text())
            overrides = SHORT + EXTRA.get(name, [])
            if raw.get("data", {}).get("test"):
                overrides.append("data.test.max_samples=24")
            if name in NEEDS:
                overrides.append(f"model.name_or_path={outs[NEEDS[name]]}")
            out = str(Path(tmp) / name.replace("/", "_").removesuffix(".yaml"))
            outs[name] = out
            start = time.perf_counter()
            done = train(load_recipe(path, [*overrides, f"output_dir={out}"]))
            results[name] = {
                "metrics": done["metrics"],
                "test_metrics": done.get("test_metrics"),
                "seconds": round(time.perf_counter() - start, 1),
            }
            print(f"{name}: {json.dumps(done['metrics'])}", file=sys.stderr, flush=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    return results


def compare(before: Path, after: Path) -> int:
    a, b = json.loads(before.read_text()), json.loads(after.read_text())
    moved = 0
    print("| recipe | metric | before | after | same |")
    print("|---|---|---|---|---|")
    for name in sorted(a.keys() | b.keys()):
        for split in ("metrics", "test_metrics"):
            old, new = (a.get(name) or {}).get(split) or {}, (b.get(name) or {}).get(split) or {}
            for key in sorted(old.keys() | new.keys()):
                x, y = old.get(key), new.get(key)
                same = x is not None and y is not None and math.isclose(x, y, rel_tol=0, abs_tol=0)
                moved += not same
                label = key if split == "metrics" else f"test/{key}"
                print(f"| {name} | {label} | {x} | {y} | {'yes' if same else 'NO'} |")
    print(f"\n{moved} metric(s) moved")
    return 1 if moved else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="write the metrics of every recipe's short run here")
    parser.add_argument("--only", nargs="*", default=[], help="recipes (relative to recipes/) to run")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not args.output:
        parser.error("give --output or --compare")
    run_all(args.output, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
