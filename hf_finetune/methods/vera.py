"""VeRA (Kopiczko et al. 2024): one pair of frozen random low-rank matrices shared by every adapted layer, and only
two scaling vectors per layer trained, through PEFT's `VeraConfig`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import VeraConfig
from transformers.pytorch_utils import Conv1D

from hf_finetune.methods.base import ALL_LINEAR, Method, TaskInfo, peft_common

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig


class VeRA(Method):
    name = "vera"
    # r 256 as the paper's RoBERTa-large GLUE runs (also PEFT's VeraConfig default); the scaling vector d starts at
    # 0.1 (the paper's ablation favours small initial values; PEFT's default), b at 0, so training starts at the base
    # model. Every linear layer as for LoRA: PEFT shares one projection sized for the largest layer and slices it.
    # Only the scaling vectors train, so they need a larger step than LoRA: on SST-2/MiniLM (4,000 examples, 1 epoch,
    # seed 42) lr 5e-3 0.741, 1e-2 0.776, 2e-2 0.819, 5e-2 0.811 (docs/benchmarks.md, "LoKr and VeRA learning rates").
    defaults = {"lr": 2e-2, "r": 256, "dropout": 0.0, "target_modules": ALL_LINEAR}
    mergeable = True

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> VeraConfig:
        return VeraConfig(
            **peft_common(task, heads),
            r=cfg.r,
            vera_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            d_initial=0.1,
            # the projection is saved with the adapter: reloading does not depend on regenerating the same random
            # matrices from the seed on another machine or torch version
            save_projection=True,
        )

    def fit_config(self, config: VeraConfig, model: torch.nn.Module) -> None:
        # GPT-2 stores its linear layers transposed (Conv1D); PEFT flips the flag itself, with a warning
        config.fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())


METHOD = VeRA()
