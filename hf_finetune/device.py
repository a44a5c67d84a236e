"""What depends on the device: mixed precision, the padding rule every collator and the position budget use, and the
CPU tuning, applied once per run and only on a CPU (`training.cpu_tuning: auto`).

With `training.cpu_tuning=off` a CPU run is the plain transformers/PEFT path: torch's own dropout, PEFT's own input
casts, ideep's default cache, batches padded to their longest row. GPUs never run the CPU workarounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, TorchDynamoPlugin
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import DataCollatorWithPadding

from hf_finetune.dropout import use_fast_dropout
from hf_finetune.errors import InputError
from hf_finetune.system import choose_precision, prepare_run

if TYPE_CHECKING:
    from pathlib import Path

    from hf_finetune.recipe import TrainingConfig

# GPU tensor-core tiles: widths in multiples of 8, the `pad_to_multiple_of` transformers' collators offer
GPU_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Padding:
    """How wide a batch whose longest row has `n` tokens is padded: rounded up to `multiple`, or to a width bucket."""

    multiple: int = 1
    buckets: bool = False

    def width(self, n: int, cap: int | None = None) -> int:
        """The padded width, never above `cap` (the longest a row can be) when given."""
        width = bucket_width(n) if self.buckets else -(-n // self.multiple) * self.multiple
        return min(width, cap) if cap is not None else width

    def extra(self, n: int) -> int:
        """Positions padding can add to a sequence of `n` tokens when nothing caps it."""
        return self.width(n) - n


def padding_for(device_type: str, mixed_precision: str, cpu_tuning: str = "auto") -> Padding:
    """The one padding rule. GPUs: multiples of 8. CPUs under bf16/fp16 with CPU tuning: width buckets, since oneDNN
    compiles and keeps a kernel per matmul shape (see `bucket_width`). Other CPU runs: the longest row, because fp32
    matmuls go to MKL, which keeps nothing per shape, and rounding to 8 would add a quarter of SST-2's tokens (short
    sentences: LoRA trained 9% slower)."""
    if device_type != "cpu":
        return Padding(multiple=GPU_MULTIPLE)
    if cpu_tuning == "auto" and mixed_precision != "no":
        return Padding(buckets=True)
    return Padding()


def padding_for_recipe(precision: str, cpu_tuning: str = "auto") -> Padding:
    """The padding rule for a recipe's precision on the device this process would train on."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return padding_for(device, choose_precision(precision), cpu_tuning)


def bucket_width(width: int) -> int:
    """`width` rounded up so that only its three leading bits may be set: 1..8 stay, then 10, 12, 14, 16, 20, 24, 28,
    32, 40, 48, ... Four widths per doubling; a width just past a power of two grows by up to a quarter.

    Why in bf16/fp16 on a CPU: oneDNN compiles and keeps a kernel (with a ~250 KB descriptor) for every matmul
    shape, and dynamic padding makes new shapes for every batch width. On SST-2's length-grouped batches of 32 this
    keeps 19 of the 55 widths for 5.8% more tokens; multiples of 4 keep 16 for 11%, multiples of 8 keep 9 for 25%
    (docs/benchmarks.md, "width buckets")."""
    if width <= 8:
        return width
    step = 1 << (width - 1).bit_length() - 3
    return -(-width // step) * step


def right_pad(sequences: list[list[int]], value: int, padding: Padding, cap: int | None = None) -> torch.Tensor:
    """(rows, width) long tensor of `sequences` right-padded with `value` to the rule's width. For the collators that
    pad themselves: the tokenizer's `pad` cannot pad labels with -100 or the offset pairs whole-word masking needs."""
    width = padding.width(max(len(s) for s in sequences), cap)
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


@dataclasses.dataclass
class RulePadding(DataCollatorWithPadding):
    """`DataCollatorWithPadding` padding each batch to the `Padding` rule's width, capped at `max_length`."""

    rule: Padding = dataclasses.field(default_factory=Padding)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = self.rule.width(max(len(f["input_ids"]) for f in features), self.max_length)
        fixed = dataclasses.replace(self, padding="max_length", max_length=width, pad_to_multiple_of=None)
        return DataCollatorWithPadding.__call__(fixed, features)


# accelerate 1.15 enables DeepSpeed only when its state is not told to use the CPU, and CPU processes form one process
# group only when it is: DeepSpeed on CPU processes would silently train as DDP, or as unrelated single processes
DEEPSPEED_ON_CPU = (
    "accelerate launch --use_deepspeed: no GPU here, and accelerate 1.15 runs DeepSpeed only on accelerator devices "
    "(on CPU processes it would silently train as plain DDP); use scripts/accelerate/fsdp_cpu.yaml to shard on CPUs"
)


def make_accelerator(t: TrainingConfig, out: Path) -> Accelerator:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if not has_device and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        raise InputError(DEEPSPEED_ON_CPU)
    prepare_run()  # this recipe's precision and dynamo plugin, not a previous run's
    accelerator = Accelerator(
        gradient_accumulation_steps=t.grad_accum,
        mixed_precision=choose_precision(t.precision),
        project_dir=str(out),
        # The loader yields global batches that accelerate splits evenly across processes, so N processes with batch
        # b see exactly the batches of one process with batch N*b: same data order, same loss curve, same schedule
        # (the scheduler then steps once per optimizer step instead of N times).
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        # `accelerate launch --multi_gpu` on a machine without GPUs starts torchrun processes that accelerate 1.15
        # would run as unrelated single processes; cpu=True makes them one gloo process group
        cpu=launched > 1 and not has_device,
        # regional compilation compiles one encoder/decoder block and reuses it for the others (minutes less on a CPU)
        dynamo_plugin=TorchDynamoPlugin(backend="inductor", use_regional_compilation=True) if t.compile else None,
    )
    if launched > 1 and not has_device and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        shard_on_cpu(accelerator)
    if accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes but accelerate sees {accelerator.num_processes}; "
            "they would train independently and write over each other's files"
        )
    return accelerator


def shard_on_cpu(accelerator: Accelerator) -> None:
    """`accelerate launch --use_fsdp` on CPU processes: accelerate 1.15 turns the launcher's FSDP settings into FSDP
    only on accelerator devices (MULTI_GPU, MULTI_XPU, ...) and runs a CPU process group as plain DDP, though torch's
    `fully_shard` (FSDP2) shards over gloo. The shared state is switched to FSDP with the launcher's plugin, so
    `prepare` shards the model and `get_state_dict` gathers it, as on GPUs."""
    from accelerate import FullyShardedDataParallelPlugin, PartialState
    from accelerate.utils import DistributedType

    plugin = FullyShardedDataParallelPlugin()  # every setting from the launcher's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise InputError("FSDP on CPU processes needs FSDP2 (accelerate launch --fsdp_version 2)")
    # both shared states: every later AcceleratorState() copies the process state's distributed type over its own
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = plugin


# ---- CPU tuning -----------------------------------------------------------------------------------------------------

IDEEP_CACHE = "LRU_CACHE_CAPACITY"


def tune_model_for_cpu(model: torch.nn.Module, mixed_precision: str, compiling: bool) -> dict[str, int]:
    """The CPU tuning of a model about to train; returns what changed.

    - Dropout with torch's distribution and ~3x cheaper CPU masks (`hf_finetune.dropout`): a bf16 LoRA step on MiniLM
      took 142.5 ms against 183.3 with torch's (docs/benchmarks.md, "dropout"). Not when compiling: its sampling loop
      has data-dependent sizes that dynamo cannot trace, and inductor fuses torch's own.
    - Under bf16, PEFT layers stop casting their input to the adapter dtype (`leave_input_casts_to_autocast`: shown
      bit-identical for CPU bf16 autocast only).
    """
    changed = {"fast_dropout": 0, "input_casts_left_to_autocast": 0}
    if not compiling:
        changed["fast_dropout"] = use_fast_dropout(model)
    if mixed_precision == "bf16":
        changed["input_casts_left_to_autocast"] = leave_input_casts_to_autocast(model)
    return changed


def leave_input_casts_to_autocast(model: torch.nn.Module) -> int:
    """Stop PEFT layers casting their input to the adapter weights' dtype; returns how many layers there were.

    Under CPU bf16 autocast every op's dtype is autocast's, and PEFT's cast of a bf16 input to the fp32 adapter
    weights only adds a bf16 -> fp32 -> bf16 round trip: the dropout's scaling rounds once either way and autocast
    casts back for the matmul, so the results are bit-identical (tests/test_methods.py). Skipping it took a bf16 LoRA
    step on MiniLM from 155.4 to 137.8 ms and its peak RSS 44 MB lower (docs/benchmarks.md, "PEFT input casts"). This is
    `peft.helpers.disable_input_dtype_casting` left on for the whole run."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.cast_input_dtype_enabled = False
    return len(layers)


@contextlib.contextmanager
def cpu_process_settings(enabled: bool) -> Iterator[None]:
    """ideep's per-shape matmul cache kept to one entry while a run starts (unless the user set LRU_CACHE_CAPACITY),
    and the environment restored afterwards, so a program that imports hf_finetune keeps its own.

    torch runs bf16 CPU matmuls through ideep, which keeps each shape's oneDNN primitive in an LRU of 1,024 entries
    (pytorch/pytorch#27971) beside oneDNN's own primitive cache, which already keeps every compiled kernel. A brgemm
    descriptor holds ~250 KB, and every batch width makes new shapes: on the SST-2 bench one entry lowered peak RSS by
    ~190 MB (LoRA) and ~30 MB (full) at unchanged speed (docs/benchmarks.md, "ideep cache"). ideep reads the variable
    once, at the process's first bf16 matmul, so the cap holds for the rest of the process."""
    if not enabled or IDEEP_CACHE in os.environ:
        yield
        return
    os.environ[IDEEP_CACHE] = "1"
    try:
        yield
    finally:
        os.environ.pop(IDEEP_CACHE, None)
