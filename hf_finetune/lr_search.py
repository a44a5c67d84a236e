"""`compare --lr-search`: each method's learning rate chosen on validation by short trials, then the comparison at the
chosen rates.

A method's ranking at fixed defaults ranks the defaults: prefix tuning, IA3 and AdaLoRA move by tens of points with
the learning rate alone (docs/benchmarks.md, "sst2-lr-screen"). Each method gets a log-spaced grid around its own
rate; the trials train a share of the full run's steps on one seed (successive halving: each further rung keeps the
better half and doubles the steps) and are scored on the validation split only, so a recipe's test split stays
unseen until the final runs. Trials are ordinary runs under `output_dir/lr_search/`, reused like every other run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from hf_finetune.methods import get_method
from hf_finetune.recipe import LrSearchConfig, Recipe
from hf_finetune.tasks import TASKS


def center_lr(recipe: Recipe) -> float:
    """The rate a method's run would train at: the recipe's (or its --set value), else the method's default."""
    return recipe.training.lr or get_method(recipe.method.name).defaults["lr"]


def grid(method: str, center: float, cfg: LrSearchConfig) -> list[float]:
    """The method's rates to try, low to high: its explicit list, else the factors times its rate (3 significant
    digits, so that a grid written in a report reads back as the same runs)."""
    values = cfg.lrs.get(method) or [float(f"{center * f:.3g}") for f in cfg.factors]
    return sorted(set(values))


def trial_steps(total: int, cfg: LrSearchConfig, rung: int) -> int:
    return min(total, max(1, round(total * cfg.budget * 2**rung)))


def search(runs: list[Any], cfg: LrSearchConfig, seeds: list[int], root: Path, task: str, steps_of: Any,
           execute: Any) -> dict[str, Any]:  # fmt: skip
    """Run the trials of every method and return the search record: per method, its centre rate, every trial (rate,
    steps, rung, score, status) and the chosen rate (None when every trial failed: the method keeps its own)."""
    seed = cfg.seed if cfg.seed is not None else seeds[0]
    record: dict[str, Any] = {"budget": cfg.budget, "rungs": cfg.rungs, "seed": seed, "methods": {}}
    for method in dict.fromkeys(r.method for r in runs):
        first = next(r for r in runs if r.method == method)
        total = steps_of(first.recipe)
        center = center_lr(first.recipe)
        alive = grid(method, center, cfg)
        trials: list[dict[str, Any]] = []
        chosen = None
        previous_steps = 0
        for rung in range(cfg.rungs):
            steps = trial_steps(total, cfg, rung)
            if steps == previous_steps:  # the budget reached the full run: another rung would repeat this one
                break
            previous_steps = steps
            batch = [
                first.variant([f"training.lr={lr!r}", f"training.max_steps={steps}", f"training.seed={seed}"],
                              root / "lr_search" / method / f"lr{lr:g}-steps{steps}",
                              f"lr search ({method}, lr {lr:g}, {steps} steps)")
                for lr in alive
            ]  # fmt: skip
            execute(batch)
            scored = []
            for lr, run in zip(alive, batch, strict=True):
                score = score_of(run, task)
                trials.append({"lr": lr, "steps": steps, "rung": rung, "score": score, "status": run.status,
                               "error": run.error, "out": str(run.out)})  # fmt: skip
                if score is not None:
                    scored.append((lr, score))
            if not scored:
                break
            sign = 1.0 if TASKS[task].higher_is_better(_metric(batch)) else -1.0
            # best score first; a tie goes to the rate nearest the method's own
            scored.sort(key=lambda p: (-sign * p[1], abs(math.log(p[0] / center))))
            chosen = scored[0][0]
            alive = [lr for lr, _ in scored[: math.ceil(len(scored) / 2)]]
            if len(alive) == 1:
                break
        record["methods"][method] = {
            "center": center, "grid": grid(method, center, cfg), "total_steps": total, "chosen": chosen,
            "metric": _metric(batch) if trials else None, "trials": trials,
        }  # fmt: skip
    return record


def _metric(runs: list[Any]) -> str | None:
    return next((r.results.get("primary_metric") for r in runs if r.results.get("primary_metric")), None)


def score_of(run: Any, task: str) -> float | None:
    """The trial's validation score on its task's ranking metric; None for a failed or non-finite trial (a diverged
    rate), so that it is never chosen."""
    if run.status == "failed":
        return None
    metric = run.results.get("primary_metric") or TASKS[task].primary_metric
    value = run.results.get("metrics", {}).get(metric)
    return float(value) if value is not None and math.isfinite(value) else None


def apply_choice(runs: list[Any], record: dict[str, Any]) -> None:
    """Every run of a method at its chosen rate (a different recipe hash: runs at the old rate are not reused)."""
    for run in runs:
        chosen = record["methods"].get(run.method, {}).get("chosen")
        if chosen is None:
            continue
        run.override([f"training.lr={chosen!r}"], f"at lr {chosen:g}")
