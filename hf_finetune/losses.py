"""Token-level losses shared by the tasks that score tokens and by the loop's label smoothing."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


def align_logits(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels position by position: prompt tuning's virtual tokens dropped from the outputs, and for
    causal models position t scored against token t + 1."""
    if logits.shape[1] > labels.shape[1]:
        logits = logits[:, -labels.shape[1] :]  # prompt tuning prepends virtual tokens to the outputs
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return logits, labels


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed negative log-likelihood (nats) and scored-token count; -100 labels are not scored."""
    logits, labels = align_logits(logits, labels, shift)
    losses = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )  # (batch, length)
    return losses.sum(1).double(), (labels != -100).sum(1)


def smoothed_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool, label_smoothing: float, reduction: str = "mean"
) -> Any:
    """Token cross-entropy with label smoothing (transformers' models compute theirs without it): the mean, or with
    `reduction="sum"` the sum and the scored-token count. It replaces the model's loss, so a regulariser a method adds
    to that loss (AdaLoRA's orthogonality term) is left out."""
    logits, labels = align_logits(logits, labels, shift)
    flat = labels.flatten()
    loss = F.cross_entropy(
        logits.float().flatten(0, 1), flat, ignore_index=-100, label_smoothing=label_smoothing, reduction=reduction
    )
    return (loss, (flat != -100).sum()) if reduction == "sum" else loss
