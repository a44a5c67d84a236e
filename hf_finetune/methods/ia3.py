"""IA3 (Liu et al. 2022, T-Few): learned vectors rescaling keys, values and feed-forward activations."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from peft import IA3Config
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
)

from hf_finetune.methods.base import Method, TaskInfo, peft_common

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig


class IA3(Method):
    name = "ia3"
    # T-Few uses lr 3e-3 with PEFT's per-architecture default target modules.
    defaults = {"lr": 3e-3}
    mergeable = True

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> IA3Config:
        return IA3Config(**peft_common(task, heads))

    def fit_config(self, config: IA3Config, model: torch.nn.Module) -> None:
        if config.target_modules is not None:
            return
        # PEFT knows IA3's targets per model type; a BERT2BERT EncoderDecoderModel ("encoder-decoder") takes its
        # encoder's, which the decoder shares
        kind = getattr(getattr(model.config, "encoder", None), "model_type", None)
        if kind in TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING:
            config.target_modules = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING[kind]
            config.feedforward_modules = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[kind]


METHOD = IA3()
