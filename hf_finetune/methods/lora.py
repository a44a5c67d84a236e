"""LoRA (Hu et al. 2021): trainable low-rank updates beside frozen linear layers, through PEFT's `LoraConfig`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from peft import LoraConfig

from hf_finetune.methods.base import ALL_LINEAR, Method, TaskInfo, peft_common

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig


class LoRA(Method):
    name = "lora"
    # alpha = 2r (common practice, e.g. the PEFT LoRA guides); lr 5e-4 as the LoRA paper's RoBERTa-base GLUE runs (Hu
    # et al. 2021, Table 9: 4e-4..5e-4). Measured on SST-2/MiniLM, batch 16, warm-up 10%: lr 1e-3 is on the edge of
    # divergence (4,000 examples, seeds 42/1/2/3: 0.830/0.601/0.805/0.794; the full 67k epoch 0.851), 5e-4 is not
    # (4,000: 0.795/0.821/0.825; 16,000: 0.877; 67k: 0.888). lr >= 2e-3 at r=32 diverged to chance. Dropout 0.05 gains
    # ~1 point here (0 at lr 5e-4: 0.801/0.809/0.819); on a CPU it costs 10-20% of a bf16 step even with
    # hf_finetune.dropout, ~30% with torch's (scripts/profile_step.py --method lora [--dropout 0] [--torch-dropout]).
    defaults = {"lr": 5e-4, "r": 32, "alpha": 64, "dropout": 0.05, "target_modules": ALL_LINEAR}
    mergeable = True
    in_default_comparison = True
    use_dora = False
    trains_new_tokens = True

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> LoraConfig:
        return LoraConfig(
            **peft_common(task, heads),
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            use_dora=self.use_dora,
            # the new rows only (and the tied output rows with them), not the whole embedding matrix
            trainable_token_indices=list(task.new_token_ids) or None,
        )

    def budget_overrides(self, cfg: MethodConfig) -> list[str]:
        lora = self.resolve(cfg, total_steps=1)
        return [f"method.r={lora.r}", f"method.target_modules={json.dumps(lora.target_modules)}"]


METHOD = LoRA()
