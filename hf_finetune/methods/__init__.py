"""Methods turn a loaded model into the trainable one. PEFT configs are built here and nowhere else.

`apply_method` returns the model to train and an optional `on_step_end(model, step)` hook that the engine calls
after every optimizer step (AdaLoRA's rank reallocation). Full fine-tuning has no PEFT config.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoraConfig,
    PeftConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptTuningConfig,
    get_peft_model,
)
from peft.optimizers import create_loraplus_optimizer
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)

from hf_finetune.errors import InputError
from hf_finetune.methods.defaults import ALL_LINEAR, DEFAULT_WARMUP_RATIO, METHOD_DEFAULTS
from hf_finetune.methods.prefix import (
    EncoderPromptModel,
    PrefixConfig,
    PrefixTuningModel,
    PromptConfig,
    SoftPromptWrapper,
    supports_native_prefix,
)
from hf_finetune.recipe import MethodConfig

StepHook = Callable[[torch.nn.Module, int], None]
METHOD_NAMES = tuple(METHOD_DEFAULTS)


def default_lr(method: str) -> float:
    return METHOD_DEFAULTS[method]["lr"]


def default_warmup_ratio(method: str) -> float:
    return METHOD_DEFAULTS[method].get("warmup_ratio", DEFAULT_WARMUP_RATIO)


def resolve_method(method: MethodConfig, total_steps: int) -> MethodConfig:
    """The recipe's method section with every unset field filled from the method's defaults (what results.json shows)."""
    defaults = METHOD_DEFAULTS[method.name]
    filled = {k: v for k, v in defaults.items() if k in {f.name for f in dataclasses.fields(MethodConfig)}}
    if method.name == "adalora":
        # AdaLoRA's schedule is given in steps; derived from the run's length so it fits any budget
        filled["tinit"] = max(1, int(defaults["tinit_frac"] * total_steps))
        filled["tfinal"] = max(1, int(defaults["tfinal_frac"] * total_steps))
        filled["deltaT"] = max(1, int(defaults["deltaT_frac"] * total_steps))
    given = {k: v for k, v in dataclasses.asdict(method).items() if v is not None}
    return dataclasses.replace(MethodConfig(), **{**filled, **given})


def build_peft_config(
    method: MethodConfig, task_type: str, total_steps: int, heads: list[str] | None = None
) -> PeftConfig | None:
    """PEFT's config for `method` (already resolved), or None for full fine-tuning.

    `heads` are the task's freshly initialised (or never task-trained) modules, trained in full with every method."""
    common = {"task_type": task_type, "modules_to_save": heads or None}
    lora_like = {
        "r": method.r,
        "lora_alpha": method.alpha,
        "lora_dropout": method.dropout,
        "target_modules": method.target_modules,
    }
    match method.name:
        case "full":
            return None
        case "lora":
            return LoraConfig(**common, **lora_like)
        case "dora":
            return LoraConfig(**common, **lora_like, use_dora=True)
        case "adalora":
            if method.tinit + method.tfinal >= total_steps:
                raise InputError(
                    f"method.tinit ({method.tinit}) + method.tfinal ({method.tfinal}) must be below the run's "
                    f"{total_steps} optimizer steps: AdaLoRA needs steps in between to reallocate ranks"
                )
            return AdaLoraConfig(
                **common,
                init_r=method.r,
                target_r=method.target_r,
                lora_alpha=method.alpha,
                lora_dropout=method.dropout,
                target_modules=method.target_modules,
                tinit=method.tinit,
                tfinal=method.tfinal,
                deltaT=method.deltaT,
                beta1=0.85,
                beta2=0.85,
                orth_reg_weight=method.orth_reg_weight,
                total_step=total_steps,
            )
        case "prefix":
            return PrefixTuningConfig(
                **common,
                num_virtual_tokens=method.num_virtual_tokens,
                prefix_projection=method.prefix_projection,
                encoder_hidden_size=method.encoder_hidden_size,
            )
        case "prompt":
            return PromptTuningConfig(**common, num_virtual_tokens=method.num_virtual_tokens)
        case "ia3":
            return IA3Config(**common)
    raise ValueError(f"unknown method {method.name}")


def apply_method(
    model: torch.nn.Module,
    method: MethodConfig,
    task_type: str,
    head_modules: tuple[str, ...],
    total_steps: int,
) -> tuple[torch.nn.Module, StepHook | None]:
    freeze_unsaved(model)
    names = [name for name, _ in model.named_modules()]
    heads = [h for h in head_modules if any(n == h or n.endswith(f".{h}") for n in names)]
    if method.target_modules == ALL_LINEAR:
        # adapters on every linear layer already reach the pooler; training it in full as well hurt LoRA on SST-2
        # (0.78 -> 0.72 at lr 2e-3)
        heads = [h for h in heads if not h.startswith("pooler")]
    if method.name == "prefix" and not supports_native_prefix(model):
        # PEFT 0.21 refuses prefix tuning on encoders and *ForSequenceClassification ("Model does not support past
        # key values"), so these go through our own cache-based prefix module.
        config = PrefixConfig(
            num_virtual_tokens=method.num_virtual_tokens,
            prefix_projection=method.prefix_projection,
            encoder_hidden_size=method.encoder_hidden_size,
            modules_to_save=heads,
            prefix_dropout=method.dropout or 0.0,
        )
        return PrefixTuningModel(model, config), None
    if method.name == "prompt" and model.config.model_type == "encoder-decoder":
        # PEFT 0.21 refuses prompt tuning on a BERT2BERT EncoderDecoderModel as it does prefix tuning
        return EncoderPromptModel(model, PromptConfig(method.num_virtual_tokens, modules_to_save=heads)), None
    peft_config = build_peft_config(method, task_type, total_steps, heads)
    if peft_config is None:
        return model, None
    if isinstance(peft_config, IA3Config) and peft_config.target_modules is None:
        # PEFT knows IA3's targets per model type; a BERT2BERT EncoderDecoderModel ("encoder-decoder") takes its
        # encoder's, which the decoder shares
        kind = getattr(getattr(model.config, "encoder", None), "model_type", None)
        if kind in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            peft_config.target_modules = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[kind]
            peft_config.feedforward_modules = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[kind]
    peft_model = get_peft_model(model, peft_config)
    if method.name == "adalora":
        return peft_model, AdaLoraStep()
    return peft_model, None


def leave_input_casts_to_autocast(model: torch.nn.Module) -> int:
    """Stop PEFT layers casting their input to the adapter weights' dtype; returns how many layers there were.

    Under mixed precision, autocast picks every op's dtype, and PEFT's cast of a bf16 input (an attention context, a
    GELU output) to the fp32 adapter weights only adds a bf16 -> fp32 -> bf16 round trip: the dropout's scaling rounds
    once either way and autocast casts back for the matmul, so the results are bit-identical (tests/test_dropout.py).
    Skipping it made a LoRA step on MiniLM in bf16 5-10% faster and its peak RSS ~60 MB lower (issue #8). This is
    `peft.helpers.disable_input_dtype_casting` left on for the whole run."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


def freeze_unsaved(model: torch.nn.Module) -> list[str]:
    """Freeze the parameters `save_pretrained` leaves out (`_keys_to_ignore_on_save`), which `from_pretrained` rebuilds.

    transformers 5 leaves Marian's sinusoidal position tables trainable (`requires_grad` is True after
    `from_pretrained` despite the module's `_freeze=True`), yet never saves them. Trained, they made the reloaded
    model differ from the evaluated one (Multi30k test BLEU 36.79 in the run, 36.49 after reloading)."""
    patterns = getattr(model, "_keys_to_ignore_on_save", None) or []
    frozen = []
    for name, param in model.named_parameters():
        if param.requires_grad and any(re.search(k, name) for k in patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def virtual_positions(method: MethodConfig, decoder_only: bool, generative: bool) -> int:
    """Positions the method's virtual tokens take before the text, as `apply_method` routes it: prompt tuning's soft
    tokens always; PEFT's prefix on a generative decoder numbers the text after its cache; our own prefix (encoders,
    classification and QA heads, BERT2BERT) keeps the text's positions from 0."""
    if method.name == "prompt" or (method.name == "prefix" and decoder_only and generative):
        return resolve_method(method, total_steps=1).num_virtual_tokens
    return 0


def build_optimizer(
    model: torch.nn.Module, method: MethodConfig, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW; with LoRA+ the B matrices get their own, larger learning rate (PEFT's own LoRA+ grouping).

    `fused`: torch's single-kernel AdamW (CPU and CUDA) instead of a Python loop over every parameter tensor; the
    update is the same up to float rounding. transformers' Trainer uses it by default since torch 2.8."""
    if method.loraplus_lr_ratio and method.loraplus_lr_ratio != 1 and isinstance(model, PeftModel):
        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=method.loraplus_lr_ratio,
            loraplus_weight_decay=weight_decay,
            fused=fused,
        )
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=fused)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and norm weights, as in BERT's and transformers' Trainer recipe."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class AdaLoraStep:
    """AdaLoRA's per-step hook. Its rank allocator keeps running sensitivity averages outside the model's parameters,
    so they are checkpoint state of their own: without them a resumed run would allocate ranks differently."""

    STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")

    def __call__(self, model: torch.nn.Module, step: int) -> None:
        # AdaLoRA only prunes and reallocates ranks when told the step after every optimizer step, gradients present
        model.base_model.update_and_allocate(step)

    def state_dict(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        allocator = model.base_model.rankallocator
        tensors = {f"{kind}/{name}": t for kind in self.STATS for name, t in getattr(allocator, kind).items()}
        return tensors, {"rank_pattern": model.peft_config["default"].rank_pattern}

    def load_state_dict(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        allocator = model.base_model.rankallocator
        device = next(model.parameters()).device
        for kind in self.STATS:
            getattr(allocator, kind).clear()
        for key, tensor in tensors.items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = tensor.to(device)
        model.peft_config["default"].rank_pattern = meta["rank_pattern"]


def is_peft(model: torch.nn.Module) -> bool:
    return isinstance(model, PeftModel | SoftPromptWrapper)
