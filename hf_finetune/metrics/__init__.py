"""Offline metrics: each metric is a local evaluate module script shipped as package data."""

from pathlib import Path
from typing import Any

import evaluate

# name -> folder under hf_finetune/metrics/; keys equal folder names because evaluate expects
# <name>/<name>.py (the module's name is taken from the script's stem).
METRICS: dict[str, str] = {
    "classification": "classification",
    "perplexity": "perplexity",
    "squad": "squad",
    "summarization": "summarization",
    "translation": "translation",
}

_HERE = Path(__file__).resolve().parent


def load_metric(name: str, **kwargs: Any) -> evaluate.EvaluationModule:
    """Load the bundled metric `name` from its local script (no Hub access needed).

    Extra keyword arguments go to `evaluate.load` (e.g. `keep_in_memory`, `num_process`, `process_id`).
    """
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(sorted(METRICS))}")
    folder = METRICS[name]
    # An absolute path to a .py file makes evaluate use its local-script factory, never the Hub.
    return evaluate.load(str(_HERE / folder / f"{folder}.py"), **kwargs)
