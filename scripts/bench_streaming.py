"""Peak memory of a streamed training split against the corpus size: the same short masked-LM run (the embedded
MiniLM, LoRA) on a synthetic 10 MB and a 1 GB text file, streamed (`data.train.streaming=true`), and the 10 MB file
loaded the ordinary way (tokenised and packed whole) for scale, each a fresh `hf-finetune train` subprocess.

    python scripts/bench_streaming.py                       # 10 MB and 1 GB, 20 steps
    python scripts/bench_streaming.py --sizes-mb 10,100 --steps 40

Peak memory is the run's resident set (results.json `peak_memory_mb`); the ratio is 1 GB streamed over 10 MB
streamed, measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "language_modeling" / "bert_mlm.yaml"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such").split()


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Sentences of random common words, one per line, up to the size asked (written in chunks: never all in memory)."""
    rng = random.Random(seed)
    target, written = megabytes * 2**20, 0
    with path.open("w") as f:
        while written < target:
            chunk = "".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 30))) + " .\n" for _ in range(10_000))
            f.write(chunk)
            written += len(chunk)


def run(corpus: Path, out: Path, steps: int, streaming: bool) -> dict:
    cmd = [sys.executable, "-m", "hf_finetune", "train", str(RECIPE), f"output_dir={out}", "--overwrite",
           f"data.train.path={corpus}", f"data.train.streaming={str(streaming).lower()}", f"training.max_steps={steps}",
           "training.eval_at_start=false", "data.validation.max_samples=64", "training.precision=fp32"]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"peak_memory_mb": results["peak_memory_mb"], "wall_s": time.perf_counter() - start,
            "train_s": results["train_runtime_s"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", default="10,1024")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmp:
        for mb in sizes:
            corpus = Path(tmp) / f"corpus_{mb}mb.txt"
            write_corpus(corpus, mb)
            for streaming in (True, False) if mb == sizes[0] else (True,):
                print(f"bench_streaming: {mb} MB streaming={streaming}", file=sys.stderr)
                rows.append({"mb": mb, "streaming": streaming,
                             **run(corpus, Path(tmp) / f"run_{mb}_{streaming}", args.steps, streaming)})  # fmt: skip
            corpus.unlink()
    base = next(r for r in rows if r["streaming"] and r["mb"] == sizes[0])
    print("| corpus | read as | peak memory (MB) | vs smallest streamed | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mb']} MB | {'stream' if r['streaming'] else 'whole (tokenised, packed)'} | "
              f"{r['peak_memory_mb']:.0f} | {r['peak_memory_mb'] / base['peak_memory_mb']:.2f} | {r['wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
