"""Entity-level precision, recall and F1 over tag sequences (IOB1, IOB2, IOBES), as the CoNLL evaluation scores them.

A predicted entity counts only when its type, first and last word equal a gold entity's. Spans are read with the
rules of the CoNLL-2000 `conlleval` script, which `seqeval` implements in its default mode: an `I-X` that follows
`O` or another type opens an entity, so IOB1 data and imperfect predictions are read the way the shared tasks read
them. tests/test_token_classification.py checks every figure against seqeval on tricky sequences.
"""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import datasets
import evaluate

_DESCRIPTION = """
Entity-level micro precision/recall/F1, the same per entity type, and token accuracy, from lists of tag strings.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of str): predicted tags, one list per sentence.
    references (list of list of str): gold tags, the same lengths.
Returns:
    precision, recall, f1, accuracy (float), and `<TYPE>_precision`, `<TYPE>_recall`, `<TYPE>_f1`,
    `<TYPE>_number` per entity type found in the references or predictions.
"""

# The conlleval transitions, (previous tag letter, tag letter): an entity ends before / starts at this word.
_ENDS = {("B", "B"), ("B", "S"), ("B", "O"), ("I", "B"), ("I", "S"), ("I", "O")}
_STARTS = {("E", "E"), ("E", "I"), ("S", "E"), ("S", "I"), ("O", "E"), ("O", "I")}


def _split(tag: str) -> tuple[str, str]:
    """('B', 'PER') for 'B-PER'; 'O' has the empty type, as in conlleval."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def spans(tags: list[str]) -> list[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, first word, last word), both inclusive."""
    out: list[tuple[str, int, int]] = []
    prev, prev_type, begin = "O", "", 0
    for i, chunk in enumerate([*tags, "O"]):
        tag, type_ = _split(chunk)
        typed_prev = prev not in ("O", ".") and prev_type != type_
        if prev in ("E", "S") or (prev, tag) in _ENDS or typed_prev:
            out.append((prev_type, begin, i - 1))
        if tag in ("B", "S") or (prev, tag) in _STARTS or (tag not in ("O", ".") and prev_type != type_):
            begin = i
        prev, prev_type = tag, type_
    return out


def _prf(correct: int, predicted: int, gold: int) -> tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_scores(predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
    gold: set[tuple[int, str, int, int]] = set()
    pred: set[tuple[int, str, int, int]] = set()
    tokens = right = 0
    for row, (p, r) in enumerate(zip(predictions, references, strict=True)):
        if len(p) != len(r):
            raise ValueError(f"sentence {row}: {len(p)} predicted tags for {len(r)} gold tags")
        gold.update((row, *s) for s in spans(r))
        pred.update((row, *s) for s in spans(p))
        tokens += len(r)
        right += sum(a == b for a, b in zip(p, r, strict=True))
    precision, recall, f1 = _prf(len(gold & pred), len(pred), len(gold))
    scores = {"precision": precision, "recall": recall, "f1": f1, "accuracy": right / tokens if tokens else 0.0}
    for type_ in sorted({s[1] for s in gold | pred}):
        g = {s for s in gold if s[1] == type_}
        p_ = {s for s in pred if s[1] == type_}
        tp, tr, tf = _prf(len(g & p_), len(p_), len(g))
        scores.update({f"{type_}_precision": tp, f"{type_}_recall": tr, f"{type_}_f1": tf, f"{type_}_number": len(g)})
    return scores


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Entities(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Tjong Kim Sang & De Meulder, CoNLL-2003 shared task; conlleval (CoNLL-2000).",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("string")),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions: list[list[str]], references: list[list[str]]) -> dict[str, float]:
        return entity_scores(predictions, references)
