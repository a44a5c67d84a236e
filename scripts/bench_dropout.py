"""Time hf_finetune.dropout's CPU dropout against torch's on MiniLM-sized activations, forward and forward+backward.

    python scripts/bench_dropout.py              # batch 32 x 25 tokens, widths 384 and 1536, p 0.05 and 0.1

Prints milliseconds per call (median of --repeats rounds of --calls calls) and torch / ours. Forward+backward
includes one `Tensor.backward` call each, which costs the same on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from hf_finetune.dropout import fast_dropout


def per_call_ms(fn: Callable[[], object], calls: int, repeats: int) -> float:
    for _ in range(5):
        fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=25)
    parser.add_argument("--widths", default="384,1536")
    parser.add_argument("--p", default="0.05,0.1")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}")
    print(
        "| shape | p | torch fwd (ms) | ours fwd (ms) | ratio | torch fwd+bwd (ms) | ours fwd+bwd (ms) | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width in (int(w) for w in args.widths.split(",")):
        for p in (float(x) for x in args.p.split(",")):
            x = torch.randn(args.batch, args.tokens, width, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            sides = (
                lambda x=x, p=p: F.dropout(x, p, True),
                lambda x=x, p=p: fast_dropout(x, p),
                lambda x=x, p=p, grad=grad: F.dropout(x, p, True).backward(grad),
                lambda x=x, p=p, grad=grad: fast_dropout(x, p).backward(grad),
            )
            times = [per_call_ms(fn, args.calls, args.repeats) for fn in sides]
            print(
                f"| {args.batch}x{args.tokens}x{width} | {p} | {times[0]:.3f} | {times[1]:.3f} | "
                f"{times[0] / times[1]:.1f}x | {times[2]:.3f} | {times[3]:.3f} | {times[2] / times[3]:.1f}x |"
            )


if __name__ == "__main__":
    main()
