"""Token-level losses shared by the tasks that score tokens and by the loop's label smoothing."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from accelerate import Accelerator
from accelerate.utils import DistributedType


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


def position_nll(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's negative log-likelihood in fp32 (0 where the label is -100) and the aligned labels."""
    logits, labels = align_logits(logits, labels, shift)
    nll = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, label_smoothing=label_smoothing, reduction="none"
    )  # (batch, length)
    return nll, labels


def token_losses(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed negative log-likelihood (nats) and scored-token count; -100 labels are not scored."""
    nll, labels = position_nll(logits, labels, shift)
    return nll.sum(1).double(), (labels != -100).sum(1)


def smoothed_token_loss(
    logits: torch.Tensor, labels: torch.Tensor, shift: bool, label_smoothing: float, reduction: str = "mean"
) -> Any:
    """Token cross-entropy with label smoothing (transformers' models compute theirs without it): the mean, or with
    `reduction="sum"` the sum and the scored-token count. It replaces the model's loss, so a regulariser a method adds
    to that loss (AdaLoRA's orthogonality term) is left out."""
    nll, labels = position_nll(logits, labels, shift, label_smoothing)
    total, count = nll.sum(), (labels != -100).sum()
    return (total, count) if reduction == "sum" else total / count


# Logits held at once when the output head is applied in pieces: 2^23 (32 MB in fp32). A whole batch's logits are
# batch x tokens x vocabulary (64 x 256 x 8,192 in fp32 is 0.5 GB for the GPT pretraining recipe, 67 GB for a 128k
# vocabulary at 2,048 tokens); the pieces keep peak memory flat in that product (docs/benchmarks.md, "chunked LM head").
CHUNK_LOGITS = 2**23


def output_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's output projection when it produces the final logits, so that it can be applied apart from the
    body; None for models that transform logits after it (a config key naming logits, a head multiplier: Gemma's
    soft-capping, Cohere's logit scale, Granite's scaling) or add a bias after it (encoder-decoders, BART)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return None
    if any("logit" in key or "multiplier" in key or "lm_head" in key for key in config.to_dict()):
        return None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head if isinstance(head, torch.nn.Module) else None


def separate_head(model: torch.nn.Module, accelerator: Accelerator) -> torch.nn.Module | None:
    """`output_head` of a prepared model, except under FSDP, whose parameters are gathered only inside the model's
    own forward."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    return output_head(accelerator.unwrap_model(model, keep_torch_compile=False))


@contextlib.contextmanager
def head_returns_hidden(head: torch.nn.Module) -> Iterator[None]:
    """While inside, `head` returns its input: the model's `logits` output is then the hidden states it would project."""
    kept = head.__dict__.get("forward")  # a hook library may have set its own instance forward; restore it after
    head.forward = lambda hidden, *args, **kwargs: hidden  # type: ignore[method-assign]
    try:
        yield
    finally:
        if kept is None:
            del head.forward
        else:
            head.forward = kept  # type: ignore[method-assign]


def _chunk_nll(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor, smoothing: float) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, labels, label_smoothing=smoothing, reduction="none")


def token_nll(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    labels: torch.Tensor,
    shift: bool,
    head: torch.nn.Module | None,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each position's negative log-likelihood (0 where unscored) and the aligned labels, from `model(**batch)`
    without labels. With `head` (see `output_head`) and a batch whose logits would exceed CHUNK_LOGITS, the head is
    applied only at the scored positions and a piece at a time; in training each piece is recomputed in the backward
    pass (activation checkpointing), so no more than one piece of logits is ever held."""
    vocab = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [0])[0]
    if head is None or labels.numel() * vocab <= CHUNK_LOGITS:
        return position_nll(model(**batch).logits, labels, shift, label_smoothing)
    with head_returns_hidden(head):
        hidden = model(**batch).logits
    hidden, aligned = align_logits(hidden, labels, shift)
    scored = (aligned != -100).flatten().nonzero().squeeze(1)
    states, targets = hidden.flatten(0, 1)[scored], aligned.flatten()[scored]
    step = max(1, CHUNK_LOGITS // vocab)
    pieces = []
    for start in range(0, len(scored), step):
        args = (head, states[start : start + step], targets[start : start + step], label_smoothing)
        if torch.is_grad_enabled():
            pieces.append(torch.utils.checkpoint.checkpoint(_chunk_nll, *args, use_reentrant=False))
        else:
            pieces.append(_chunk_nll(*args))
    nll = hidden.new_zeros(aligned.numel(), dtype=torch.float32)
    if pieces:
        nll = nll.index_put((scored,), torch.cat(pieces))
    return nll.view(aligned.shape), aligned
