"""Summarization metric: ROUGE-1/2/L/Lsum F-measures by Google's rouge-score, with stemming, several references."""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import re

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """
ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures from the `rouge-score` package (the implementation of the
original ROUGE-1.5.5 that Hugging Face's `rouge` metric wraps), with Porter stemming. ROUGE-Lsum is computed on
sentences split onto separate lines. With several references, each example takes its best-matching reference per
measure (`score_multi`), and the corpus figure is the mean over examples, on a 0-100 scale.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one summary per example.
    references (list of list of str): the references of each example (one or more).
Returns:
    rouge1, rouge2, rougeL, rougeLsum (float): mean F-measure x 100.
"""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
# Sentence ends for ROUGE-Lsum: NLTK's punkt model is a separate download, so a rule: ., ! or ? then whitespace.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> str:
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Summarization(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        per_example = example_scores(predictions, references)
        n = max(len(per_example), 1)
        return {key: sum(s[key] for s in per_example) / n for key in ROUGE_TYPES}


def example_scores(predictions: list[str], references: list[list[str]]) -> list[dict[str, float]]:
    """Each example's ROUGE F-measures x 100 against its best-matching reference; their mean is the corpus figure."""
    if any(not refs for refs in references):
        raise ValueError("every example needs at least one reference")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out = []
    for prediction, refs in zip(predictions, references, strict=True):
        scores = scorer.score_multi([split_sentences(r) for r in refs], split_sentences(prediction))
        out.append({key: 100 * scores[key].fmeasure for key in ROUGE_TYPES})
    return out
