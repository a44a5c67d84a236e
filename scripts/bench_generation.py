"""Speed of generation-based evaluation: our batched path against one example at a time.

    python scripts/bench_generation.py runs/multi30k                       # test split, greedy, fp32
    python scripts/bench_generation.py runs/multi30k --num-beams 4 --precision bf16 --skip-single

CHECKPOINT is a translation/summarization run's output_dir (or its model/ folder). Three ways to generate for the
same source sentences, with the same model and the same generation options as the run's evaluation:

- ours: `task.predict` on the whole split, exactly the evaluation path: sources sorted by length, batches of
  `training.eval_batch`, KV cache on, `max_new_tokens` capped from the training targets' length distribution
  (recorded in the checkpoint);
- batched, dataset order: the same batches without sorting (what padding costs);
- one at a time: `task.predict` on each row alone, in dataset order (the naive loop).

Prints sentences/s and generated tokens/s for each and the ratios against one at a time, and counts how many
outputs of "ours" equal the one-at-a-time output (under greedy decoding in fp32 they should all be equal: padding
is masked, and each row's tokens do not depend on its batch).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--split", default="test", choices=("validation", "test"))
    parser.add_argument("--limit", type=int, default=None, help="first N rows of the split (default: all)")
    parser.add_argument("--num-beams", type=int, default=1, help="1: greedy (default), as the identity check needs")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--skip-single", action="store_true", help="skip the slow one-at-a-time loop")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    from hf_finetune.checkpoint import INFO_NAME, find_model_dir, load_final
    from hf_finetune.data import load_splits
    from hf_finetune.recipe import recipe_from_dict

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = find_model_dir(args.checkpoint)
    raw = json.loads((folder / INFO_NAME).read_text())["recipe"]
    raw.setdefault("seq2seq", {})["num_beams"] = args.num_beams
    recipe = recipe_from_dict(raw, source=str(folder / INFO_NAME))
    if recipe.task not in ("translation", "summarization"):
        parser.error(f"{args.checkpoint}: a {recipe.task} run; this bench needs translation or summarization")
    task, model, tokenizer, _ = load_final(folder, recipe)  # the task comes set up with the saved tokenizer
    data = dataclasses.replace(recipe.data, train=None, **{s: None for s in ("validation", "test") if s != args.split})
    split = load_splits(data)[args.split]
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    rows = [dict(r) for r in split]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext()

    def run(name: str, batches: list[list[dict]]) -> dict[str, Any]:
        start = time.perf_counter()
        with autocast:
            out = [g["generated"] for batch in batches for g in task.predict(model, batch)]
        seconds = time.perf_counter() - start
        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in out)
        print(f"{name:>22}: {seconds:8.1f} s  {len(out) / seconds:7.1f} sentences/s  {tokens / seconds:8.1f} tokens/s",
              flush=True)  # fmt: skip
        return {"seconds": seconds, "sentences_per_s": len(out) / seconds, "tokens_per_s": tokens / seconds,
                "outputs": out}  # fmt: skip

    size = recipe.training.eval_batch
    print(f"{len(rows)} {args.split} rows, batches of {size}, beams {args.num_beams}, {args.precision}, "
          f"{torch.get_num_threads()} threads, max_new_tokens {task.max_new_tokens}", flush=True)  # fmt: skip
    results = {"ours": run("ours (sorted batches)", [rows])}
    # the same batch size without the length sort: predict sorts within what it is given, so hand it one batch each
    results["batched_unsorted"] = run("batched, dataset order", [rows[i : i + size] for i in range(0, len(rows), size)])
    if not args.skip_single:
        results["single"] = run("one at a time", [[r] for r in rows])
        base = results["single"]["sentences_per_s"]
        for name in ("ours", "batched_unsorted"):
            print(f"{name} / one at a time: {results[name]['sentences_per_s'] / base:.2f}x")
        same = sum(a == b for a, b in zip(results["ours"]["outputs"], results["single"]["outputs"], strict=True))
        print(f"identical outputs, ours vs one at a time: {same} / {len(rows)}")
        results["identical"] = same
    results["rows"] = len(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
