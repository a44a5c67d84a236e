"""Time training steps of MiniLM on sorted SST-2 batches and read the process's memory afterwards.

    python scripts/profile_step.py --method lora --precision bf16              # the engine's choices
    python scripts/profile_step.py --method lora --precision bf16 --torch-dropout --peft-casts
    python scripts/profile_step.py --method full --precision bf16 --pad-to 8 --profile
    LRU_CACHE_CAPACITY=1024 python scripts/profile_step.py --method lora --pad-to 0   # before the two memory changes

Runs --batches steps (after 5 warm-up steps) over the first 32 x --batches training sentences sorted by length, with
fused AdamW and gradient clipping as the engine has them, but no data loader or evaluation: a step's own cost. Prints
ms per step, peak RSS, and glibc's `mallinfo2` (main-arena heap in use and free, mmapped bytes); `--profile` adds a
`torch.profiler` table over every sixth batch. Set ONEDNN_PRIMITIVE_CACHE_CAPACITY in the environment to cap oneDNN's
kernel cache; ideep's shape cache is kept to one entry as the engine's CPU tuning keeps it
(`hf_finetune.device.cpu_process_settings`; `LRU_CACHE_CAPACITY=1024` restores torch's default).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_finetune.data import resolve_path
from hf_finetune.device import Padding, RulePadding, cpu_process_settings, leave_input_casts_to_autocast
from hf_finetune.dropout import use_fast_dropout
from hf_finetune.hub import resolve_model
from hf_finetune.methods import apply_method, resolve_method
from hf_finetune.recipe import MethodConfig
from hf_finetune.system import glibc_heap_mb
from hf_finetune.tasks.classification import ClassificationTask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("full", "lora"), default="lora")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--dropout", type=float, help="LoRA's dropout (default: the method's own)")
    parser.add_argument(
        "--torch-dropout", action="store_true", help="keep torch's dropout (the engine swaps it)"
    )
    parser.add_argument("--peft-casts", action="store_true", help="keep PEFT's input casts under bf16")
    parser.add_argument(
        "--pad-to", type=int, help="pad each batch's width to a multiple of this (0: the longest row's width) instead "
        "of the width buckets the engine uses on a CPU in bf16 (hf_finetune/device.py; fp32 pads to the longest row)"
    )  # fmt: skip
    parser.add_argument("--batches", type=int, default=63)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    # ideep's cache as the engine's CPU tuning keeps it, held for the whole measurement
    with cpu_process_settings(True):
        measure(args)


def measure(args: argparse.Namespace) -> None:
    path = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    if args.method == "lora":
        method = resolve_method(MethodConfig(name="lora", dropout=args.dropout), 125)
        model, _ = apply_method(model, method, "SEQ_CLS", ClassificationTask.head_modules, 125)
        if args.precision == "bf16" and not args.peft_casts:
            leave_input_casts_to_autocast(model)
    if not args.torch_dropout:
        use_fast_dropout(model)
    lines = resolve_path("classification/sst2/train.jsonl").read_text().splitlines()[: 32 * args.batches]
    rows = [json.loads(line) for line in lines]
    encoded = [
        tokenizer(r["sentence"], truncation=True, max_length=128) | {"labels": r["label"]} for r in rows
    ]
    encoded.sort(key=lambda e: len(e["input_ids"]))
    if args.pad_to is None and args.precision == "bf16":  # as the engine pads on a CPU
        collate = RulePadding(tokenizer, max_length=128, rule=Padding(buckets=True))
    else:
        collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=args.pad_to or None)
    batches = [collate(encoded[i : i + 32]) for i in range(0, len(encoded), 32)]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)
    model.train()

    def step(batch: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for batch in batches[:5]:
        step(batch)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    ms = (time.perf_counter() - start) / len(batches) * 1e3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    heap = glibc_heap_mb()
    print(f"{args.method} {args.precision}: {ms:.1f} ms/step over {len(batches)} batches, peak RSS {peak:,.0f} MB; "
          f"glibc heap in use {heap['in_use']:,.0f} MB, free {heap['free']:,.0f} MB, "
          f"mmapped {heap['mmapped']:,.0f} MB")  # fmt: skip
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for batch in batches[::6]:
                step(batch)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
