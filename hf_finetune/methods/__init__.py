"""Methods turn a loaded model into the trainable one. Each lives in its own module as one `Method` object
(`base.py` has the shape, `registry.py` the list); PEFT configs are built there and nowhere else."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from peft import PeftConfig, PeftModel
from peft.optimizers import create_loraplus_optimizer

from hf_finetune.errors import InputError
from hf_finetune.methods.base import ALL_LINEAR, DEFAULT_WARMUP_RATIO, Method, TaskInfo
from hf_finetune.methods.registry import METHOD_NAMES, METHODS, get_method

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig

StepHook = Callable[[torch.nn.Module, int], None]

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_WARMUP_RATIO",
    "METHODS",
    "METHOD_NAMES",
    "Method",
    "TaskInfo",
    "apply_method",
    "build_optimizer",
    "build_peft_config",
    "get_method",
    "param_groups",
    "resolve_method",
]


def resolve_method(cfg: MethodConfig, total_steps: int) -> MethodConfig:
    """The recipe's method section with every unset field filled from the method's defaults."""
    return get_method(cfg.name).resolve(cfg, total_steps)


def check_method(cfg: MethodConfig, total_steps: int) -> None:
    problems = get_method(cfg.name).check(cfg, total_steps)
    if problems:
        raise InputError("; ".join(problems))


def build_peft_config(
    cfg: MethodConfig, task_type: str | None, total_steps: int, heads: list[str] | None = None
) -> PeftConfig | None:
    """PEFT's config for the resolved `cfg`, or None where PEFT is not involved (full fine-tuning)."""
    check_method(cfg, total_steps)
    return get_method(cfg.name).peft_config(cfg, TaskInfo(task_type, (), total_steps), heads or [])


def apply_method(
    model: torch.nn.Module, cfg: MethodConfig, task_type: str | None, head_modules: tuple[str, ...], total_steps: int
) -> tuple[torch.nn.Module, StepHook | None]:
    """The trainable model for the resolved `cfg`, and the method's per-step hook (None when it has none)."""
    check_method(cfg, total_steps)
    method = get_method(cfg.name)
    return method.apply(model, cfg, TaskInfo(task_type, tuple(head_modules), total_steps)), method.on_step_end


def build_optimizer(
    model: torch.nn.Module, cfg: MethodConfig, lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW; with LoRA+ the B matrices get their own, larger learning rate (PEFT's own LoRA+ grouping).

    `fused`: torch's single-kernel AdamW (CPU and CUDA) instead of a Python loop over every parameter tensor; the
    update is the same up to float rounding. transformers' Trainer uses it by default since torch 2.8."""
    if cfg.loraplus_lr_ratio and cfg.loraplus_lr_ratio != 1 and isinstance(model, PeftModel):
        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=lr,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
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
