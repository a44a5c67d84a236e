"""The statistics behind `compare`'s verdicts: t-intervals over seeds, the paired bootstrap's known answers, and each
task's metric recomputed from its saved prediction rows equal to the metric it reported."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from hf_finetune.significance import mean_of, paired_bootstrap, pearson_of, t_interval, verdict
from hf_finetune.tasks import TASKS

ALL = np.arange(200)[None, :]


def test_t_interval_is_scipys_and_needs_two_seeds() -> None:
    values = [0.81, 0.84, 0.80]
    mean, low, high = t_interval(values)
    ref = stats.t.interval(0.95, 2, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values)) and (low, high) == pytest.approx(ref)
    assert t_interval([0.8]) == (0.8, None, None)


def test_identical_predictions_differ_by_exactly_zero() -> None:
    scores = np.random.default_rng(0).integers(0, 2, 200).astype(float)
    a = [mean_of(scores), mean_of(scores[::-1])]
    assert paired_bootstrap(a, a, 200, resamples=2000) == (0.0, 0.0, 0.0)


def test_a_constant_shift_is_found_exactly_and_a_real_gap_is_called() -> None:
    rng = np.random.default_rng(1)
    b = rng.random(200)
    diff, low, high = paired_bootstrap([mean_of(b + 0.05)], [mean_of(b)], 200, resamples=2000)
    assert (diff, low, high) == pytest.approx((0.05, 0.05, 0.05))
    assert verdict("lora", "full", "accuracy", diff, low, high, True).endswith("lora better")
    assert verdict("lora", "full", "perplexity", diff, low, high, False).endswith("lora worse")
    # independent noise around equal means: the interval holds 0
    noisy = rng.integers(0, 2, 200).astype(float)
    other = rng.integers(0, 2, 200).astype(float)
    diff, low, high = paired_bootstrap([mean_of(noisy)], [mean_of(other)], 200, resamples=4000)
    assert low < diff < high and diff == pytest.approx(noisy.mean() - other.mean())
    assert (low <= 0 <= high) == verdict("a", "b", "accuracy", diff, low, high, True).endswith("not distinguishable")


def test_pairing_narrows_the_interval_of_correlated_runs() -> None:
    """Two methods right and wrong on mostly the same examples: the paired interval is far narrower than what the
    two accuracies' own spreads would allow."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, 2, 200).astype(float)
    b = a.copy()
    b[:10] = 1 - b[:10]  # they disagree on 10 examples
    _, low, high = paired_bootstrap([mean_of(a)], [mean_of(b)], 200, resamples=4000)
    unpaired = 2 * 1.96 * np.sqrt(2 * 0.25 / 200)
    assert high - low < unpaired / 3


def test_each_tasks_rows_give_back_its_metric() -> None:
    # entity F1 and token accuracy from counts
    counts = [{"correct_entities": c, "predicted_entities": p, "gold_entities": g, "correct_tokens": t, "tokens": n}
              for c, p, g, t, n in [(1, 2, 2, 5, 6), (0, 1, 0, 3, 3), (2, 2, 3, 8, 9)]]  # fmt: skip
    rows = [{"counts": c} for c in counts]
    f1 = TASKS["token_classification"].resampled(rows, "f1")(np.arange(3)[None, :])[0]
    assert f1 == pytest.approx(2 * 3 / (5 + 5))
    assert TASKS["token_classification"].resampled(rows, "accuracy")(np.arange(3)[None, :])[0] == pytest.approx(16 / 18)
    # regression Pearson, multi-label micro-F1, accuracy as a mean, perplexity from losses
    x, y = np.random.default_rng(3).random(200), np.random.default_rng(4).random(200)
    rows = [{"prediction": float(p), "reference": float(r)} for p, r in zip(x, y, strict=True)]
    assert TASKS["classification"].resampled(rows, "pearson")(ALL)[0] == pytest.approx(stats.pearsonr(x, y)[0])
    assert pearson_of(x, y)(ALL)[0] == pytest.approx(stats.pearsonr(x, y)[0])
    multi = [{"prediction": ["a", "b"], "reference": ["a"]}, {"prediction": [], "reference": ["c"]}]
    assert TASKS["classification"].resampled(multi, "f1_micro")(np.arange(2)[None, :])[0] == pytest.approx(2 / 4)
    single = [{"scores": {"accuracy": v}} for v in (1.0, 0.0, 1.0, 1.0)]
    assert TASKS["classification"].resampled(single, "accuracy")(np.arange(4)[None, :])[0] == 0.75
    lm = [{"loss": 2.0, "tokens": 10}, {"loss": 1.0, "tokens": 30}]
    ppl = TASKS["causal_lm"].resampled(lm, "perplexity")(np.arange(2)[None, :])[0]
    assert ppl == pytest.approx(np.exp((20 + 30) / 40))
    # corpus BLEU is no mean over examples: no paired test
    assert TASKS["translation"].resampled([{"prediction": "a", "reference": "a"}], "bleu") is None
