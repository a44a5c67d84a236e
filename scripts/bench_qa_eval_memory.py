"""Peak memory of extractive-QA evaluation against the number of questions: SQuAD v1.1 dev, its first 1,000
questions against all 10,570, with the same checkpoint and settings.

    python scripts/bench_qa_eval_memory.py                                 # 1000 and all, MiniLM, 2-step checkpoint
    python scripts/bench_qa_eval_memory.py --checkpoint runs/squad/full --sizes 1000,3000,all

Without --checkpoint, a checkpoint is made first by 2 training steps on 64 questions (evaluation memory does not
depend on how well the model answers). Each evaluation is a fresh `hf-finetune eval` subprocess; its peak resident
set comes from the kernel (wait4's ru_maxrss), so the figure is the whole process: interpreter, model, features,
n-best candidates and metric. Reported: peak memory per size and the ratio of each to the smallest.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchlib import measured

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "question_answering" / "squad.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="a QA run's output_dir (default: made by 2 training steps)")
    parser.add_argument("--sizes", default="1000,all", help="comma-separated numbers of dev questions, or all")
    parser.add_argument("--set", action="append", default=[], help="extra key=value override for every run")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    hf = [sys.executable, "-m", "hf_finetune"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_qa_mem_") as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            checkpoint = f"{tmp}/ckpt"
            print("bench_qa_eval_memory: making a 2-step checkpoint", file=sys.stderr)
            measured([*hf, "train", str(RECIPE), f"output_dir={checkpoint}", "data.train.max_samples=64",
                      "data.validation.max_samples=8", "training.max_steps=2", "training.eval_every=null", *args.set])  # fmt: skip
        for size in args.sizes.split(","):
            limit = [] if size == "all" else [f"data.validation.max_samples={size}"]
            print(f"bench_qa_eval_memory: evaluating {size} questions", file=sys.stderr)
            peak, wall, out = measured([*hf, "eval", str(RECIPE), f"checkpoint={checkpoint}", *limit, *args.set])
            scores = json.loads(out.strip().splitlines()[-1])
            rows.append({"questions": size, "peak_rss_mb": peak, "wall_s": wall, **scores})
            print(f"bench_qa_eval_memory: {rows[-1]}", file=sys.stderr)
    base = rows[0]["peak_rss_mb"]
    print("| dev questions | peak RSS (MB) | / first | wall (s) | EM | F1 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        scores = r.get("metrics", r)  # eval prints {"metrics": {...}, ...}
        print(f"| {r['questions']} | {r['peak_rss_mb']:,.0f} | {r['peak_rss_mb'] / base:.2f} | {r['wall_s']:.0f} | "
              f"{scores.get('exact_match', float('nan')):.2f} | {scores.get('f1', float('nan')):.2f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
