"""SQuAD metric: exact match and F1 as the official v1.1 and v2.0 evaluation scripts compute them.

The official scripts (evaluate-v1.1.py, evaluate-v2.0.py) are not packages; their scoring functions are short and
are reproduced here (one F1, with v2's no-answer rule as a switch), so that our numbers equal the leaderboard's.
evaluate's own `squad` metric would do the same but is fetched from the Hub, which our machines cannot reach.
"""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import collections
import re
import string

import datasets
import evaluate

_DESCRIPTION = """
Exact match and F1 (both in percent) of predicted answer strings against one or more reference answers, after
SQuAD's answer normalisation (lower-case, no punctuation, no articles a/an/the, whitespace collapsed); each
prediction takes its best score over the references. With version_2_with_negative, references without answers
expect the empty prediction and the result adds the HasAns_* and NoAns_* splits.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of {"id": str, "prediction_text": str}.
    references: list of {"id": str, "answers": {"text": list of str, "answer_start": list of int}}.
    version_2_with_negative (bool): score with the v2.0 script's rules (default False: v1.1).
Returns:
    exact_match, f1, total; with version_2_with_negative also HasAns_exact, HasAns_f1, HasAns_total,
    NoAns_exact, NoAns_f1, NoAns_total (the splits that have examples).
"""


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (identical in v1.1 and v2.0)."""

    def remove_articles(text: str) -> str:
        return re.sub(r"\b(a|an|the)\b", " ", text)

    def white_space_fix(text: str) -> str:
        return " ".join(text.split())

    def remove_punc(text: str) -> str:
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def f1(prediction: str, ground_truth: str, no_answer_rule: bool = False) -> float:
    """Token-overlap F1 of evaluate-v1.1.py; `no_answer_rule` adds evaluate-v2.0.py's one difference: when either
    side normalises to no tokens, F1 is 1 if both do and 0 otherwise."""
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    if no_answer_rule and (not prediction_tokens or not ground_truth_tokens):
        return float(prediction_tokens == ground_truth_tokens)
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def exact(prediction: str, ground_truth: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def example_scores(prediction: str, ref: dict, version_2_with_negative: bool = False) -> tuple[float, float, bool]:
    """One question's exact match and F1 (0 or 1, and 0..1) against the best of its answers, and whether it has one."""
    texts = list(ref["answers"]["text"])
    if version_2_with_negative:
        # evaluate-v2.0.py: answers that normalise to nothing do not count; none left means "no answer"
        gold = [t for t in texts if normalize_answer(t)] or [""]
        return (
            max(exact(prediction, g) for g in gold),
            max(f1(prediction, g, no_answer_rule=True) for g in gold),
            gold != [""],
        )
    if not texts:
        raise ValueError(f"reference {ref['id']!r} has no answer; set version_2_with_negative")
    # evaluate-v1.1.py: metric_max_over_ground_truths
    return max(exact(prediction, g) for g in texts), max(f1(prediction, g) for g in texts), True


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Squad(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, EMNLP 2016",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": {
                        "id": datasets.Value("string"),
                        "prediction_text": datasets.Value("string"),
                    },
                    "references": {
                        "id": datasets.Value("string"),
                        "answers": datasets.Sequence(
                            {"text": datasets.Value("string"), "answer_start": datasets.Value("int32")}
                        ),
                    },
                }
            ),
        )

    def _compute(self, predictions, references, version_2_with_negative: bool = False) -> dict:
        predicted = {p["id"]: p["prediction_text"] for p in predictions}
        missing = [r["id"] for r in references if r["id"] not in predicted]
        if missing:
            raise ValueError(f"no prediction for {len(missing)} reference id(s), e.g. {missing[0]!r}")
        exact_scores, f1_scores, has_answer = [], [], []
        for ref in references:
            em, f, answered = example_scores(predicted[ref["id"]], ref, version_2_with_negative)
            exact_scores.append(em)
            f1_scores.append(f)
            has_answer.append(answered)
        total = len(references)
        result = {
            "exact_match": 100.0 * sum(exact_scores) / total if total else 0.0,
            "f1": 100.0 * sum(f1_scores) / total if total else 0.0,
            "total": total,
        }
        if version_2_with_negative:
            for name, keep in (("HasAns", True), ("NoAns", False)):
                picked = [i for i, h in enumerate(has_answer) if h == keep]
                if picked:
                    result[f"{name}_exact"] = 100.0 * sum(exact_scores[i] for i in picked) / len(picked)
                    result[f"{name}_f1"] = 100.0 * sum(f1_scores[i] for i in picked) / len(picked)
                    result[f"{name}_total"] = len(picked)
        return result
