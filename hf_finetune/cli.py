"""`hf-finetune train | eval | predict | merge`: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hf_finetune.errors import InputError

EPILOG = """tasks: classification, question_answering
methods: full, lora, adalora, prefix, prompt, ia3, dora

examples:
  hf-finetune train recipes/classification/sst2.yaml method.name=lora training.epochs=1 output_dir=runs/sst2
  hf-finetune eval recipes/classification/sst2.yaml checkpoint=runs/sst2
  hf-finetune predict recipes/classification/sst2.yaml checkpoint=runs/sst2 --input in.jsonl --output out.jsonl
  hf-finetune merge runs/sst2 --output runs/sst2-merged
  hf-finetune compare recipes/classification/sst2.yaml --methods full,lora,adalora,prefix --seeds 1,2,3 \
      data.train.max_samples=4000 output_dir=runs/sst2-compare
  hf-finetune train recipes/question_answering/squad.yaml method.name=full output_dir=runs/squad

exit codes: 0 done, 2 bad input (one line on stderr naming the file, key or row), 1 anything else"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-finetune",
        description="Fine-tune Hugging Face checkpoints with full fine-tuning or PEFT methods on one Accelerate loop.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    overrides = {"nargs": "*", "default": [], "help": "dotted key=value overrides, e.g. training.lr=3e-4"}

    train = sub.add_parser("train", help="train a recipe and write output_dir/results.json")
    train.add_argument("recipe")
    train.add_argument("overrides", **overrides)
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in output_dir (refused otherwise, unless training.resume is set)",
    )

    evaluate = sub.add_parser(
        "eval", help="evaluate a checkpoint on the recipe's validation (and test) split"
    )
    evaluate.add_argument("recipe")
    evaluate.add_argument("overrides", **overrides, metavar="checkpoint=DIR [key=value]")

    predict = sub.add_parser("predict", help="predict JSONL rows with a checkpoint")
    predict.add_argument("recipe")
    predict.add_argument("overrides", **overrides, metavar="checkpoint=DIR [key=value]")
    predict.add_argument(
        "--input", required=True, help="JSONL, one object per row with the recipe's text column(s)"
    )
    predict.add_argument("--output", required=True, help="JSONL written with one prediction per input row")

    compare = sub.add_parser(
        "compare", help="train the recipe once per method x seed and write comparison.{json,csv,md} and plots"
    )
    compare.add_argument("recipe")
    compare.add_argument("overrides", **overrides)
    compare.add_argument("--methods", help="comma-separated, e.g. full,lora,adalora,prefix (default: the recipe's "
                         "compare.methods, else full,lora,adalora,prefix)")  # fmt: skip
    compare.add_argument(
        "--seeds", help="comma-separated seeds, e.g. 1,2,3 (default: compare.seeds or training.seed)"
    )
    compare.add_argument(
        "--set", action="append", default=[], metavar="METHOD.key=value",
        help="override for one method only, e.g. --set lora.training.lr=3e-4 (repeatable)",
    )  # fmt: skip
    compare.add_argument(
        "--budget-matched", action="store_true",
        help="LoRA and AdaLoRA train the same number of parameters (AdaLoRA init_r = LoRA r, target_r = 2r/3)",
    )  # fmt: skip
    compare.add_argument("--dry-run", action="store_true", help="print the plan without training")

    merge = sub.add_parser("merge", help="fold a LoRA-family adapter into a plain HF model folder")
    merge.add_argument("checkpoint", help="a run's output_dir or its model/ folder")
    merge.add_argument("--output", required=True)
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """argparse stops filling a `nargs="*"` positional at the first option, so `compare RECIPE --methods a,b k=v`
    would reject `k=v`; overrides may come before, between or after options."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # so the message gets a line of its own instead of trailing a progress bar
        print(f"hf-finetune: error: {err}", file=sys.stderr)
        return 2


def _split_checkpoint(overrides: list[str]) -> tuple[str, list[str]]:
    found = [o.partition("=")[2] for o in overrides if o.startswith("checkpoint=")]
    if not found or not found[0]:
        raise InputError("checkpoint=DIR is required (a run's output_dir or its model/ folder)")
    return found[0], [o for o in overrides if not o.startswith("checkpoint=")]


def cmd_train(args: argparse.Namespace) -> int:
    from hf_finetune.engine import train
    from hf_finetune.recipe import load_recipe

    results = train(load_recipe(args.recipe, args.overrides), overwrite=args.overwrite)
    if results.get("world_size", 1) == 1 or os.environ.get("RANK", "0") == "0":
        print(json.dumps({"output_dir": results["recipe"]["output_dir"], **results["metrics"]}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from hf_finetune.evaluation import evaluate_checkpoint
    from hf_finetune.recipe import load_recipe

    checkpoint, overrides = _split_checkpoint(args.overrides)
    print(json.dumps(evaluate_checkpoint(load_recipe(args.recipe, overrides), checkpoint)))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hf_finetune.checkpoint import load_final
    from hf_finetune.recipe import load_recipe

    checkpoint, overrides = _split_checkpoint(args.overrides)
    rows = read_jsonl(Path(args.input))
    task, model, tokenizer, _ = load_final(checkpoint, load_recipe(args.recipe, overrides))
    predictions = task.predict(model, tokenizer, rows)
    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.tmp")
    with tmp.open("w") as f:
        for row, pred in zip(rows, predictions, strict=True):
            f.write(json.dumps({**row, **pred}) + "\n")
    tmp.replace(out)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hf_finetune.compare import compare

    def split(text: str | None, kind: type) -> list | None:
        if not text:
            return None
        try:
            return [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError as err:
            raise InputError(f"--seeds {text!r}: expected comma-separated integers") from err

    done = compare(
        args.recipe,
        methods=split(args.methods, str),
        seeds=split(args.seeds, int),
        overrides=args.overrides,
        per_method=args.set,
        budget_matched=args.budget_matched,
        dry=args.dry_run,
    )
    if args.dry_run:
        return 0
    print(done["paths"]["md"].read_text())
    failed = [f"{r.method} seed {r.seed}" for r in done["runs"] if r.status == "failed"]
    if failed:
        print(f"hf-finetune: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_merge(args: argparse.Namespace) -> int:
    from hf_finetune.checkpoint import load_final
    from hf_finetune.merging import merge_checkpoint

    merge_checkpoint(load_final(args.checkpoint), Path(args.output))
    return 0


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputError(f"{path}: input file not found")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise InputError(f"{path} line {number}: not valid JSON ({err.msg})") from err
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number}: expected a JSON object")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows")
    return rows


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "compare": cmd_compare,
    "merge": cmd_merge,
}
