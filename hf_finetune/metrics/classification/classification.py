"""Classification metric: accuracy, macro F1 and Matthews correlation from integer labels."""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import datasets
import evaluate
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
