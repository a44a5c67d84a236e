"""What a run writes and reads back: metrics log, resumable state, the final model folder, results.json.

Everything lands in a temporary sibling first and is renamed into place, so a crash mid-write never leaves a
file or folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from hf_finetune.errors import InputError
from hf_finetune.hub import resolve_model
from hf_finetune.methods.prefix import PREFIX_CONFIG_NAME, PrefixTuningModel
from hf_finetune.recipe import Recipe, recipe_from_dict
from hf_finetune.tasks import Task, get_task

INFO_NAME = "hf_finetune.json"
STATE_NAME = "trainer_state.json"


class MetricsLog:
    """metrics.jsonl on the main process, and the same values to accelerate's trackers (TensorBoard)."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, record: dict[str, Any]) -> None:
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def save_state(accelerator: Accelerator, out: Path, step: int) -> Path:
    """Model/adapter, optimizer, scheduler, RNG and sampler states for `training.resume`."""
    final = out / "checkpoints" / f"step_{step:08d}"
    tmp = final.with_name(f".{final.name}.tmp")
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / STATE_NAME).write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_latest(accelerator: Accelerator, out: Path) -> int:
    """Restore the newest complete checkpoint; returns its optimizer step (0 when there is none)."""
    done = sorted(p for p in (out / "checkpoints").glob("step_*") if (p / STATE_NAME).exists())
    if not done:
        return 0
    accelerator.load_state(str(done[-1]))
    return json.loads((done[-1] / STATE_NAME).read_text())["step"]


def save_final(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    recipe: Recipe,
    method: str,
    target: Path,
) -> None:
    """HF-format folder: adapter only for PEFT methods, the whole model (safetensors) for full fine-tuning."""
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    info = {
        "task": recipe.task,
        "method": method,
        "base_model": recipe.model.name_or_path,
        "recipe": recipe.to_dict(),
    }
    (tmp / INFO_NAME).write_text(json.dumps({**info, **task.checkpoint_info()}, indent=2, default=str))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def find_model_dir(path: str | Path) -> Path:
    """Accept a run's output_dir or its model folder."""
    path = Path(path)
    for candidate in (path, path / "model"):
        if (candidate / INFO_NAME).exists():
            return candidate
    raise InputError(
        f"checkpoint: {path} holds no {INFO_NAME} (expected a run's output_dir or its model/ folder)"
    )


def load_final(path: str | Path, recipe: Recipe | None = None) -> tuple[Task, torch.nn.Module, Any, dict]:
    """(task, model, tokenizer, info) from a folder `save_final` wrote; the recipe defaults to the one saved there."""
    folder = find_model_dir(path)
    info = json.loads((folder / INFO_NAME).read_text())
    recipe = recipe or recipe_from_dict(info["recipe"], source=str(folder / INFO_NAME))
    task = get_task(recipe)
    task.restore(info)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if (folder / "adapter_config.json").exists():
        base = task.load_model(resolve_model(info["base_model"], recipe.model.revision))
        model = PeftModel.from_pretrained(base, folder)
    elif (folder / PREFIX_CONFIG_NAME).exists():
        base = task.load_model(resolve_model(info["base_model"], recipe.model.revision))
        model = PrefixTuningModel.from_pretrained(base, folder)
    else:
        model = task.load_model(str(folder))
    return task, model.eval(), tokenizer, info
