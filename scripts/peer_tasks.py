"""Our defaults against transformers' `Trainer` on the token-classification, regression and multi-label recipes.

    python scripts/peer_tasks.py                                      # all three recipes, full and LoRA, both sides
    python scripts/peer_tasks.py --recipes stsb --methods full
    python scripts/peer_tasks.py --recipes conll2003 --train-samples 3000   # a subset, e.g. to check the peer itself
    python scripts/peer_tasks.py --json docs/benchmarks/peer_tasks_raw.json  # also keep every figure
    python scripts/peer_tasks.py --recipes conll2003 --methods lora --seeds 1,2,3   # mean and spread over seeds

Both sides train the embedded MiniLM on the same rows (the recipe's train split, or its first --train-samples rows)
for one epoch with the same batch size (the recipe's) and seed, and score the recipe's validation and test splits.
With several `--seeds` each side runs once per seed (the seed draws the head, the data order and dropout) and the
table adds each side's mean and sample standard deviation: one epoch on a few thousand rows moves by a point or more
with the seed alone, so a single-seed gap of that size says nothing.

- ours: `hf-finetune train RECIPE method.name=M` with every default of the recipe and the method (learning rate,
  warm-up, weight decay, windows, thresholds tuned on validation).
- Trainer: `Trainer` as transformers' examples/pytorch run_ner.py and run_classification.py set it up, given dynamic
  padding (`DataCollatorForTokenClassification` / `DataCollatorWithPadding`): lr 5e-5, no warm-up, weight decay 0,
  linear decay, `max_seq_length` left to the model (512: nothing truncated), labels on the first sub-word, entity
  scores from seqeval, multi-label predictions at probability 0.5 (run_classification's `logit > 0`). For
  multi-label the table also gives the Trainer's figures with each label's threshold tuned on validation by our
  procedure, so that the comparison is of training and not of the decision rule. LoRA on the Trainer side:
  `peft.get_peft_model` with the very LoraConfig our lora method builds, at our LoRA learning rate (the example
  scripts have no LoRA, and at 5e-5 LoRA barely moves).

Each run is a fresh subprocess, one at a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "conll2003": REPO / "recipes" / "token_classification" / "conll2003.yaml",
    "stsb": REPO / "recipes" / "classification" / "stsb.yaml",
    "go_emotions": REPO / "recipes" / "classification" / "go_emotions.yaml",
}
PRIMARY = {"conll2003": "f1", "stsb": "pearson", "go_emotions": "f1_micro"}
RESULT_TAG = "PEER_RESULT "
TRAINER_LR = 5e-5  # TrainingArguments' default, which run_ner.py and run_classification.py keep


def run_ours(cfg: dict[str, Any]) -> dict[str, Any]:
    from hf_finetune.engine import train
    from hf_finetune.recipe import load_recipe

    overrides = [f"method.name={cfg['method']}", f"output_dir={cfg['out']}", f"training.seed={cfg['seed']}"]
    if cfg["train_samples"]:
        overrides.append(f"data.train.max_samples={cfg['train_samples']}")
    results = train(load_recipe(cfg["recipe"], overrides), overwrite=True)
    return {
        "validation": results["metrics"],
        "test": results.get("test_metrics", {}),
        "train_s": results["train_runtime_s"],
        "steps": results["steps"],
        "lr": results["recipe"]["training"]["lr"],
    }


def _splits(recipe: Any, train_samples: int | None) -> Any:
    from datasets import DatasetDict

    from hf_finetune.data import load_split

    splits = {}
    for name in ("train", "validation", "test"):
        split = getattr(recipe.data, name)
        if split is not None:
            splits[name] = load_split(split, f"data.{name}")
    if train_samples:
        splits["train"] = splits["train"].select(range(min(train_samples, len(splits["train"]))))
    return DatasetDict(splits)


def run_trainer(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from transformers import (
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
        AutoTokenizer,
        DataCollatorForTokenClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from hf_finetune.hub import resolve_model
    from hf_finetune.methods import apply_method, get_method, resolve_method
    from hf_finetune.metrics.classification.classification import (
        multi_label_scores,
        regression_scores,
        tune_thresholds,
    )
    from hf_finetune.recipe import MethodConfig, load_recipe

    recipe = load_recipe(cfg["recipe"], [f"training.seed={cfg['seed']}"])
    raw = _splits(recipe, cfg["train_samples"])
    c = recipe.data.columns
    set_seed(recipe.training.seed)  # before the model loads: the head's random init
    model_path = resolve_model(recipe.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    kind = cfg["name"]
    if kind == "conll2003":
        tags = sorted({t for row in raw["train"][c.tags] for t in row})
        ids = {t: i for i, t in enumerate(tags)}

        def encode(batch: dict[str, list]) -> dict[str, list]:
            # run_ner.py's tokenize_and_align_labels with label_all_tokens False
            enc = tokenizer(batch[c.tokens], is_split_into_words=True, truncation=True, max_length=512)
            labels = []
            for i, row in enumerate(batch[c.tags]):
                previous, out = None, []
                for word in enc.word_ids(i):
                    out.append(-100 if word is None or word == previous else ids[row[word]])
                    previous = word
                labels.append(out)
            enc["labels"] = labels
            return enc

        model = AutoModelForTokenClassification.from_pretrained(
            model_path, num_labels=len(tags), id2label=dict(enumerate(tags)), label2id=ids
        )
        collator = DataCollatorForTokenClassification(tokenizer)
        task_type, heads = "TOKEN_CLS", ("classifier",)
    else:
        names = sorted({v for row in raw["train"][c.label] for v in row}) if kind == "go_emotions" else []

        def encode(batch: dict[str, list]) -> dict[str, list]:
            pair = batch[c.text_pair] if c.text_pair else None
            enc = tokenizer(batch[c.text], pair, truncation=True, max_length=512)
            if kind == "go_emotions":
                enc["labels"] = [[float(n in row) for n in names] for row in batch[c.label]]
            else:
                enc["labels"] = [float(v) for v in batch[c.label]]
            return enc

        problem = "multi_label_classification" if kind == "go_emotions" else "regression"
        model = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=len(names) or 1, problem_type=problem
        )
        collator = DataCollatorWithPadding(tokenizer)
        task_type, heads = "SEQ_CLS", ("pooler.dense", "classifier")
    encoded = raw.map(encode, batched=True, remove_columns=raw["train"].column_names)
    steps = -(-len(encoded["train"]) // recipe.training.batch_size)
    lr = TRAINER_LR
    if cfg["method"] != "full":
        method_cfg = resolve_method(MethodConfig(name=cfg["method"]), steps)
        model, _ = apply_method(model, method_cfg, task_type, heads, steps)
        lr = get_method(cfg["method"]).defaults["lr"]

    with tempfile.TemporaryDirectory(prefix="peer_tasks_") as out:
        args = TrainingArguments(
            output_dir=out,
            use_cpu=True,
            per_device_train_batch_size=recipe.training.batch_size,
            per_device_eval_batch_size=2 * recipe.training.batch_size,
            learning_rate=lr,
            num_train_epochs=1,
            seed=recipe.training.seed,
            logging_steps=50,
            eval_strategy="no",
            save_strategy="no",
            report_to="none",
            label_names=["labels"],
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=encoded["train"], data_collator=collator, processing_class=tokenizer
        )
        train_s = trainer.train().metrics["train_runtime"]
        scores: dict[str, dict[str, float]] = {}
        logits = {split: trainer.predict(encoded[split]) for split in ("validation", "test") if split in encoded}
    if kind == "conll2003":
        from seqeval.metrics import f1_score, precision_score, recall_score

        for split, pred in logits.items():
            predicted, gold = [], []
            for row_logits, row_labels in zip(pred.predictions.argmax(-1), pred.label_ids, strict=True):
                keep = row_labels != -100
                predicted.append([tags[i] for i in row_logits[keep]])
                gold.append([tags[i] for i in row_labels[keep]])
            scores[split] = {
                "f1": f1_score(gold, predicted),
                "precision": precision_score(gold, predicted),
                "recall": recall_score(gold, predicted),
            }
    elif kind == "stsb":
        for split, pred in logits.items():
            scores[split] = regression_scores(pred.predictions[:, 0], pred.label_ids)
    else:
        probs = {split: 1 / (1 + np.exp(-pred.predictions)) for split, pred in logits.items()}
        tuned = tune_thresholds(probs["validation"], logits["validation"].label_ids)
        for split, pred in logits.items():
            at_half = multi_label_scores(probs[split] >= 0.5, pred.label_ids, names)
            at_tuned = multi_label_scores(probs[split] >= np.asarray(tuned), pred.label_ids, names)
            scores[split] = {
                "f1_micro": at_half["f1_micro"],
                "f1_macro": at_half["f1_macro"],
                "f1_micro_tuned": at_tuned["f1_micro"],
                "f1_macro_tuned": at_tuned["f1_macro"],
            }
    return {
        "validation": scores["validation"],
        "test": scores.get("test", {}),
        "train_s": train_s,
        "steps": trainer.state.global_step,
        "lr": lr,
    }


def child(cfg: dict[str, Any]) -> None:
    result = run_ours(cfg) if cfg["side"] == "ours" else run_trainer(cfg)
    print(RESULT_TAG + json.dumps(result, default=float), flush=True)


def spawn(cfg: dict[str, Any], log: Path) -> dict[str, Any]:
    start = time.perf_counter()
    with log.open("w") as f:
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(cfg)], stdout=subprocess.PIPE, stderr=f, text=True
        )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{cfg['side']} {cfg['name']} {cfg['method']} failed (exit {done.returncode}); see {log}")
    result = json.loads(lines[-1][len(RESULT_TAG) :])
    result["wall_s"] = time.perf_counter() - start
    return result


def fmt(scores: dict[str, float], key: str) -> str:
    value = scores.get(key)
    return f"{value:.4f}" if isinstance(value, float) else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--methods", default="full,lora", help="comma-separated methods (full, lora)")
    parser.add_argument("--sides", default="ours,trainer")
    parser.add_argument("--train-samples", type=int, default=None, help="train on the first N rows only")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the recipe's)")
    parser.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    logs = Path(tempfile.mkdtemp(prefix="peer_tasks_logs_"))
    rows = []
    for name in args.recipes.split(","):
        from hf_finetune.recipe import load_recipe

        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [load_recipe(RECIPES[name]).training.seed]
        for method in args.methods.split(","):
            for seed in seeds:
                for side in args.sides.split(","):
                    tag = f"{name}-{method}-{side}-seed{seed}"
                    cfg = {
                        "name": name,
                        "recipe": str(RECIPES[name]),
                        "method": method,
                        "side": side,
                        "seed": seed,
                        "train_samples": args.train_samples,
                        "out": str(logs / tag),
                    }
                    print(f"peer_tasks: {name} {method} {side} seed {seed} ...", file=sys.stderr, flush=True)
                    result = spawn(cfg, logs / f"{tag}.log")
                    rows.append({**cfg, **result})
                    if args.json:  # after every run, so an interrupted invocation keeps what it measured
                        args.json.write_text(json.dumps(rows, indent=2, default=float) + "\n")
    print("| recipe | method | side | seed | lr | steps | train s | validation | test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = PRIMARY[r["name"]]
        cells = [r["name"], r["method"], r["side"], str(r["seed"]), f"{r['lr']:g}", str(r["steps"])]
        val, test = fmt(r["validation"], key), fmt(r["test"], key)
        if f"{key}_tuned" in r["validation"]:
            val += f" (tuned {fmt(r['validation'], key + '_tuned')})"
            test += f" (tuned {fmt(r['test'], key + '_tuned')})"
        print("| " + " | ".join([*cells, f"{r['train_s']:.0f}", f"{key} {val}", f"{key} {test}"]) + " |")
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["name"], r["method"], r["side"]), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        print("\n| recipe | method | side | seeds | validation mean ± std | test mean ± std |")
        print("|---|---|---|---|---|---|")
        for (name, method, side), group in groups.items():
            key = PRIMARY[name]
            cells = [name, method, side, str(len(group))]
            for split in ("validation", "test"):
                values = [r[split][key] for r in group if isinstance(r[split].get(key), float)]
                cells.append(f"{key} {mean_std(values)}" if values else "-")
            print("| " + " | ".join(cells) + " |")
    print(f"logs: {logs}", file=sys.stderr)


def mean_std(values: list[float]) -> str:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.4f} ± {std:.4f}"


if __name__ == "__main__":
    main()
