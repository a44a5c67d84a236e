"""Perplexity from per-batch summed token NLL and token counts (token-weighted)."""

# evaluate scans this script's imports with a per-line regex: keep one import per line.
import math

import datasets
import evaluate

_DESCRIPTION = """
Perplexity = exp(total NLL / total tokens), accumulated from per-batch sums. Weighting by
tokens (not averaging per-batch mean losses) keeps the result independent of how the
evaluation set was split into batches of different lengths.
"""

_KWARGS_DESCRIPTION = """
Args:
    loss_sums (list of float): summed token negative log-likelihood (nats) of each batch.
    token_counts (list of int): number of scored tokens in each batch.
Returns:
    perplexity (float): exp(eval_loss), or inf if that overflows.
    eval_loss (float): token-weighted mean NLL.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Perplexity(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"loss_sums": datasets.Value("float64"), "token_counts": datasets.Value("int64")}
            ),
        )

    def _compute(self, loss_sums: list[float], token_counts: list[int]) -> dict[str, float]:
        total_tokens = sum(token_counts)
        if total_tokens <= 0:
            raise ValueError("perplexity needs at least one scored token (sum of token_counts is 0)")
        eval_loss = float(math.fsum(loss_sums)) / total_tokens
        try:
            perplexity = math.exp(eval_loss)
        except OverflowError:  # an untrained or diverged model can have eval_loss > ~709
            perplexity = float("inf")
        return {"perplexity": perplexity, "eval_loss": eval_loss}
