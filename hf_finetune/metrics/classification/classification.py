"""Classification metric: accuracy, macro F1 and Matthews correlation from integer labels."""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import datasets
import evaluate
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_DESCRIPTION = """
Accuracy, macro-averaged F1 and Matthews correlation coefficient (MCC) for single-label
classification with integer class ids. MCC covers binary and multiclass labels alike.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): gold class ids.
    labels (list of int, optional): classes to average macro F1 over; by default the classes
        present in references or predictions.
Returns:
    accuracy (float), f1_macro (float), mcc (float)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Classification(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(
        self, predictions: list[int], references: list[int], labels: list[int] | None = None
    ) -> dict[str, float]:
        # Delegate to scikit-learn: the standard scorer, and the same calls GLUE's metric uses, so
        # our numbers are comparable with published results. zero_division=0 scores a class never
        # predicted as F1 0 instead of warning.
        return {
            "accuracy": float(accuracy_score(references, predictions)),
            "f1_macro": float(
                f1_score(references, predictions, labels=labels, average="macro", zero_division=0)
            ),
            "mcc": float(matthews_corrcoef(references, predictions)),
        }


# Multi-label and regression scoring: plain functions over whole arrays (threshold tuning needs every probability at
# once), delegating to scikit-learn and scipy as GLUE's metrics do.


def multi_label_scores(predicted: np.ndarray, gold: np.ndarray, names: list[str]) -> dict[str, float]:
    """Micro and macro F1, subset accuracy (every label of a row right) and `f1_<name>` per label, from (rows,
    labels) 0/1 arrays."""
    predicted, gold = predicted.astype(int), gold.astype(int)
    per_label = f1_score(gold, predicted, average=None, zero_division=0)
    return {
        "f1_micro": float(f1_score(gold, predicted, average="micro", zero_division=0)),
        "f1_macro": float(f1_score(gold, predicted, average="macro", zero_division=0)),
        "subset_accuracy": float(accuracy_score(gold, predicted)),
        **{f"f1_{name}": float(f) for name, f in zip(names, per_label, strict=True)},
    }


THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def tune_thresholds(probs: np.ndarray, gold: np.ndarray, default: float = 0.5) -> list[float]:
    """Per label, the threshold on `THRESHOLD_GRID` that maximises that label's F1 (ties: the one nearest
    `default`); a label never present and never predicted keeps `default`."""
    gold = gold.astype(bool)
    chosen = []
    for j in range(probs.shape[1]):
        predicted = probs[:, j][None, :] >= THRESHOLD_GRID[:, None]  # (thresholds, rows)
        tp = (predicted & gold[:, j]).sum(1)
        f1 = 2 * tp / np.maximum(predicted.sum(1) + gold[:, j].sum(), 1)
        best = np.flatnonzero(f1 == f1.max())
        pick = best[np.argmin(np.abs(THRESHOLD_GRID[best] - default))]
        chosen.append(float(THRESHOLD_GRID[pick]) if f1.max() > 0 else default)
    return chosen


def regression_scores(predicted: np.ndarray, gold: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation (scipy) and mean squared error; a constant prediction correlates 0."""
    predicted, gold = np.asarray(predicted, dtype=float), np.asarray(gold, dtype=float)
    constant = np.ptp(predicted) == 0 or np.ptp(gold) == 0
    return {
        "pearson": 0.0 if constant else float(pearsonr(predicted, gold)[0]),
        "spearman": 0.0 if constant else float(spearmanr(predicted, gold)[0]),
        "mse": float(np.mean((predicted - gold) ** 2)),
    }
