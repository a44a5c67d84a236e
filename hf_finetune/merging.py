"""`hf-finetune merge`: a trained adapter folded into a plain HF model folder that loads without PEFT."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from peft import PeftModel

from hf_finetune.checkpoint import INFO_NAME, find_model_dir, load_final
from hf_finetune.errors import InputError
from hf_finetune.hub import resolve_model
from hf_finetune.methods import METHODS, get_method


def merge_checkpoint(checkpoint: str | Path, output: Path) -> Path:
    """The trained run (its output_dir or model folder) folded into a plain model folder at `output`."""
    folder = find_model_dir(checkpoint)
    task, model, tokenizer, info = load_final(folder)
    if output.exists():  # before any work, so nothing is left behind
        raise InputError(f"merge: {output} already exists; choose a new --output")
    name = info["method"]
    method = get_method(name)
    if method.adds_virtual_tokens:
        raise InputError(
            f"merge: method '{name}' adds virtual tokens at run time; it has no weight update to fold into the model"
        )
    if not method.mergeable or not isinstance(model, PeftModel):
        mergeable = ", ".join(n for n, m in METHODS.items() if m.mergeable)
        raise InputError(f"merge: method '{name}' already saved a plain model; nothing to merge (mergeable: {mergeable})")
    base = resolve_model(info["base_model"], task.recipe.model.revision)
    # QLoRA folds its adapters into the dequantized base, loaded afresh
    model = method.merge_source(model, lambda: task.load_model(base), folder)
    merged = model.merge_and_unload()
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        full = next(n for n, m in METHODS.items() if m.saves_whole_model)
        (tmp / INFO_NAME).write_text(json.dumps({**info, "method": full, "merged_from": name}, indent=2))
        os.replace(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
