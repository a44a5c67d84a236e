"""Translation metric: corpus BLEU and chrF by sacreBLEU, on detokenised text, several references per example."""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
Corpus-level BLEU and chrF computed by sacreBLEU with its defaults (BLEU: 13a tokenisation, exponential smoothing;
chrF: character 6-grams, beta 2), so the numbers are the ones papers report with sacreBLEU. Predictions and
references are detokenised text. Examples may have different numbers of references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): one system output per example.
    references (list of list of str): the references of each example (one or more).
Returns:
    bleu (float), chrf (float): on sacreBLEU's 0-100 scale.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Translation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: list[str], references: list[list[str]]) -> dict[str, float]:
        if any(not refs for refs in references):
            raise ValueError("every example needs at least one reference")
        # sacreBLEU takes one stream per reference position; None marks an example with fewer references
        width = max(len(refs) for refs in references)
        streams = [[refs[i] if i < len(refs) else None for refs in references] for i in range(width)]
        return {
            "bleu": float(sacrebleu.corpus_bleu(predictions, streams).score),
            "chrf": float(sacrebleu.corpus_chrf(predictions, streams).score),
        }
