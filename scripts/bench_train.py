"""Training speed of our `train` against transformers' `Trainer` on SST-2 with the embedded MiniLM.

    python scripts/bench_train.py                                  # full fine-tuning, tuned Trainer, 2 repeats
    python scripts/bench_train.py --method lora
    python scripts/bench_train.py --peer run_glue --repeats 1      # the Trainer as run_glue.py sets it up
    python scripts/bench_train.py --peer ours --peer-set training.precision=auto   # A/B of two settings of ours
    python scripts/bench_train.py --method full,lora --peer tuned,run_glue --set training.precision=auto --seeds 42,1,2
                                                                   # every Trainer comparison in one invocation
    python scripts/bench_train.py --method lora --peer ours --peer-set training.precision=auto \
        --set training.precision=auto --peer-patch torch_dropout   # one engine choice on/off (see PATCHES)

Each run is a fresh subprocess (so peak RSS is the run's own); A and B alternate (A B, then B A, ...) so that drift of
the machine hits both. Both sides train the same model on the same first N training rows for one epoch with the same
batch size, learning rate (the method's `defaults["lr"]`, hf_finetune/methods/<method>.py, unless --lr), warm-up steps
(10% unless --warmup-ratio), linear decay, weight decay, gradient clipping, seed, and evaluate on the full validation
split. With --seeds, repeat i uses the i-th seed on both sides and accuracy is compared as the mean over seeds.

- ours: `hf_finetune.engine` on recipes/classification/sst2.yaml with overrides (--set adds more): `setup`, then
  the --patch/--peer-patch changes to the built run, then `fit` and `finish` (what `engine.train` does).
- tuned: `Trainer` with dynamic padding (`DataCollatorWithPadding`) and `train_sampling_strategy="group_by_length"`
  (transformers 5's name for the old `group_by_length=True`); its default optimizer `adamw_torch_fused`.
- run_glue: `Trainer` as examples/pytorch/text-classification/run_glue.py runs it by default: every sequence padded
  to max_length 128 (`default_data_collator`), random order.
- LoRA on the peer: `peft.get_peft_model` with the very LoraConfig our `methods` build (r 32, alpha 64, dropout 0.05,
  every linear layer, the classifier trained in full).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "classification" / "sst2.yaml"
RESULT_TAG = "BENCH_RESULT "
# Measured and reported, not the engine's behaviour: each replaces one engine choice in the child process (or, pad8,
# pad4 and onednn_cache256, tries one it does not make; docs/benchmarks.md says why not). The environment patches are
# set before `engine.setup`; the others change the run `setup` built, before its first step (`apply_patches`).
PATCHES = {
    "adamw_forloop": "torch's for-loop AdamW (and a fresh scheduler) instead of the engine's fused one",
    "adamw_foreach": "torch's foreach AdamW (and a fresh scheduler) instead of the engine's fused one",
    "no_buckets": "pad each batch to its longest row instead of hf_finetune/device.py's padding rule (width buckets "
    "on a CPU in bf16 with training.cpu_tuning=auto)",
    "pad8": "pad each batch to a multiple of 8 instead of the device's padding rule",
    "pad4": "pad each batch to a multiple of 4 instead of the device's padding rule",
    "onednn_cache256": "ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 (oneDNN's kernel cache capped)",
    "ideep_cache1024": "LRU_CACHE_CAPACITY=1024, torch's default, instead of the one entry the CPU tuning sets",
    "compile": "torch.compile(model, dynamic=True) on the prepared model, after the CPU tuning (add torch_dropout to "
    "compile torch's dropout rather than trace around FastDropout)",
    "torch_dropout": "torch's nn.Dropout back where the CPU tuning put hf_finetune.dropout.FastDropout",
    "peft_input_casts": "PEFT layers cast their input to the adapter dtype again (the CPU tuning stops it in bf16)",
}
ENV_PATCHES = {
    "onednn_cache256": ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256"),
    "ideep_cache1024": ("LRU_CACHE_CAPACITY", "1024"),
}


# ----------------------------------------------------------------------------------------------- child processes
def first_step_clock(spawned: float) -> dict[str, float]:
    """Seconds from the parent spawning this process to the end of the first optimizer step (imports, data, tokenising,
    model loading and one step: what a user waits before training is under way)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen: dict[str, float] = {}

    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        if "first_step_s" not in seen:
            seen["first_step_s"] = time.time() - spawned
            seen["rss_first_step_mb"] = peak_rss_mb()

    register_optimizer_step_post_hook(hook)
    return seen


def allocator() -> str:
    """The malloc this process runs on: jemalloc or tcmalloc when LD_PRELOAD put one in, else glibc's."""
    maps = Path("/proc/self/maps")
    text = maps.read_text() if maps.exists() else ""
    return next((name for name in ("jemalloc", "tcmalloc") if f"lib{name}" in text), "glibc")


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_cuda_mb() -> float | None:
    """CUDA's max allocated on a GPU (the resident set there is the host side only), else None."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    from hf_finetune import engine
    from hf_finetune.recipe import load_recipe

    seen = first_step_clock(cfg["spawned"])
    set_environment(cfg["patches"])
    eval_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench_ours_") as out:
        overrides = [
            f"method.name={cfg['method']}",
            f"data.train.max_samples={cfg['train_samples']}",
            f"data.validation.max_samples={cfg['validation_samples'] or 'null'}",
            "training.epochs=1",
            f"training.batch_size={cfg['batch_size']}",
            f"training.lr={cfg['lr']}",
            f"training.seed={cfg['seed']}",
            f"training.warmup_ratio={cfg['warmup_ratio']}",
            f"training.weight_decay={cfg['weight_decay']}",
            f"output_dir={out}",
            *cfg["overrides"],
        ]
        run = engine.setup(load_recipe(RECIPE, overrides), overwrite=True)
        try:
            apply_patches(run, cfg["patches"])
            evaluate = run.task.evaluate

            def timed_evaluate(*args: Any, **kwargs: Any) -> dict[str, float]:
                seen.setdefault("rss_before_eval_mb", peak_rss_mb())
                start = time.perf_counter()
                scores = evaluate(*args, **kwargs)
                eval_times.append(time.perf_counter() - start)
                return scores

            run.task.evaluate = timed_evaluate  # type: ignore[method-assign]  # this run's task object only
            results = engine.finish(run, engine.fit(run))
        finally:
            run.settings.close()  # finish releases them too; this covers a run that fails
    return {
        "train_s": results["train_runtime_s"],
        "samples_per_s": results["train_samples_per_s"],
        "tokens_per_s": results["train_tokens_per_s"],
        "first_step_s": seen.get("first_step_s", float("nan")),
        "rss_first_step_mb": seen.get("rss_first_step_mb"),
        "rss_before_eval_mb": seen.get("rss_before_eval_mb"),
        "eval_s": eval_times[-1],
        "accuracy": results["metrics"]["accuracy"],
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": peak_cuda_mb(),
        "steps": results["steps"],
        "precision": results["precision"],
        "threads": torch.get_num_threads(),
        "malloc": allocator(),
    }


def set_environment(patches: list[str]) -> None:
    """The environment patches, before `engine.setup`: oneDNN reads its variable when it builds its first kernel and
    ideep its own at the first bf16 matmul, neither of which has happened yet in this child; the CPU tuning's
    `hf_finetune.device.cpu_process_settings` keeps an LRU_CACHE_CAPACITY already set."""
    for patch in patches:
        if patch not in PATCHES:
            raise SystemExit(f"unknown patch {patch!r}; one of {', '.join(PATCHES)}")
        if patch in ENV_PATCHES:
            name, value = ENV_PATCHES[patch]
            os.environ[name] = value


def apply_patches(run: Any, patches: list[str]) -> None:
    """Undo one engine choice at a time in the run `engine.setup` built, for on/off measurements without switches in
    the package. The environment patches are `set_environment`'s."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers import DataCollatorWithPadding, get_scheduler

    from hf_finetune import methods
    from hf_finetune.dropout import FastDropout

    for patch in patches:
        if patch in ENV_PATCHES:
            continue
        if patch in ("adamw_forloop", "adamw_foreach"):
            # the engine's optimizer and scheduler, rebuilt with the for-loop or foreach AdamW (no LoRA+ groups: the
            # bench runs the methods' defaults)
            t = run.resolved["training"]
            groups = methods.param_groups(run.unwrapped, t["weight_decay"])
            optimizer = torch.optim.AdamW(groups, lr=t["lr"], fused=False, foreach=patch == "adamw_foreach")
            total = run.schedule.total_steps
            scheduler = get_scheduler(
                t["scheduler"],
                optimizer,
                num_warmup_steps=int(t["warmup_ratio"] * total),
                num_training_steps=total,
            )
            run.optimizer, run.scheduler = run.accelerator.prepare(optimizer, scheduler)
        elif patch in ("no_buckets", "pad8", "pad4"):
            # instead of the task's `RulePadding` (the rule hf_finetune/device.py's `padding_for` picks): plain
            # dynamic padding, or fixed multiples
            multiple = None if patch == "no_buckets" else int(patch[3:])
            collate = DataCollatorWithPadding(run.task.tokenizer, pad_to_multiple_of=multiple)
            for loader in (run.train_loader, *run.eval_loaders.values()):
                # accelerate's DataLoaderShard iterates the torch DataLoader it wraps, which reads collate_fn
                # whenever an iteration starts; set on the shard itself it would only shadow that one
                getattr(loader, "base_dataloader", loader).collate_fn = collate
        elif patch == "compile":
            run.model = torch.compile(run.model, dynamic=True)
        elif patch == "torch_dropout":
            for module in run.model.modules():
                if isinstance(module, FastDropout):
                    module.__class__ = torch.nn.Dropout
        elif patch == "peft_input_casts":
            for module in run.model.modules():
                if isinstance(module, BaseTunerLayer):
                    module.cast_input_dtype_enabled = True
        else:
            raise SystemExit(f"unknown patch {patch!r}; one of {', '.join(PATCHES)}")


def run_peer(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    from hf_finetune.data import resolve_path
    from hf_finetune.hub import resolve_model
    from hf_finetune.methods import apply_method, resolve_method
    from hf_finetune.recipe import MethodConfig
    from hf_finetune.tasks.classification import ClassificationTask

    seen = first_step_clock(cfg["spawned"])
    set_seed(cfg["seed"])  # before the model loads: the classifier's random init
    files = {
        "train": str(resolve_path("classification/sst2/train.jsonl")),
        "validation": str(resolve_path("classification/sst2/validation.jsonl")),
    }
    raw = load_dataset("json", data_files=files)
    raw["train"] = raw["train"].select(range(min(cfg["train_samples"], len(raw["train"]))))
    if cfg["validation_samples"]:
        raw["validation"] = raw["validation"].select(range(cfg["validation_samples"]))
    model_path = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    run_glue = cfg["peer"] == "run_glue"

    def encode(batch: dict[str, list]) -> dict[str, list]:
        padding = "max_length" if run_glue else False
        return tokenizer(batch["sentence"], padding=padding, max_length=128, truncation=True)

    encoded = raw.map(encode, batched=True, remove_columns=["sentence"]).rename_column("label", "labels")
    real_tokens = sum(sum(mask) for mask in encoded["train"]["attention_mask"])
    steps = -(-len(encoded["train"]) // cfg["batch_size"])
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, use_safetensors=True)
    if cfg["method"] != "full":
        method = resolve_method(MethodConfig(name=cfg["method"]), steps)
        # = peft.get_peft_model(model, build_peft_config(method, "SEQ_CLS", steps, heads)): our very config
        model, _ = apply_method(model, method, "SEQ_CLS", ClassificationTask.head_modules, steps)

    def accuracy(pred: Any) -> dict[str, float]:
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    with tempfile.TemporaryDirectory(prefix="bench_peer_") as out:
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            per_device_train_batch_size=cfg["batch_size"],
            # ours evaluates in batches twice the training batch
            per_device_eval_batch_size=2 * cfg["batch_size"],
            learning_rate=cfg["lr"],
            num_train_epochs=1,
            warmup_steps=int(cfg["warmup_ratio"] * steps),  # ours: int(warmup_ratio x steps) as well
            lr_scheduler_type="linear",
            weight_decay=cfg["weight_decay"],
            max_grad_norm=1.0,
            seed=cfg["seed"],
            logging_steps=10,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            label_names=["labels"],
            train_sampling_strategy="random" if run_glue else "group_by_length",
            # autocast, as ours with training.precision=bf16/auto
            bf16=cfg.get("peer_precision", "fp32") == "bf16",
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=encoded["train"],
            eval_dataset=encoded["validation"],
            processing_class=tokenizer,
            data_collator=default_data_collator if run_glue else DataCollatorWithPadding(tokenizer),
            compute_metrics=accuracy,
        )
        train_s = trainer.train().metrics["train_runtime"]
        rss_before_eval = peak_rss_mb()
        start = time.perf_counter()
        scores = trainer.evaluate()
        eval_s = time.perf_counter() - start
    return {
        "train_s": train_s,
        "samples_per_s": len(encoded["train"]) / train_s,
        "tokens_per_s": real_tokens / train_s,
        "first_step_s": seen.get("first_step_s", float("nan")),
        "rss_first_step_mb": seen.get("rss_first_step_mb"),
        "rss_before_eval_mb": rss_before_eval,
        "eval_s": eval_s,
        "accuracy": scores["eval_accuracy"],
        "peak_rss_mb": peak_rss_mb(),
        "peak_cuda_mb": peak_cuda_mb(),
        "steps": trainer.state.global_step,
        "precision": cfg.get("peer_precision", "fp32"),
        "threads": torch.get_num_threads(),
        "malloc": allocator(),
        "optim": str(args.optim),
    }


# ------------------------------------------------------------------------------------------------------- parent
@functools.cache  # loads the model: once per method, not once per pair
def model_flops_per_token(method: str) -> tuple[float, str]:
    """FLOPs per real token of one training step, counting the matmuls of the per-token (encoder) weights only:
    embeddings are lookups, and the pooler and classifier run once per sequence, not per token."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    from hf_finetune.hub import resolve_model
    from hf_finetune.methods import apply_method, resolve_method
    from hf_finetune.recipe import MethodConfig
    from hf_finetune.tasks.classification import ClassificationTask

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model("sentence-transformers/all-MiniLM-L6-v2"), num_labels=2
    )
    if method == "full":
        n = sum(p.numel() for name, p in model.named_parameters() if ".encoder." in f".{name}")
        return 6.0 * n, f"6 x N, N = {n / 1e6:.2f}M encoder (non-embedding, per-token) weights"
    model, _ = apply_method(model, resolve_method(MethodConfig(name=method), 100), "SEQ_CLS",
                            ClassificationTask.head_modules, 100)  # fmt: skip
    frozen = sum(
        p.numel() for name, p in model.named_parameters() if ".encoder." in name and not p.requires_grad
    )
    adapter = sum(
        p.numel() for name, p in model.named_parameters() if ".encoder." in name and p.requires_grad
    )
    return (
        4.0 * frozen + 6.0 * adapter,
        f"4 x N_frozen + 6 x N_adapter (frozen weights: forward 2N + input gradients 2N, no weight gradients), "
        f"N_frozen = {frozen / 1e6:.2f}M, N_adapter = {adapter / 1e6:.2f}M; the 6 x N convention of full "
        f"fine-tuning would be {6 * (frozen + adapter) / (4 * frozen + 6 * adapter):.2f}x these figures",
    )


def machine_peak(threads: int) -> tuple[float, float, str]:
    """fp32 and bf16 peak FLOP/s of the cores the runs used (their torch threads, at most the cores this process may
    use), from /proc/cpuinfo's clock."""
    cores = min(threads, len(os.sched_getaffinity(0)))
    info = Path("/proc/cpuinfo").read_text()
    mhz = float(re.search(r"cpu MHz\s*:\s*([\d.]+)", info).group(1))
    flags = set(re.search(r"flags\s*:(.*)", info).group(1).split())
    fp32 = cores * 2 * 16 * 2 * mhz * 1e6 if "avx512f" in flags else cores * 2 * 8 * 2 * mhz * 1e6
    bf16 = cores * 1024 * mhz * 1e6 if "amx_bf16" in flags else float("nan")
    note = (
        f"peak fp32 = {cores} cores x 2 FMA units x 16 fp32 lanes (AVX-512) x 2 flops x {mhz:.0f} MHz "
        f"= {fp32 / 1e9:.0f} GFLOP/s; peak bf16 (AMX) = {cores} cores x 1024 flops/cycle x {mhz:.0f} MHz = "
        f"{bf16 / 1e12:.2f} TFLOP/s. Assumes the clock /proc/cpuinfo reports holds under AVX-512/AMX load (real "
        f"licence clocks are lower, so these peaks are upper bounds) and two 512-bit FMA ports per core."
    )
    return fp32, bf16, note


def spawn(side: str, cfg: dict[str, Any], log_dir: Path, index: int) -> dict[str, Any]:
    cfg = {**cfg, "spawned": time.time()}
    log = log_dir / f"run{index:02d}_{side}.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    with log.open("w") as handle:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(cfg)],
            stdout=subprocess.PIPE, stderr=handle, text=True, env=env, cwd=REPO,
        )  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if proc.returncode or not lines:
        raise SystemExit(f"{side} run failed (exit {proc.returncode}); see {log}")
    # 1-minute load average as the run ends: about the run's thread count when it had the machine to itself
    return {**json.loads(lines[-1][len(RESULT_TAG) :]), "load_1min": os.getloadavg()[0], "seed": cfg["seed"]}


COLUMNS = (
    ("samples_per_s", "samples/s", "{:.1f}"),
    ("tokens_per_s", "real tokens/s", "{:,.0f}"),
    ("first_step_s", "to 1st step (s)", "{:.1f}"),
    ("train_s", "train (s)", "{:.1f}"),
    ("eval_s", "eval (s)", "{:.2f}"),
    ("peak_rss_mb", "peak RSS (MB)", "{:,.0f}"),
    ("accuracy", "dev acc", "{:.4f}"),
)


def table_row(label: str, run: dict[str, Any], flops: float, peak: float) -> str:
    cells = [fmt.format(run[key]) for key, _, fmt in COLUMNS]
    achieved = flops * run["tokens_per_s"]
    return f"| {label} | " + " | ".join(cells) + f" | {achieved / 1e9:.1f} | {100 * achieved / peak:.1f}% |"


def labels(args: argparse.Namespace, peer: str) -> tuple[str, str]:
    label_a = "ours" + "".join(f" {x}" for x in args.set + args.patch)
    label_b = (
        "ours" + "".join(f" {x}" for x in args.peer_set + args.peer_patch)
        if peer == "ours"
        else peer + (" bf16" if args.peer_precision == "bf16" else "")
    )
    return label_a, label_b


def choices(allowed: tuple[str, ...]) -> Any:
    """argparse type for a comma-separated list drawn from `allowed`."""

    def parse(text: str) -> list[str]:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected a comma-separated list of {', '.join(allowed)}"
            )
        return items

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", type=choices(("full", "lora")), default=["full"],
                        help="comma-separated: full,lora runs both (and reports LoRA's peak RSS against full's)")  # fmt: skip
    parser.add_argument("--peer", type=choices(("tuned", "run_glue", "ours")), default=["tuned"],
                        help="comma-separated: tuned,run_glue pairs ours with each")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--train-samples", type=int, default=4000)
    parser.add_argument(
        "--run-glue-train-samples",
        type=int,
        help="training rows for pairs with --peer run_glue (default: --train-samples); its pad-to-128 Trainer runs "
        "~10x slower, so fewer rows save time, but our fixed per-run costs (first-use kernels) then weigh more",
    )
    parser.add_argument(
        "--run-glue-methods",
        type=choices(("full", "lora")),
        default=["full"],
        help="the methods paired with --peer run_glue (docs/benchmarks.md's run_glue figure is for full fine-tuning)",
    )
    parser.add_argument("--run-glue-repeats", type=int, default=1)
    parser.add_argument("--validation-samples", type=int, help="default: the whole split (872)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, help="default: the method's own default (full 1e-4, LoRA 5e-4)")
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument(
        "--seeds", type=lambda text: [int(x) for x in text.split(",")],
        help="comma-separated: repeat i runs both sides with the i-th seed (overrides --seed and --repeats); dev "
        "accuracy is then compared as the mean over seeds, since one 4,000-row run swings by 2-4 points",
    )  # fmt: skip
    parser.add_argument(
        "--set", action="append", default=[], help="recipe override for ours, e.g. training.precision=auto"
    )
    patch_help = "; ".join(f"{name}: {text}" for name, text in PATCHES.items())
    parser.add_argument(
        "--patch", action="append", default=[], choices=tuple(PATCHES),
        help=f"undo an engine choice in ours (side A), after setup: {patch_help}",
    )  # fmt: skip
    parser.add_argument("--peer-precision", choices=("fp32", "bf16"), default="fp32", help="the Trainer's")
    parser.add_argument(
        "--peer-set", action="append", default=[], help="with --peer ours: overrides for side B"
    )
    parser.add_argument(
        "--peer-patch",
        action="append",
        default=[],
        choices=tuple(PATCHES),
        help="with --peer ours: --patch for side B",
    )
    parser.add_argument("--log-dir", default=None, help="children's stderr (default: a temporary folder)")
    parser.add_argument("--json", help="also write every run's figures here")
    parser.add_argument(
        "--report", help="print the tables again from a --json file (the other options are ignored)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        args = parser.parse_args(saved["command"].split()[2:])
        print(f"$ {saved['command']}")
        # files written before one invocation could hold several pairs carry a single pair's "runs"
        pairs = saved.get("pairs") or [
            {"method": args.method[0], "peer": args.peer[0], "runs": saved["runs"]}
        ]
        report_all(pairs, args)
        return
    if args.child:
        cfg = json.loads(args.child)
        result = run_ours(cfg) if cfg["side"] == "ours" else run_peer(cfg)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    from hf_finetune.methods import get_method

    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench_train_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python scripts/bench_train.py", *sys.argv[1:]])
    print(f"$ {command}\n# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; batch {args.batch_size}, 1 epoch; "
          f"logs in {log_dir}", flush=True)  # fmt: skip
    pairs: list[dict[str, Any]] = []
    index = 0
    for method in args.method:
        for peer in args.peer:
            run_glue = peer == "run_glue"
            if run_glue and method not in args.run_glue_methods:
                continue
            lr = args.lr or get_method(method).defaults["lr"]
            rows = (args.run_glue_train_samples or args.train_samples) if run_glue else args.train_samples
            common = {
                "method": method, "train_samples": rows, "validation_samples": args.validation_samples,
                "batch_size": args.batch_size, "lr": lr, "warmup_ratio": args.warmup_ratio,
                "weight_decay": args.weight_decay, "seed": args.seed,
            }  # fmt: skip
            a = {**common, "side": "ours", "overrides": args.set, "patches": args.patch}
            b = (
                {**common, "side": "ours", "overrides": args.peer_set, "patches": args.peer_patch}
                if peer == "ours"
                else {**common, "side": "peer", "peer": peer, "peer_precision": args.peer_precision}
            )
            label_a, label_b = labels(args, peer)
            print(f"# {method}: A = {label_a}, B = {label_b}; lr {lr}, {rows} training rows", flush=True)
            runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
            repeats = args.run_glue_repeats if run_glue else (len(args.seeds) if args.seeds else args.repeats)
            for repeat in range(repeats):
                order = ("A", "B") if repeat % 2 == 0 else ("B", "A")
                seed = args.seeds[repeat % len(args.seeds)] if args.seeds else args.seed
                for side in order:
                    index += 1
                    run = spawn(side, {**(a if side == "A" else b), "seed": seed}, log_dir, index)
                    runs[side].append(run)
                    print(f"  run {index} {side}: {run['samples_per_s']:.1f} samples/s, acc {run['accuracy']:.4f}, "
                          f"train {run['train_s']:.1f} s, rss {run['peak_rss_mb']:.0f} MB, load {run['load_1min']:.2f}", flush=True)  # fmt: skip
            pairs.append({"method": method, "peer": peer, "train_samples": rows, "runs": runs})
            if args.json:  # after every pair, so an interrupted invocation keeps what it measured
                Path(args.json).write_text(json.dumps({"command": command, "pairs": pairs}, indent=1))
    report_all(pairs, args)


def report_all(pairs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    """One table per pair, then a summary of every pair's ratios, and LoRA's peak RSS against full fine-tuning's."""
    summary = []
    for pair in pairs:
        label_a, label_b = labels(args, pair["peer"])
        rows = pair.get("train_samples", args.train_samples)
        print(f"\n### {pair['method']}: {label_a} (A) against {label_b} (B), {rows} training rows")
        medians = report(pair["runs"], label_a, label_b, pair["method"])
        summary.append((pair, label_a, label_b, medians))
    print("\n### Summary (medians, dev accuracy the mean over runs; ratio = A / B)\n")
    print(
        "| method | A | B | rows | A samples/s | B samples/s | ratio | dev acc A / B (pts) | peak RSS A / B (MB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for pair, label_a, label_b, m in summary:
        a, b = m["A"], m["B"]
        print(f"| {pair['method']} | {label_a} | {label_b} | {pair.get('train_samples', args.train_samples)} | "
              f"{a['samples_per_s']:.1f} | {b['samples_per_s']:.1f} | **{a['samples_per_s'] / b['samples_per_s']:.2f}x** | "
              f"{a['accuracy']:.4f} / {b['accuracy']:.4f} ({100 * (a['accuracy'] - b['accuracy']):+.2f}) | "
              f"{a['peak_rss_mb']:,.0f} / {b['peak_rss_mb']:,.0f} |")  # fmt: skip
    # the same peer and row count on both sides, so the two methods' runs differ in the method only
    by_method = {
        (pair["method"], pair["peer"], pair.get("train_samples")): m["A"]["peak_rss_mb"]
        for pair, _, _, m in summary
    }
    for (method, peer, rows), rss in by_method.items():
        full = by_method.get(("full", peer, rows))
        if method == "lora" and full:
            print(f"\nPeak RSS of ours, LoRA / full fine-tuning (the runs paired with {peer}, {rows} rows): "
                  f"{rss:,.0f} / {full:,.0f} MB = **{rss / full:.2f}**")  # fmt: skip


def report(
    runs: dict[str, list[dict[str, Any]]], label_a: str, label_b: str, method: str
) -> dict[str, dict[str, float]]:
    flops, convention = model_flops_per_token(method)
    fp32_peak, bf16_peak, peak_note = machine_peak(max(r["threads"] for rs in runs.values() for r in rs))
    # medians of the timings; accuracy as the mean, which with --seeds averages over seeds
    medians = {
        side: {
            key: (statistics.mean if key == "accuracy" else statistics.median)(r[key] for r in rs)
            for key, _, _ in COLUMNS
        }
        for side, rs in runs.items()
    }
    header = "| run | " + " | ".join(title for _, title, _ in COLUMNS) + " | GFLOP/s | of fp32 peak |"
    print("\n" + header + "\n" + "|---" * (len(COLUMNS) + 3) + "|")
    for side, label in (("A", label_a), ("B", label_b)):
        for i, run in enumerate(runs[side], 1):
            print(table_row(f"{label} #{i}", run, flops, fp32_peak))
    for side, label in (("A", label_a), ("B", label_b)):
        print(table_row(f"**{label} median** (acc: mean)", medians[side], flops, fp32_peak))
    ratio = {key: medians["A"][key] / medians["B"][key] for key, _, _ in COLUMNS}
    print(
        "| **ratio A/B** | " + " | ".join(f"{ratio[key]:.2f}x" for key, _, _ in COLUMNS[:-1])
        + f" | {100 * (medians['A']['accuracy'] - medians['B']['accuracy']):+.2f} pts | | |"
    )  # fmt: skip
    print("Ratios are of the medians, A over B: above 1 for rates means A is faster, for times (s) that A is slower; "
          "accuracy as the difference in points.")  # fmt: skip
    print(f"\nModel FLOPs per real token: {flops / 1e6:.1f} MFLOP ({convention}); achieved FLOP/s = that x real "
          f"tokens / train time. {peak_note} Against the bf16 AMX peak the fractions are "
          f"{fp32_peak / bf16_peak:.3f}x those shown.")  # fmt: skip
    extra = {k: runs["B"][0][k] for k in ("optim", "precision", "threads", "malloc") if k in runs["B"][0]}
    print(f"A: precision {runs['A'][0]['precision']}, {runs['A'][0]['threads']} threads, "
          f"malloc {runs['A'][0].get('malloc', 'glibc')}, {runs['A'][0]['steps']} "
          f"steps; B: {extra}, {runs['B'][0]['steps']} steps; 1-minute load average at the end of each run "
          f"(a run alone on the machine adds about its thread count; more means it shared the cores): A {[round(r['load_1min'], 2) for r in runs['A']]}, "
          f"B {[round(r['load_1min'], 2) for r in runs['B']]}")  # fmt: skip
    return medians


if __name__ == "__main__":
    main()
