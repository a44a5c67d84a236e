"""Tokenisation and collation of a large classification file: time and peak memory against `data.num_proc`.

    python scripts/bench_tokenise.py                        # 1,000,000 rows, num_proc 1 and 2
    python scripts/bench_tokenise.py --rows 100000 --num-proc 1,2,4

The file is SST-2's training sentences drawn with replacement into `--rows` JSONL rows (about 60 MB at 1M rows),
written once. Each setting runs in a fresh subprocess that does what `hf-finetune train` does before the first
step: load the split, the task's checks, tokenise through `datasets.map` (with `data.num_proc`), build the length
-grouped training loader; then it collates every batch of one epoch. datasets' cache is a fresh folder per run, so no
run reads another's work. Reported per setting: seconds to tokenise, seconds to collate the epoch, rows/s, and the
peak resident set (wait4's ru_maxrss: the largest of the process and its map workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from benchlib import measured

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "classification" / "sst2.yaml"


def write_rows(path: Path, rows: int) -> None:
    from hf_finetune.data import resolve_path

    found = resolve_path("classification/sst2/train.jsonl")
    if found is None:
        raise SystemExit("bench_tokenise: classification/sst2/train.jsonl not found under ../shared/data or $HF_FINETUNE_DATA")
    source = [json.loads(x) for x in found.read_text().splitlines()]
    rng = random.Random(0)
    with path.open("w") as f:
        for i in range(rows):
            row = source[rng.randrange(len(source))]
            f.write(json.dumps({"idx": i, "sentence": row["sentence"], "label": row["label"]}) + "\n")


def worker(data: str, num_proc: int, batch: int) -> None:
    """One setting, in this process: prints a JSON line of its timings."""
    from hf_finetune.data import load_splits
    from hf_finetune.device import padding_for
    from hf_finetune.hub import load_tokenizer, resolve_model
    from hf_finetune.recipe import load_recipe
    from hf_finetune.sampling import build_loaders
    from hf_finetune.tasks import get_task

    recipe = load_recipe(RECIPE, [f"data.train.path={data}", f"data.validation.path={data}",
                                  "data.validation.max_samples=8", f"data.num_proc={num_proc}",
                                  f"training.batch_size={batch}"])  # fmt: skip
    start = time.perf_counter()
    task = get_task(recipe)
    raw = load_splits(recipe.data)
    task.prepare(raw)
    loaded = time.perf_counter()
    model = resolve_model(recipe.model.name_or_path)
    task.setup(load_tokenizer(model, recipe), padding_for("cpu", "no"))
    encoded = task.preprocess(raw)
    tokenised = time.perf_counter()
    train_loader, _ = build_loaders(task, encoded, recipe.training, 1)
    batches = tokens = 0
    for b in train_loader:
        batches += 1
        tokens += int(b["attention_mask"].sum())
    collated = time.perf_counter()
    print(json.dumps({"rows": len(encoded["train"]), "load_s": loaded - start, "tokenise_s": tokenised - loaded,
                      "collate_s": collated - tokenised, "batches": batches, "tokens": tokens}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--num-proc", default="1,2", help="comma-separated data.num_proc values")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "NUM_PROC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), args.batch)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_tok_") as tmp:
        data = Path(tmp) / "rows.jsonl"
        write_rows(data, args.rows)
        for n in args.num_proc.split(","):
            env = {**os.environ, "HF_DATASETS_CACHE": f"{tmp}/cache-{n}", "HF_DATASETS_OFFLINE": "1"}
            cmd = [sys.executable, __file__, "--batch", str(args.batch), "--worker", str(data), n]
            print(f"bench_tokenise: num_proc={n}", file=sys.stderr)
            peak, wall, out = measured(cmd, env)
            figures = json.loads(out.strip().splitlines()[-1])
            rows.append({"num_proc": int(n), "wall_s": wall, "peak_rss_mb": peak, **figures})
            print(f"bench_tokenise: {rows[-1]}", file=sys.stderr)
    print(f"{args.rows:,} rows, batch {args.batch}")
    print("| data.num_proc | tokenise (s) | rows/s | collate one epoch (s) | batches | peak RSS (MB) | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_proc']} | {r['tokenise_s']:.1f} | {r['rows'] / r['tokenise_s']:,.0f} | {r['collate_s']:.1f} | "
              f"{r['batches']:,} | {r['peak_rss_mb']:,.0f} | {r['wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
