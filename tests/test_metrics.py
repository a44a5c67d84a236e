"""Bundled evaluate metrics, checked against hand-computed values; runs offline."""

import math

import evaluate
import pytest

from hf_finetune.metrics import METRICS, load_metric


@pytest.fixture(scope="module")
def clf() -> evaluate.EvaluationModule:
    # keep_in_memory: no Arrow cache files; the maths is the same as the default file-backed mode.
    return load_metric("classification", keep_in_memory=True)


@pytest.fixture(scope="module")
def ppl() -> evaluate.EvaluationModule:
    return load_metric("perplexity", keep_in_memory=True)


def _assert_plain_floats(result: dict[str, float]) -> None:
    # Plain floats, not numpy scalars, so results serialise to JSON/YAML without surprises.
    assert all(type(v) is float for v in result.values()), {k: type(v) for k, v in result.items()}


def test_every_shipped_metric_loads_offline_under_its_name() -> None:
    assert {"classification", "perplexity", "squad", "summarization", "translation"} <= set(METRICS)
    for name in METRICS:
        assert load_metric(name, keep_in_memory=True).name == name


def test_binary_hand_computed(clf: evaluate.EvaluationModule) -> None:
    # refs  0 1 0 0 1 / preds 0 1 1 0 1 -> 4/5 right.
    # class 0: tp=2, predicted 2, true 3 -> P=1,   R=2/3 -> F1=2*(2/3)/(5/3)=0.8
    # class 1: tp=2, predicted 3, true 2 -> P=2/3, R=1   -> F1=0.8 ; macro 0.8
    # MCC (positive=1): tp=2 tn=2 fp=1 fn=0 -> (2*2-1*0)/sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))
    #                 = 4/sqrt(3*2*3*2) = 4/6
    result = clf.compute(predictions=[0, 1, 1, 0, 1], references=[0, 1, 0, 0, 1])
    assert result == pytest.approx({"accuracy": 0.8, "f1_macro": 0.8, "mcc": 4 / 6})
    _assert_plain_floats(result)


# refs  0 0 0 1 1 2 / preds 0 0 1 1 2 2 -> 4/6 right.
# class 0: tp=2, predicted 2, true 3 -> P=1,   R=2/3 -> F1=0.8
# class 1: tp=1, predicted 2, true 2 -> P=1/2, R=1/2 -> F1=0.5
# class 2: tp=1, predicted 2, true 1 -> P=1/2, R=1   -> F1=2/3 ; macro (4/5+1/2+2/3)/3 = 59/90
# multiclass MCC (Gorodkin): c=4 correct, s=6, true counts t=(3,2,1), predicted counts p=(2,2,2)
#   (c*s - sum p*t)/sqrt((s^2 - sum p^2)(s^2 - sum t^2)) = (24-12)/sqrt((36-12)(36-14)) = 12/sqrt(528)
MULTI_REFS = [0, 0, 0, 1, 1, 2]
MULTI_PREDS = [0, 0, 1, 1, 2, 2]


def test_multiclass_hand_computed(clf: evaluate.EvaluationModule) -> None:
    result = clf.compute(predictions=MULTI_PREDS, references=MULTI_REFS)
    assert result == pytest.approx({"accuracy": 4 / 6, "f1_macro": 59 / 90, "mcc": 12 / math.sqrt(528)})
    _assert_plain_floats(result)


def test_labels_kwarg_sets_macro_f1_classes(clf: evaluate.EvaluationModule) -> None:
    # An absent class 3 scores F1=0 (zero_division=0): (4/5+1/2+2/3+0)/4 = 59/120.
    wider = clf.compute(predictions=MULTI_PREDS, references=MULTI_REFS, labels=[0, 1, 2, 3])
    assert wider["f1_macro"] == pytest.approx(59 / 120)
    only_zero = clf.compute(predictions=MULTI_PREDS, references=MULTI_REFS, labels=[0])
    assert only_zero["f1_macro"] == pytest.approx(0.8)
    # labels only narrows F1; accuracy and MCC still use every example.
    assert wider["accuracy"] == only_zero["accuracy"] == pytest.approx(4 / 6)


def test_perfect(clf: evaluate.EvaluationModule) -> None:
    result = clf.compute(predictions=[2, 0, 1, 1], references=[2, 0, 1, 1])
    assert result == pytest.approx({"accuracy": 1.0, "f1_macro": 1.0, "mcc": 1.0})


def test_all_wrong(clf: evaluate.EvaluationModule) -> None:
    # binary: tp=0 tn=0 fp=2 fn=2 -> (0-4)/sqrt(2*2*2*2) = -1
    binary = clf.compute(predictions=[1, 0, 1, 0], references=[0, 1, 0, 1])
    assert binary == pytest.approx({"accuracy": 0.0, "f1_macro": 0.0, "mcc": -1.0})
    # 3-class cyclic shift: c=0, s=3, t=p=(1,1,1) -> (0-3)/sqrt((9-3)(9-3)) = -0.5; multiclass MCC's
    # minimum is above -1, so -0.5 here is right, not a bug.
    multi = clf.compute(predictions=[1, 2, 0], references=[0, 1, 2])
    assert multi == pytest.approx({"accuracy": 0.0, "f1_macro": 0.0, "mcc": -0.5})


def test_add_batch_equals_single_compute(clf: evaluate.EvaluationModule) -> None:
    preds = [0, 1, 2, 2, 1, 0, 0, 2, 1, 1]
    refs = [0, 1, 1, 2, 1, 0, 2, 2, 0, 1]
    for start in range(0, len(preds), 3):  # uneven batches: 3, 3, 3, 1
        clf.add_batch(predictions=preds[start : start + 3], references=refs[start : start + 3])
    batched = clf.compute()
    assert batched == pytest.approx(clf.compute(predictions=preds, references=refs))


def test_perplexity_is_token_weighted(ppl: evaluate.EvaluationModule) -> None:
    # batch A: 10 tokens, NLL sum 10 (mean 1); batch B: 5 tokens, NLL sum 30 (mean 6).
    # token-weighted loss = 40/15 = 8/3; a mean of batch means would give (1+6)/2 = 3.5.
    result = ppl.compute(loss_sums=[10.0, 30.0], token_counts=[10, 5])
    assert result == pytest.approx({"eval_loss": 8 / 3, "perplexity": math.exp(8 / 3)})
    assert result["perplexity"] != pytest.approx(math.exp(3.5))
    _assert_plain_floats(result)


def test_perplexity_add_batch_equals_single_compute(ppl: evaluate.EvaluationModule) -> None:
    ppl.add_batch(loss_sums=[10.0], token_counts=[10])
    ppl.add_batch(loss_sums=[30.0], token_counts=[5])
    assert ppl.compute() == pytest.approx(ppl.compute(loss_sums=[10.0, 30.0], token_counts=[10, 5]))


def test_perplexity_overflow_is_inf(ppl: evaluate.EvaluationModule) -> None:
    result = ppl.compute(loss_sums=[1000.0], token_counts=[1])  # exp(1000) overflows a double
    assert result == {"perplexity": float("inf"), "eval_loss": 1000.0}


def test_perplexity_zero_tokens_raises(ppl: evaluate.EvaluationModule) -> None:
    with pytest.raises(ValueError, match="token"):
        ppl.compute(loss_sums=[0.0], token_counts=[0])


def test_unknown_metric_names_available() -> None:
    with pytest.raises(ValueError, match="bleu") as excinfo:
        load_metric("bleu")
    assert all(name in str(excinfo.value) for name in METRICS)
