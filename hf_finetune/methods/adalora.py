"""AdaLoRA (Zhang et al. 2023): LoRA whose rank budget is pruned and reallocated across layers during training.

Its allocator runs after every optimizer step (`on_step_end`) and keeps running sensitivity averages outside the
model's parameters, so they are checkpoint state of their own (`extra_state`): without them a resumed run would
allocate ranks differently.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import AdaLoraConfig
from peft.utils import PeftType
from safetensors import safe_open

from hf_finetune.methods.base import ALL_LINEAR, Method, TaskInfo, peft_common
from hf_finetune.methods.lora import METHOD as LORA

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig

STATS = ("ipt", "exp_avg_ipt", "exp_avg_unc")


class AdaLoRA(Method):
    name = "adalora"
    adds_loss_term = True  # PEFT's AdaLoraModel adds orth_reg_weight x its orthogonality penalty to the loss
    # Zhang et al. 2023, Table 10 for GLUE: init_r 12 pruned to an average of 8, beta1 = beta2 = 0.85, orth_reg_weight
    # 0.1; tinit/tfinal/deltaT given there in steps for long runs, here as fractions of this run's steps. Measured on
    # SST-2/MiniLM, batch 16: 4,000 examples, seeds 42/1/2, lr 2e-3 0.810/0.804/0.810, 5e-3 0.814/0.807/0.798; 16,000
    # examples lr 1e-3 0.843, 2e-3 0.859, 5e-3 0.853; the full 67k epoch lr 2e-3 0.888 (as LoRA), 5e-3 0.876, 1e-2
    # diverged to chance after warm-up.
    defaults = {
        "lr": 2e-3,
        "r": 12,
        "target_r": 8,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": ALL_LINEAR,
        "orth_reg_weight": 0.1,
    }
    schedule = {"tinit": 0.1, "tfinal": 0.2, "deltaT": 0.01}
    """Fractions of the run's optimizer steps, so the schedule fits any budget."""
    mergeable = True
    in_default_comparison = True

    def resolved_defaults(self, total_steps: int) -> dict[str, Any]:
        return {**self.defaults, **{k: max(1, int(f * total_steps)) for k, f in self.schedule.items()}}

    def check(self, cfg: MethodConfig, total_steps: int) -> list[str]:
        if cfg.tinit + cfg.tfinal >= total_steps:
            return [
                f"method.tinit ({cfg.tinit}) + method.tfinal ({cfg.tfinal}) must be below the run's "
                f"{total_steps} optimizer steps: AdaLoRA needs steps in between to reallocate ranks"
            ]
        return []

    def peft_config(self, cfg: MethodConfig, task: TaskInfo, heads: list[str]) -> AdaLoraConfig:
        return AdaLoraConfig(
            **peft_common(task, heads),
            init_r=cfg.r,
            target_r=cfg.target_r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=cfg.target_modules,
            tinit=cfg.tinit,
            tfinal=cfg.tfinal,
            deltaT=cfg.deltaT,
            beta1=0.85,
            beta2=0.85,
            orth_reg_weight=cfg.orth_reg_weight,
            total_step=task.total_steps,
        )

    def budget_overrides(self, cfg: MethodConfig) -> list[str]:
        """AdaLoRA trains init_r-rank triplets (A, E, B) and prunes them to an average of target_r, so init_r takes
        LoRA's rank and target_r two thirds of it (the paper's 12 -> 8); both adapt the same modules."""
        lora = LORA.resolve(cfg, total_steps=1)
        return [
            f"method.r={lora.r}",
            f"method.target_r={max(1, round(2 * lora.r / 3))}",
            f"method.target_modules={json.dumps(lora.target_modules)}",
        ]

    def on_step_end(self, model: torch.nn.Module, step: int) -> None:
        # AdaLoRA only prunes and reallocates ranks when told the step after every optimizer step, gradients present
        model.base_model.update_and_allocate(step)

    def on_train_end(self, model: torch.nn.Module) -> None:
        """Resize every layer to the ranks its rank pattern keeps, as `PeftModel.from_pretrained` does with the saved
        adapter: a masked full-rank layer sums its products in another order than the resized one, so the evaluated
        and the reloaded model would differ in the last bits. PEFT's own `resize_modules_by_rank_pattern`; idempotent.
        Not during training: the optimizer would lose track of the resized parameters."""
        tuner = model.base_model
        for adapter, config in model.peft_config.items():
            if config.peft_type != PeftType.ADALORA or not config.rank_pattern:
                continue
            shrink = {}
            for key, mask in config.rank_pattern.items():
                # parameter names: "<module>.lora_E.<adapter>", or "<module>.lora_E" once save_pretrained stripped it
                module = tuner.model.get_submodule(key.removesuffix(f".{adapter}").removesuffix(".lora_E"))
                if module.lora_E[adapter].shape[0] == len(mask) != sum(mask):  # still full size, something pruned
                    shrink[key] = mask
            if shrink:
                tuner.resize_modules_by_rank_pattern(shrink, adapter)

    def fingerprint(self, model: torch.nn.Module) -> str:
        # the rank pattern is decided from gradients on each process, outside DDP's synchronisation
        return json.dumps(model.peft_config["default"].rank_pattern, sort_keys=True, default=str)

    def extra_state(self, model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        allocator = model.base_model.rankallocator
        tensors = {f"{kind}/{name}": t for kind in STATS for name, t in getattr(allocator, kind).items()}
        return tensors, {"rank_pattern": model.peft_config["default"].rank_pattern}

    def load_extra_state(self, model: torch.nn.Module, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        allocator = model.base_model.rankallocator
        device = next(model.parameters()).device
        for kind in STATS:
            getattr(allocator, kind).clear()
        for key, tensor in tensors.items():
            kind, name = key.split("/", 1)
            getattr(allocator, kind)[name] = tensor.to(device)
        model.peft_config["default"].rank_pattern = meta["rank_pattern"]

    def save(self, model: torch.nn.Module, folder: Path, state_dict: dict[str, torch.Tensor] | None) -> None:
        with _quiet_rank_pattern():
            super().save(model, folder, state_dict)

    def load(self, base: torch.nn.Module, folder: Path) -> torch.nn.Module:
        with _quiet_rank_pattern():
            return super().load(base, folder)

    def saved_weights(self, model: torch.nn.Module, folder: Path) -> tuple[Path, dict[str, torch.Tensor] | None]:
        with _quiet_rank_pattern():
            return super().saved_weights(model, folder)

    def final_trainable(self, model_dir: Path, trainable: int) -> int:
        """Parameters left after pruning: ranks kept x (in + out + 1), plus what trains in full."""
        config_file = model_dir / "adapter_config.json"
        if not config_file.exists():
            return trainable
        pattern = json.loads(config_file.read_text()).get("rank_pattern") or {}
        with safe_open(str(model_dir / "adapter_model.safetensors"), "pt") as f:
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}

        def shape(module: str, matrix: str) -> list[int] | None:
            ends = (f"{module}.{matrix}.weight", f"{module}.{matrix}")
            return next((s for k, s in shapes.items() if k.endswith(ends)), None)

        removed = 0
        for key, mask in pattern.items():
            module = key.removesuffix(".lora_E")
            a, b = shape(module, "lora_A"), shape(module, "lora_B")
            if a is None or b is None:
                continue
            removed += (len(mask) - sum(bool(m) for m in mask)) * (a[1] + b[0] + 1)
        return trainable - removed


@contextlib.contextmanager
def _quiet_rank_pattern() -> Iterator[None]:
    """PEFT 0.21 warns on every AdaLoRA save and load, wrongly for AdaLoRA: LoRA's check reads the rank pattern's
    parameter-name keys as module names ("did not match any targeted module"), which AdaLoRA's own loader then
    applies; and a layer pruned to rank 0 is taken for an ungathered ZeRO-3/FSDP shard ("invalid shape")."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*rank_pattern keys did not match any targeted module")
        warnings.filterwarnings("ignore", message=r".*LoRA tensor\(s\) have invalid shape")
        yield


METHOD = AdaLoRA()
