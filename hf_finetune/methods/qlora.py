"""QLoRA (Dettmers et al. 2023): LoRA over a frozen base whose linear weights load as 4-bit NormalFloat (NF4, double
quantization, bf16 compute) through bitsandbytes, prepared by PEFT's `prepare_model_for_kbit_training`.

The adapters and their defaults are LoRA's, so that a comparison of the two isolates the 4-bit base. The fresh task
head stays unquantized and trains in full. bitsandbytes 0.48 and newer run NF4 on CPUs as well as on CUDA; where it
is missing or cannot run, the method is refused before any weights load. `merge` dequantizes the base (the weights
training saw) and folds the adapters into it: the merged model is bf16, and quantizing it again is the user's step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from hf_finetune.methods.base import TaskInfo
from hf_finetune.methods.lora import LoRA

if TYPE_CHECKING:
    from hf_finetune.recipe import MethodConfig


def unavailable() -> str | None:
    """Why 4-bit weights cannot load here (None: they can)."""
    try:
        import bitsandbytes
    except ImportError:
        return "method qlora needs bitsandbytes (pip install 'bitsandbytes>=0.48'), which is not installed"
    major, minor = (int(x) for x in bitsandbytes.__version__.split(".")[:2])
    if not torch.cuda.is_available() and (major, minor) < (0, 48):
        return f"method qlora: bitsandbytes {bitsandbytes.__version__} has no CPU 4-bit kernels (0.48 and newer do)"
    return None


class QLoRA(LoRA):
    name = "qlora"
    mergeable = True
    in_default_comparison = False
    trains_new_tokens = False  # new embedding rows beside a quantized base: use lora

    def check(self, cfg: MethodConfig, total_steps: int) -> list[str]:
        reason = unavailable()
        return [reason] if reason else []

    def load_kwargs(self, task: TaskInfo) -> dict[str, Any]:
        from transformers import BitsAndBytesConfig

        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=list(task.head_modules) or None,  # the fresh head trains in full
        )
        return {"quantization_config": quantization, "dtype": torch.bfloat16}

    def load_code(self, adapter_config: dict[str, Any]) -> tuple[list[str], str]:
        skip = adapter_config.get("modules_to_save") or None  # the head trained in full stays unquantized
        return [
            "import torch",
            "from transformers import BitsAndBytesConfig",
            "",
            "# the base in 4-bit NF4 as it trained (pip install bitsandbytes)",
            "quantization = BitsAndBytesConfig(",
            "    load_in_4bit=True, bnb_4bit_quant_type='nf4', bnb_4bit_use_double_quant=True,",
            f"    bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules={skip!r},",
            ")",
        ], ", quantization_config=quantization, dtype=torch.bfloat16"

    def apply(self, model: torch.nn.Module, cfg: MethodConfig, task: TaskInfo) -> torch.nn.Module:
        from peft import prepare_model_for_kbit_training

        # norms and embeddings back to fp32 and input gradients on, as the QLoRA recipe does; checkpointing is the
        # recipe's own choice (training.gradient_checkpointing), already applied by the engine
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return super().apply(model, cfg, task)

    def load(self, base: torch.nn.Module, folder: Path) -> torch.nn.Module:
        """The saved adapter over the 4-bit base prepared as for training (norms and embeddings in fp32), so that a
        reloaded model computes what the trained one did."""
        from peft import prepare_model_for_kbit_training

        return super().load(prepare_model_for_kbit_training(base, use_gradient_checkpointing=False), folder)

    def merge_source(self, model: torch.nn.Module, reload_base: Any, folder: Path) -> torch.nn.Module:
        """The adapters over the dequantized base: merging then adds each update to the bf16 weights training saw,
        not to weights quantized again."""
        from peft import PeftModel

        base = reload_base()
        base = base.dequantize() or base
        return PeftModel.from_pretrained(base, folder)


METHOD = QLoRA()
