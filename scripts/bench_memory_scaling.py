"""Peak memory per method as the model grows: full fine-tuning, LoRA, prefix tuning and QLoRA on BERT shapes of 22M
(the embedded MiniLM), 110M (BERT-base) and 335M (BERT-large) parameters, same batch and sequence length.

    python scripts/bench_memory_scaling.py                          # 22m,110m,335m x full,lora,prefix,qlora
    python scripts/bench_memory_scaling.py --sizes 22m --methods full,lora --steps 3 --batch 8 --length 128

The 110M and 335M models are random-init BERTs built from configs (memory does not depend on the weights' values)
with MiniLM's tokenizer; 22M is MiniLM itself. Every row is trained to `--length` tokens (sentences of SST-2 joined
until truncation), so every batch has the same shape. Each run is a fresh subprocess of `hf-finetune train`; its
peak memory is the run's own (peak resident set on a CPU: interpreter, model, optimizer state and activations;
CUDA's max allocated on a GPU). Reported: peak memory per size and method, and each method's ratio to full
fine-tuning at the same size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchlib import train_results

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "classification" / "sst2.yaml"
SHAPES = {  # layers, width, heads, feed-forward width
    "110m": (12, 768, 12, 3072),
    "335m": (24, 1024, 16, 4096),
}


def build(size: str, root: Path) -> str:
    """The model folder for a size: MiniLM's own for 22m, else a random-init BERT of that shape beside its tokenizer."""
    from hf_finetune.hub import resolve_model

    minilm = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    if size == "22m":
        return minilm
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    layers, width, heads, ffn = SHAPES[size]
    out = root / f"bert-{size}"
    config = BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads, intermediate_size=ffn,
                        num_labels=2)  # fmt: skip
    model = BertForSequenceClassification(config)
    print(f"bench_memory_scaling: {size}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters",
          file=sys.stderr)  # fmt: skip
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm).save_pretrained(out)
    return str(out)


def long_rows(path: Path, rows: int) -> None:
    """SST-2 training sentences joined into rows longer than any --length, so truncation fixes every row's width."""
    from hf_finetune.data import resolve_path

    found = resolve_path("classification/sst2/train.jsonl")
    if found is None:
        raise SystemExit("bench_memory_scaling: classification/sst2/train.jsonl not found under ../shared/data or $HF_FINETUNE_DATA")
    source = [json.loads(x) for x in found.read_text().splitlines()]
    with path.open("w") as f:
        for i in range(rows):
            words = " ".join(source[(i * 40 + j) % len(source)]["sentence"] for j in range(40))
            f.write(json.dumps({"sentence": words, "label": i % 2}) + "\n")  # both classes, however few rows


def run(model: str, method: str, data: Path, args: argparse.Namespace, out: Path) -> dict:
    results = train_results(RECIPE, out, [
        f"model.name_or_path={model}", f"method.name={method}", f"data.train.path={data}",
        f"data.validation.path={data}", "data.validation.max_samples=8", f"training.max_steps={args.steps}",
        f"training.batch_size={args.batch}", f"training.max_length={args.length}", "training.eval_every=null",
        "training.group_by_length=false", "training.logging_every=1", *args.set,
    ])  # fmt: skip
    return {
        "peak_memory_mb": results["peak_memory_mb"],
        "trainable": results.get("trainable_params"),
        "total": results.get("total_params"),
        "s_per_step": results["train_runtime_s"] / results["steps"],
        "device": results["versions"].get("device"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="22m,110m,335m", help="comma-separated, of 22m, 110m, 335m")
    parser.add_argument("--methods", default="full,lora,prefix,qlora")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the optimizer state exists "
                        "from the first)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--set", action="append", default=[], help="extra key=value override for every run")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    figures: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_mem_") as tmp:
        root = Path(tmp)
        data = root / "rows.jsonl"
        long_rows(data, max(args.batch * args.steps, 8))
        for size in sizes:
            model = build(size, root)
            for method in methods:
                print(f"bench_memory_scaling: {size} {method}", file=sys.stderr)
                figures[size, method] = run(model, method, data, args, root / f"{size}-{method}")
                print(f"bench_memory_scaling: {size} {method}: {figures[size, method]}", file=sys.stderr)
    device = next(iter(figures.values()))["device"]
    print(f"batch {args.batch} x {args.length} tokens, {args.steps} steps, {device}")
    print("| size | " + " | ".join(f"{m} peak MB (/ full)" for m in methods) + " |")
    print("|---|" + "---|" * len(methods))
    for size in sizes:
        full = figures.get((size, "full"), {}).get("peak_memory_mb")
        cells = []
        for m in methods:
            mb = figures[size, m]["peak_memory_mb"]
            cells.append(f"{mb:,.0f}" + (f" ({mb / full:.2f})" if full and m != "full" else ""))
        print(f"| {size} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps([{"size": s, "method": m, **f} for (s, m), f in figures.items()], indent=2))


if __name__ == "__main__":
    main()
