"""Is method A better than method B? A t-interval of each method's mean over seeds, and a paired bootstrap over the
evaluation examples: every run scored the same examples, so the same resample of examples is applied to both
methods' saved predictions (and to every seed), and the interval of the difference says whether it is real.

The metric of a resample is recomputed from the saved prediction rows by the task (`Task.resampled`): a mean of
per-example scores, a ratio of sums (entity F1, perplexity), or a correlation; a metric that cannot be recomputed
from the rows (corpus BLEU) gets no paired test, and the report says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

Resampled = Callable[[np.ndarray], np.ndarray]
"""A metric on resamples: from an (resamples, n) array of example indices to one value per resample."""

RESAMPLES = 10_000
CHUNK = 500  # resamples drawn at once: 500 x 10,570 SQuAD questions of int64 is 42 MB


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean and the two-sided `level` t-interval of the mean over seeds (no interval from a single seed)."""
    from scipy import stats  # here, not at import: every task module imports this file

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None, None
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * float(np.std(values, ddof=1)) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_bootstrap(
    a: Sequence[Resampled], b: Sequence[Resampled], n: int, resamples: int = RESAMPLES, seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:  # fmt: skip
    """The difference A - B of the seed-mean metric on all `n` examples, and its `level` percentile interval over
    resamples of the examples (one resample shared by every run: the pairing). `a[i]` and `b[i]` are the runs of seed
    i of each method, their rows in the same example order."""
    everything = np.arange(n)[None, :]
    observed = float(np.mean([fa(everything)[0] - fb(everything)[0] for fa, fb in zip(a, b, strict=True)]))
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, resamples, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, resamples - start), n))
        diffs.append(np.mean([fa(idx) - fb(idx) for fa, fb in zip(a, b, strict=True)], axis=0))
    low, high = np.quantile(np.concatenate(diffs), [0.5 - level / 2, 0.5 + level / 2])
    return observed, float(low), float(high)


def verdict(name: str, best: str, metric: str, diff: float, low: float, high: float, higher_is_better: bool) -> str:
    """A plain-words reading of the interval of `name` - `best`."""
    if low <= 0 <= high:
        reading = "not distinguishable"
    else:
        better = (low > 0) == higher_is_better
        reading = f"{name} {'better' if better else 'worse'}"
    return f"{name} vs {best}: {metric} {diff:+.4f} [{low:+.4f}, {high:+.4f}], {reading}"


# ---- resamplers the tasks build from their rows ---------------------------------------------------------------------


def mean_of(values: Sequence[float]) -> Resampled:
    array = np.asarray(values, dtype=np.float64)
    return lambda idx: array[idx].mean(axis=1)


def ratio_of(numerator: Sequence[float], denominator: Sequence[float], scale: float = 1.0) -> Resampled:
    """scale x sum(numerator) / sum(denominator) (0 where the denominator sums to 0)."""
    num, den = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)

    def resampled(idx: np.ndarray) -> np.ndarray:
        top, bottom = num[idx].sum(axis=1), den[idx].sum(axis=1)
        return np.divide(scale * top, bottom, out=np.zeros_like(top), where=bottom > 0)

    return resampled


def pearson_of(x: Sequence[float], y: Sequence[float]) -> Resampled:
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def resampled(idx: np.ndarray) -> np.ndarray:
        a, b = xs[idx], ys[idx]
        a, b = a - a.mean(axis=1, keepdims=True), b - b.mean(axis=1, keepdims=True)
        den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
        return np.divide((a * b).sum(axis=1), den, out=np.zeros(len(idx)), where=den > 0)

    return resampled


def scores_or_losses(rows: list[dict], metric: str) -> Resampled | None:
    """What most tasks' rows allow: the mean of a per-example score, or perplexity/loss from per-row losses."""
    if rows and all(metric in r.get("scores", {}) for r in rows):
        return mean_of([r["scores"][metric] for r in rows])
    if rows and metric in ("eval_loss", "perplexity") and all("loss" in r and "tokens" in r for r in rows):
        loss = ratio_of([(r["loss"] or 0.0) * r["tokens"] for r in rows], [r["tokens"] for r in rows])
        return loss if metric == "eval_loss" else (lambda idx: np.exp(loss(idx)))
    return None
