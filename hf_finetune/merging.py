"""`hf-finetune merge`: a LoRA-family adapter folded into a plain HF model folder that loads without PEFT."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from peft import PeftModel

from hf_finetune.checkpoint import INFO_NAME
from hf_finetune.errors import InputError

MERGEABLE = ("lora", "dora", "adalora", "ia3")


def merge_checkpoint(loaded: tuple[Any, Any, Any, dict], output: Path) -> Path:
    _, model, tokenizer, info = loaded
    method = info["method"]
    if method in ("prefix", "prompt"):
        raise InputError(
            f"merge: method '{method}' adds virtual tokens at run time; it has no weight update to fold into the model"
        )
    if method not in MERGEABLE or not isinstance(model, PeftModel):
        raise InputError(f"merge: method '{method}' already saved a plain model; nothing to merge")
    merged = model.merge_and_unload()
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / INFO_NAME).write_text(json.dumps({**info, "method": "full", "merged_from": method}, indent=2))
    if output.exists():
        raise InputError(f"merge: {output} already exists; choose a new --output")
    os.replace(tmp, output)
    return output
