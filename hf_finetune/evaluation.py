"""`hf-finetune eval`: a saved checkpoint scored on the recipe's validation and test splits by the task's own evaluate."""

from __future__ import annotations

import dataclasses
from typing import Any

from accelerate import Accelerator

from hf_finetune.checkpoint import load_final
from hf_finetune.data import load_splits
from hf_finetune.recipe import Recipe
from hf_finetune.sampling import eval_loader
from hf_finetune.system import choose_precision, prepare_run


def evaluate_checkpoint(recipe: Recipe, checkpoint: str) -> dict[str, Any]:
    prepare_run()
    accelerator = Accelerator(mixed_precision=choose_precision(recipe.training.precision))
    task, model, tokenizer, info = load_final(checkpoint, recipe)
    if hasattr(task, "attach_tokenizer"):
        task.attach_tokenizer(tokenizer)
    raw = load_splits(dataclasses.replace(recipe.data, train=None))
    task.prepare(raw)
    encoded = task.preprocess(raw, tokenizer)
    model = accelerator.prepare(model)
    scores: dict[str, Any] = {"checkpoint": checkpoint, "method": info["method"]}
    for split, key in (("validation", "metrics"), ("test", "test_metrics")):
        if split in encoded:
            loader = accelerator.prepare(
                eval_loader(encoded[split], recipe.training.eval_batch, task.collator(tokenizer))
            )
            scores[key] = task.evaluate(model, loader, accelerator, split)
    return scores
