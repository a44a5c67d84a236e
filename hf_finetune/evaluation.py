"""`hf-finetune eval`: a saved checkpoint scored on the recipe's validation and test splits by the task's own evaluate."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from hf_finetune.checkpoint import load_final, write_jsonl_atomic
from hf_finetune.data import load_splits
from hf_finetune.device import cpu_process_settings, padding_for
from hf_finetune.recipe import Recipe
from hf_finetune.sampling import eval_loader
from hf_finetune.system import choose_precision, prepare_run


def evaluate_checkpoint(recipe: Recipe, checkpoint: str, predictions: Path | None = None) -> dict[str, Any]:
    """The checkpoint's metrics per split; with `predictions`, also each example's row in `predictions/<split>.jsonl`
    (the rows training writes to `output_dir/predictions/`)."""
    t = recipe.training
    prepare_run()
    accelerator = Accelerator(mixed_precision=choose_precision(t.precision))
    on_cpu = accelerator.device.type == "cpu"
    with cpu_process_settings(on_cpu and t.cpu_tuning == "auto"):
        # the padding of this process's device, as training on it would pad
        padding = padding_for(accelerator.device.type, accelerator.mixed_precision, t.cpu_tuning)
        task, model, _, info = load_final(checkpoint, recipe, padding)
        raw = load_splits(dataclasses.replace(recipe.data, train=None))
        task.prepare(raw)
        encoded = task.preprocess(raw)
        model = accelerator.prepare(model)
        scores: dict[str, Any] = {"checkpoint": checkpoint, "method": info["method"]}
        for split, key in (("validation", "metrics"), ("test", "test_metrics")):
            if split in encoded:
                loader = accelerator.prepare(eval_loader(encoded[split], t.eval_batch, task.collator()))
                records: list[dict] | None = [] if predictions else None
                scores[key] = task.evaluate(model, loader, accelerator, split, records=records)
                if records is not None and accelerator.is_main_process:
                    write_jsonl_atomic(predictions / f"{split}.jsonl", records)
    return scores
