"""Facts about the machine and the software: precision choice, peak memory, versions for results.json."""

from __future__ import annotations

import ctypes
import os
import platform
import resource
from importlib.metadata import PackageNotFoundError, version

import torch

PACKAGES = (
    "hf-finetune",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "evaluate",
    "tokenizers",
)


def cpu_has_bf16() -> bool:
    """AMX or AVX512-BF16 units make bf16 matmuls native on x86 CPUs."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def choose_precision(precision: str) -> str:
    """Map the recipe's precision onto accelerate's `mixed_precision`."""
    if precision == "auto":
        if torch.cuda.is_available():
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "bf16" if cpu_has_bf16() else "no"
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def prepare_run() -> None:
    """Before each run (training or evaluation) builds its Accelerator: accelerate keeps one AcceleratorState per
    process, holding the first Accelerator's mixed precision and dynamo plugin, so a second run in the same process (a
    notebook, a script calling train twice) would silently keep them. It is reset so that each run gets its own
    recipe's; the process group (PartialState) is kept."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def glibc_heap_mb() -> dict[str, float]:
    """glibc's `mallinfo2` in MB: heap in use, freed but kept, and mmapped (for the memory benchmarks; Linux/glibc)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    return {"in_use": m.uordblks / 2**20, "free": m.fordblks / 2**20, "mmapped": m.hblkhd / 2**20}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux: the process's peak resident set, the CPU analogue of max allocated
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            continue
    found["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu_name()
    return found


def cpu_name() -> str:
    """The CPU's model name and the cores this process may use, e.g. "AMD EPYC (2 cores)"."""
    name = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{name} ({cores} cores)"
