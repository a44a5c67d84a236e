"""Peak memory of language-model training and evaluation with the output head over the whole batch against the
head in pieces at the scored tokens (`hf_finetune.losses.token_nll`), on the GPT pretraining recipe at its 8,192-token
vocabulary and at 32,000, with the losses of both sides.

    python scripts/bench_lm_head.py                       # vocab 8192 and 32000, 10 steps, 1,000 validation lines
    python scripts/bench_lm_head.py --vocab 8192 --steps 20 --set training.batch_size=64

Each run is a fresh subprocess (this script with --child) that trains recipes/language_modeling/gpt_pretrain.yaml
for --steps steps and then evaluates perplexity; its peak memory is the run's own (peak resident set on a CPU,
CUDA's max allocated on a GPU). "whole" is the model's own loss over the batch's logits (the head's pieces switched
off); "pieces" is the default. Evaluation batches are twice the training batch: 64 rows x 256 tokens here, whose
whole logits are 0.5 GB in fp32 at 8,192 tokens and 2.1 GB at 32,000.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "language_modeling" / "gpt_pretrain.yaml"


def child(out: str, pieces: bool, overrides: list[str]) -> None:
    from hf_finetune import losses
    from hf_finetune.engine import train
    from hf_finetune.recipe import load_recipe
    from hf_finetune.tasks.language_modeling import LanguageModelingTask

    if not pieces:
        LanguageModelingTask.chunked_head = False  # training: the model's own loss
        losses.CHUNK_LOGITS = 2**62  # evaluation: one piece, the whole batch
    results = train(load_recipe(RECIPE, [f"output_dir={out}", *overrides]), overwrite=True)
    print(json.dumps({"peak_memory_mb": results["peak_memory_mb"], "eval_loss": results["metrics"]["eval_loss"],
                      "train_s": results["train_runtime_s"]}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", default="8192,32000", help="comma-separated vocabulary sizes")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--validation-lines", type=int, default=1000)
    parser.add_argument("--set", action="append", default=[], help="extra key=value override for every run")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--child", nargs=2, metavar=("OUT", "PIECES"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1] == "1", args.overrides)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_lm_head_") as tmp:
        for vocab in args.vocab.split(","):
            common = [f"model.from_scratch.vocab_size={vocab}", f"training.max_steps={args.steps}",
                      "training.eval_at_start=false", "training.eval_every=null", "training.logging_every=1",
                      f"data.validation.max_samples={args.validation_lines}", *args.set]  # fmt: skip
            for pieces in (False, True):
                name = "pieces" if pieces else "whole"
                print(f"bench_lm_head: vocab {vocab}, head {name}", file=sys.stderr)
                out = Path(tmp) / f"{vocab}-{name}"
                cmd = [sys.executable, __file__, "--child", str(out), str(int(pieces)), "--", *common]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
                figures["losses"] = [x["loss"] for x in logged if "loss" in x]
                rows.append({"vocab": int(vocab), "head": name, **figures})
                print(f"bench_lm_head: {rows[-1]}", file=sys.stderr)
    print("| vocabulary | head | peak memory (MB) | / whole | eval loss | last training loss | training losses equal |")
    print("|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        whole, pieces = rows[i], rows[i + 1]
        equal = max(abs(a - b) / abs(a) for a, b in zip(whole["losses"], pieces["losses"], strict=True))
        for r in (whole, pieces):
            print(f"| {r['vocab']:,} | {r['head']} | {r['peak_memory_mb']:,.0f} | "
                  f"{r['peak_memory_mb'] / whole['peak_memory_mb']:.2f} | {r['eval_loss']:.6f} | {r['losses'][-1]:.6f} | "
                  f"{'-' if r is whole else f'largest relative difference {equal:.1e}'} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
