"""`hf-finetune train | eval | predict | compare | merge | average | generate | chat | make-tiny`: argument parsing only; the work lives in the modules it calls."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hf_finetune.errors import DiskFull, InputError, Stopped

EPILOG = """examples:
  hf-finetune train recipes/classification/sst2.yaml method.name={default} training.epochs=1 output_dir=runs/sst2
  hf-finetune eval recipes/classification/sst2.yaml checkpoint=runs/sst2
  hf-finetune predict recipes/classification/sst2.yaml checkpoint=runs/sst2 --input in.jsonl --output out.jsonl
  hf-finetune merge runs/sst2 --output runs/sst2-merged
  hf-finetune average runs/multi30k --last 5 --output runs/multi30k-avg5
  hf-finetune compare recipes/classification/sst2.yaml --methods {compared} --seeds 1,2,3 \
      data.train.max_samples=4000 output_dir=runs/sst2-compare
  hf-finetune train recipes/question_answering/squad.yaml output_dir=runs/squad
  hf-finetune train recipes/language_modeling/gpt_pretrain.yaml output_dir=runs/gpt
  hf-finetune generate runs/gpt --prompt "It was" --max-new-tokens 40 --temperature 0.8 --top-p 0.95
  hf-finetune train recipes/chat/gsm8k.yaml output_dir=runs/gsm8k
  hf-finetune chat runs/gsm8k --system "Solve step by step."
  hf-finetune make-tiny --arch gpt2 --output tiny-gpt2
  hf-finetune train recipes/translation/multi30k_en_de.yaml output_dir=runs/multi30k

exit codes: 0 done, 2 bad input (one line on stderr naming the file, key or row), 1 anything else"""


def epilog() -> str:
    """The help's closing text: the tasks and methods from their registries, then examples and exit codes."""
    from hf_finetune.methods.registry import COMPARED_BY_DEFAULT, DEFAULT_METHOD, METHOD_NAMES
    from hf_finetune.tasks import TASK_NAMES

    examples = EPILOG.format(default=DEFAULT_METHOD, compared=",".join(COMPARED_BY_DEFAULT))
    return f"tasks: {', '.join(TASK_NAMES)}\nmethods: {', '.join(METHOD_NAMES)}\n\n{examples}"


def build_parser() -> argparse.ArgumentParser:
    from hf_finetune.methods.registry import COMPARED_BY_DEFAULT, DEFAULT_METHOD
    from hf_finetune.recipe import DEFAULT_FORGETTING_CORPUS

    parser = argparse.ArgumentParser(
        prog="hf-finetune",
        description="Fine-tune Hugging Face checkpoints with full fine-tuning or PEFT methods on one Accelerate loop.",
        epilog=epilog(),
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
    evaluate.add_argument(
        "--predictions", metavar="DIR", help="also write each example's prediction to DIR/<split>.jsonl"
    )

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
    compare.add_argument("--methods", help="comma-separated method names (default: the recipe's compare.methods, "
                         f"else {','.join(COMPARED_BY_DEFAULT)})")  # fmt: skip
    compare.add_argument(
        "--seeds", help="comma-separated seeds, e.g. 1,2,3 (default: compare.seeds or training.seed)"
    )
    compare.add_argument(
        "--set", action="append", default=[], metavar="METHOD.key=value",
        help=f"override for one method only, e.g. --set {DEFAULT_METHOD}.training.lr=3e-4 (repeatable)",
    )  # fmt: skip
    compare.add_argument(
        "--budget-matched", action="store_true",
        help="LoRA and AdaLoRA train the same number of parameters (AdaLoRA init_r = LoRA r, target_r = 2r/3)",
    )  # fmt: skip
    compare.add_argument(
        "--lr-search", action="store_true",
        help="choose each method's lr on validation first: short trials of 0.1x-10x its own (compare.lr_search: sets "
        "the grid, budget and rungs)",
    )  # fmt: skip
    compare.add_argument(
        "--forgetting", action="store_true",
        help=f"measure each run's LM-loss increase on general text ({DEFAULT_FORGETTING_CORPUS} in ../shared/data)",
    )  # fmt: skip
    compare.add_argument(
        "--forgetting-corpus", metavar="FILE",
        help="the text file --forgetting scores (implies --forgetting)",
    )  # fmt: skip
    compare.add_argument(
        "--compute-matched", metavar="time=SECONDS|tokens=N",
        help="the same compute for every method: each trains the steps a short probe says the budget buys",
    )  # fmt: skip
    compare.add_argument("--dry-run", action="store_true", help="print the plan without training")

    generate = sub.add_parser(
        "generate", help="continue prompts with a causal LM (a run's output_dir, its model/ folder, or any HF folder)"
    )
    generate.add_argument("checkpoint")
    source = generate.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the continuation is printed")
    source.add_argument("--input", help="JSONL with a 'prompt' field per row (batch mode; needs --output)")
    generate.add_argument("--output", help="JSONL written with a 'generated' field added to each input row")
    generate.add_argument("--max-new-tokens", type=int, default=50)
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy (or beam) search; >0: sampling")
    generate.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                          help="autocast dtype, as training.precision (on a GPU when there is one)")  # fmt: skip
    generate.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")
    generate.add_argument("--batch-size", type=int, default=16)

    chat = sub.add_parser(
        "chat", help="talk to a chat run (or any HF folder with a chat template), or answer JSONL conversations"
    )
    chat.add_argument("checkpoint")
    chat.add_argument("--system", help="system prompt at the start of every conversation")
    chat.add_argument("--input", help="JSONL of conversations ('messages' ending with the user, or 'prompt'); "
                      "batch mode, needs --output")  # fmt: skip
    chat.add_argument("--output", help="JSONL written with a 'response' field added to each input row")
    chat.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's chat.max_new_tokens")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy; >0: sampling")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    chat.add_argument("--precision", choices=("fp32", "bf16", "fp16", "auto"), default="fp32",
                      help="autocast dtype, as training.precision (on a GPU when there is one)")  # fmt: skip
    chat.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text")

    tiny = sub.add_parser("make-tiny", help="write a tiny random-init model and a tokenizer trained on local text")
    tiny.add_argument("--arch", required=True, choices=("bert", "gpt2", "llama", "roberta", "t5", "bart", "marian"))
    tiny.add_argument("--output", required=True)
    tiny.add_argument("--corpus", nargs="*", default=[], help="text files for the tokenizer (default: a built-in text)")
    tiny.add_argument("--vocab-size", type=int, default=1000)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--d-model", type=int, default=64)
    tiny.add_argument("--heads", type=int, default=4)
    tiny.add_argument("--ffn", type=int, default=None)
    tiny.add_argument("--max-positions", type=int, default=128)
    tiny.add_argument("--seed", type=int, default=0)

    merge = sub.add_parser("merge", help="fold a trained adapter into a plain HF model folder (mergeable methods)")
    merge.add_argument("checkpoint", help="a run's output_dir or its model/ folder")
    merge.add_argument("--output", required=True)

    average = sub.add_parser(
        "average", help="average a full fine-tuning run's final weights with its newest checkpoints"
    )
    average.add_argument("checkpoint", help="a run's output_dir (its checkpoints/ are averaged with model/)")
    average.add_argument("--last", type=int, default=5, help="how many saved weights, the final model included")
    average.add_argument("--output", required=True)
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
    except (InputError, Stopped, DiskFull) as err:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()  # so the message gets a line of its own instead of trailing a progress bar
        if isinstance(err, Stopped):
            print(f"hf-finetune: {err}", file=sys.stderr)
            return 128 + err.signum
        print(f"hf-finetune: error: {err}", file=sys.stderr)
        return 1 if isinstance(err, DiskFull) else 2


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
    recipe = load_recipe(args.recipe, overrides)
    print(json.dumps(evaluate_checkpoint(recipe, checkpoint, args.predictions and Path(args.predictions))))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from hf_finetune.checkpoint import load_final, write_jsonl_atomic
    from hf_finetune.inference import inference_setup
    from hf_finetune.recipe import load_recipe

    checkpoint, overrides = _split_checkpoint(args.overrides)
    rows = read_jsonl(Path(args.input))
    recipe = load_recipe(args.recipe, overrides)
    task, model, _, _ = load_final(checkpoint, recipe)
    model, autocast = inference_setup(model, recipe.training.precision)
    with autocast():
        predictions = task.predict(model, rows)
    write_jsonl_atomic(Path(args.output), [{**row, **pred} for row, pred in zip(rows, predictions, strict=True)])
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from hf_finetune.compare import compare
    from hf_finetune.recipe import DEFAULT_FORGETTING_CORPUS

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
        search_lr=args.lr_search,
        forgetting=args.forgetting_corpus or (DEFAULT_FORGETTING_CORPUS if args.forgetting else None),
        compute_matched=args.compute_matched,
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
    from hf_finetune.merging import merge_checkpoint

    merge_checkpoint(args.checkpoint, Path(args.output))
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from hf_finetune.averaging import average_run

    done = average_run(args.checkpoint, args.last, Path(args.output))
    print(f"averaged {len(done['averaged_from'])} weights into {done['output']}:", *done["averaged_from"], sep="\n  ")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from hf_finetune.checkpoint import write_jsonl_atomic
    from hf_finetune.inference import inference_setup
    from hf_finetune.tasks.language_modeling import generate, load_generator

    if args.input and not args.output:
        raise InputError("generate --input needs --output")
    rows = read_jsonl(Path(args.input)) if args.input else [{"prompt": args.prompt}]
    for i, row in enumerate(rows):
        if not isinstance(row.get("prompt"), str):
            raise InputError(f"{args.input} row {i + 1}: no 'prompt' text field")
    model, tokenizer = load_generator(args.checkpoint)
    model, autocast = inference_setup(model, args.precision)
    with autocast():
        texts = generate(
            model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams, seed=args.seed,
            batch_size=args.batch_size,
        )  # fmt: skip
    if not args.input:
        print(args.prompt + texts[0])
        return 0
    write_jsonl_atomic(Path(args.output), [{**row, "generated": t} for row, t in zip(rows, texts, strict=True)])
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import torch

    from hf_finetune.chatting import answer_rows, interactive, load_chat, sampling_options
    from hf_finetune.checkpoint import write_jsonl_atomic
    from hf_finetune.inference import inference_setup

    if args.input and not args.output:
        raise InputError("chat --input needs --output")
    options = sampling_options(args.temperature, args.top_p, args.max_new_tokens)
    rows = read_jsonl(Path(args.input)) if args.input else None
    task, model = load_chat(args.checkpoint)
    model, autocast = inference_setup(model, args.precision)
    torch.manual_seed(args.seed)
    with autocast():
        if rows is None:
            interactive(task, model, args.system, options)
            return 0
        replies = answer_rows(task, model, rows, args.system, options)
    write_jsonl_atomic(Path(args.output), [{**row, "response": r} for row, r in zip(rows, replies, strict=True)])
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    from hf_finetune.scratch import TINY_CORPUS, Dims, write_scratch_model

    texts: list[str] = []
    for name in args.corpus:
        path = Path(name)
        if not path.is_file():
            raise InputError(f"--corpus {path}: file not found")
        texts += path.read_text(encoding="utf-8").splitlines()
    dims = Dims(
        layers=args.layers, d_model=args.d_model, heads=args.heads, ffn=args.ffn,
        max_positions=args.max_positions, vocab_size=args.vocab_size,
    )  # fmt: skip
    folder = write_scratch_model(Path(args.output), args.arch, texts or TINY_CORPUS.splitlines(), dims, args.seed)
    print(folder)
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
    "average": cmd_average,
    "generate": cmd_generate,
    "chat": cmd_chat,
    "make-tiny": cmd_make_tiny,
}
