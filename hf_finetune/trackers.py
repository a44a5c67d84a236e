"""Experiment trackers through accelerate's own (`accelerate.tracking`): `training.report_to` names them, each run
logs the resolved recipe as its config and every metrics.jsonl line as metrics. Nothing of ours wraps their APIs;
this file only picks each tracker's names and folders for a run."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Any

# report_to name -> (module accelerate imports, pip package that provides it)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "comet_ml": ("comet_ml", "comet-ml"),
    "aim": ("aim", "aim"),
    "clearml": ("clearml", "clearml"),
}
PROJECT = "hf-finetune"


def tracker_names(report_to: list[str] | str | None) -> list[str]:
    """The recipe's `training.report_to` as a list; "none" (or an empty list) turns tracking off."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    return [] if names in (["none"], []) else names


def check_trackers(report_to: list[str] | str | None) -> list[str]:
    """Recipe-check messages: unknown tracker names, and trackers whose package is not installed."""
    problems = []
    for name in tracker_names(report_to):
        if name not in TRACKERS:
            problems.append(f"'training.report_to': unknown tracker {name!r} (one of {', '.join(TRACKERS)} or none)")
        elif importlib.util.find_spec(TRACKERS[name][0]) is None:
            problems.append(
                f"'training.report_to': {name} is not installed; pip install {TRACKERS[name][1]} (or drop it)"
            )
    return problems


def make_trackers(report_to: list[str] | str | None, out: Path) -> list[Any]:
    """accelerate tracker objects for the run writing to `out`: TensorBoard under out/tensorboard, W&B's run folder
    and Aim's repository in out, every run named after its folder in the project "hf-finetune" (each tracker's own
    environment variables, e.g. WANDB_PROJECT, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME, still apply)."""
    from accelerate import tracking

    run = out.resolve().name
    made = []
    for name in tracker_names(report_to):
        if name == "tensorboard":
            made.append(tracking.TensorBoardTracker("tensorboard", str(out)))
        elif name == "wandb":
            made.append(tracking.WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), dir=str(out), name=run))
        elif name == "mlflow":
            made.append(tracking.MLflowTracker(PROJECT, run_name=run))
        elif name == "comet_ml":
            made.append(tracking.CometMLTracker(PROJECT))
        elif name == "aim":
            made.append(tracking.AimTracker(run, str(out)))
        elif name == "clearml":
            made.append(tracking.ClearMLTracker(PROJECT, task_name=run))
    return made


def flat_config(resolved: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved recipe as dotted keys with scalar values (lists as JSON), what every tracker's hparams take."""
    flat: dict[str, Any] = {}
    for key, value in resolved.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = "null" if value is None else value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat
