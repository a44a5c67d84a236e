"""Offline metrics: each metric is a local evaluate module script shipped as package data."""

from pathlib import Path
from typing import Any

import evaluate

_HERE = Path(__file__).resolve().parent
# every <name>/<name>.py under hf_finetune/metrics/: evaluate takes the module's name from the script's stem
METRICS: tuple[str, ...] = tuple(sorted(p.name for p in _HERE.iterdir() if (p / f"{p.name}.py").is_file()))


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load the bundled metric `name` from its local script (no Hub access needed).

    Extra keyword arguments go to `evaluate.load` (e.g. `keep_in_memory`, `num_process`, `process_id`).
    """
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    # An absolute path to a .py file makes evaluate use its local-script factory, never the Hub.
    return evaluate.load(str(_HERE / name / f"{name}.py"), **kwargs)
