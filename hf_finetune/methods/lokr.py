"""LoKr (LyCORIS; Yeh et al. 2023): the weight update as a Kronecker product of two small factors, the larger one
low-rank, through PEFT's `LoKrConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import LoKrConfig

from hf_finetune.errors import InputError
from hf_finetune.methods.base import ALL_LINEAR, Method, TaskInfo, peft_common

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig


class LoKr(Method):
    name = "lokr"
    # r 8, alpha 8 (scale 1), no rank or module dropout: PEFT's LoKrConfig defaults; the LyCORIS paper studies image
    # models only and gives no text settings. Every linear layer as for LoRA, so the two compare on the same modules.
    # lr on SST-2/MiniLM (4,000 examples, 1 epoch, seed 42): 2e-3 0.791, 5e-3 0.814, 1e-2 0.782 (docs/benchmarks.md,
    # "LoKr and VeRA learning rates").
    defaults = {"lr": 5e-3, "r": 8, "alpha": 8, "dropout": 0.0, "target_modules": ALL_LINEAR}
    mergeable = True

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> LoKrConfig:
        return LoKrConfig(
            **peft_common(task, heads),
            r=cfg.r,
            alpha=cfg.alpha,
            rank_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
        )

    def apply(self, model: torch.nn.Module, cfg: MethodConfig, task: TaskInfo) -> torch.nn.Module:
        try:
            return super().apply(model, cfg, task)
        except TypeError as err:  # PEFT 0.21's LoKr takes Linear and Conv2d layers only, not GPT-2's Conv1D
            raise InputError(f"method.name: lokr cannot adapt {type(model).__name__}: {err}") from err


METHOD = LoKr()
