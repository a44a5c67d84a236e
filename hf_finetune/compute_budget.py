"""`compare --compute-matched time=SECONDS | tokens=N`: every method gets the same compute instead of the same steps.

A method's cost per optimizer step is measured by a short probe run of it (an ordinary run under
`output_dir/probe/`, reused like every other): its seconds per step for a wall-time budget, its training tokens per
step for a token budget. Each method then trains the steps its budget buys (at least one), with its schedule over
those steps. A time budget favours cheap steps (LoRA's backward skips the frozen weights' gradients); a token
budget is the same steps for every method that sees the same data, stated so that the report says which was used.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hf_finetune.errors import InputError

KINDS = {"time": "seconds of training", "tokens": "training tokens"}
PROBE_STEPS = 8


def parse(text: str) -> tuple[str, float]:
    kind, sep, value = text.partition("=")
    try:
        amount = float(value)
    except ValueError:
        amount = -1.0
    if not sep or kind not in KINDS or not amount > 0:
        raise InputError(f"--compute-matched {text!r}: expected time=SECONDS or tokens=N with a positive number")
    return kind, amount


def apply(runs: list[Any], budget: tuple[str, float], root: Path, execute: Any) -> dict[str, Any]:
    """Probe each method, set every run's `training.max_steps` to what the budget buys, and return the record."""
    kind, amount = budget
    record: dict[str, Any] = {"kind": kind, "amount": amount, "unit": KINDS[kind], "probe_steps": PROBE_STEPS,
                              "methods": {}}  # fmt: skip
    for method in dict.fromkeys(r.method for r in runs):
        first = next(r for r in runs if r.method == method)
        probe = first.variant([f"training.max_steps={PROBE_STEPS}"], root / "probe" / method,
                              f"compute probe ({method}, {PROBE_STEPS} steps)")  # fmt: skip
        execute([probe])
        if probe.status == "failed":
            record["methods"][method] = {"error": probe.error, "steps": None}
            continue
        r = probe.results
        seconds = r["train_runtime_s"] / r["steps"]
        # a whole number of tokens went through: rounding removes the rate x time float noise, so that methods
        # fed the same data buy the same steps
        tokens = round(r["train_tokens_per_s"] * r["train_runtime_s"]) / r["steps"]
        per_step = seconds if kind == "time" else tokens
        steps = max(1, math.floor(amount / per_step))
        record["methods"][method] = {"seconds_per_step": seconds, "tokens_per_step": tokens, "steps": steps}
        for run in runs:
            if run.method == method:
                run.override([f"training.max_steps={steps}"], f"{steps} steps")
    return record
