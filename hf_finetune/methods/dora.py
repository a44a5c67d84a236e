"""DoRA (Liu et al. 2024): LoRA with the weight decomposed into magnitude and direction (PEFT's `use_dora`)."""

from __future__ import annotations

from hf_finetune.methods.base import ALL_LINEAR
from hf_finetune.methods.lora import LoRA


class DoRA(LoRA):
    name = "dora"
    # LoRA's settings with weight decomposition; the paper uses LoRA's lr or half of it.
    defaults = {"lr": 5e-4, "r": 32, "alpha": 64, "dropout": 0.05, "target_modules": ALL_LINEAR}
    in_default_comparison = False
    use_dora = True

    def budget_overrides(self, cfg):  # type: ignore[override]
        return []


METHOD = DoRA()
