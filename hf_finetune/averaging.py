"""`hf-finetune average RUN --last K --output DIR`: the element-wise mean of a full fine-tuning run's final weights
and its newest saved checkpoints, written as a model folder that `eval`, `predict` and `model.name_or_path` take.

Averaging the last checkpoints of a Transformer trained from scratch is a standard, free gain for translation: the
Transformer paper averaged the last 5 (base) or 20 (big) checkpoints, and fairseq ships
`scripts/average_checkpoints.py` for it. transformers and accelerate have no such tool; this is ours.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hf_finetune.checkpoint import INFO_NAME, complete_checkpoints, find_model_dir, load_final
from hf_finetune.errors import InputError
from hf_finetune.methods import get_method


def average_run(run: str | Path, last: int, output: Path) -> dict[str, Any]:
    """Average the final model with the `last - 1` newest checkpoints under `run/checkpoints` (the model files of
    `accelerate.save_state`). Returns what was averaged."""
    if last < 2:
        raise InputError(f"average: --last must be at least 2 (got {last})")
    if output.exists():
        raise InputError(f"average: {output} already exists; choose a new --output")
    model_dir = find_model_dir(run)
    _, model, tokenizer, info = load_final(model_dir)
    if not get_method(info["method"]).saves_whole_model:
        raise InputError(f"average: {model_dir} holds a '{info['method']}' run; only whole models are averaged")
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    # tied weights (embeddings and output layer) are one tensor under several names: count each tensor once
    distinct: dict[int, str] = {}
    for name, tensor in state.items():
        distinct.setdefault(tensor.data_ptr(), name)
    total = {name: state[name].detach().double().clone() for name in distinct.values()}
    sources = [str(model_dir)]
    for checkpoint in reversed(complete_checkpoints(model_dir.parent)):
        if len(sources) == last:
            break
        weights = load_file(str(checkpoint / "model.safetensors"))
        missing = sorted(set(total) - set(weights))
        if missing:
            raise InputError(f"average: {checkpoint}/model.safetensors lacks {missing[:3]}; not this run's model?")
        if all(torch.equal(weights[k], state[k]) for k in total):
            continue  # the checkpoint at the final step: the final model already counts it
        for name in total:
            total[name] += weights[name].double()
        sources.append(str(checkpoint))
    if len(sources) < last:
        raise InputError(f"average: {model_dir.parent} has {len(sources)} distinct saved weights, fewer than {last}")
    with torch.no_grad():
        for name, summed in total.items():
            state[name].copy_((summed / len(sources)).to(state[name].dtype))
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INFO_NAME).write_text(json.dumps({**info, "averaged_from": sources}, indent=2, default=str))
    os.replace(tmp, output)
    return {"output": str(output), "averaged_from": sources}
