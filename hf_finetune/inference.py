"""The batching and gathering every task's evaluation and prediction share: a task only says how one batch of model
outputs becomes per-row tensors (`forward`), and what it makes of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

Forward = Callable[[torch.nn.Module, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def gathered_outputs(
    model: torch.nn.Module,
    loader: Any,
    accelerator: Accelerator,
    forward: Forward,
    pad: dict[str, float] | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """`forward(model, batch)` over the evaluation `loader`, without gradients and in eval mode, gathered across
    processes so that each example counts once (accelerate drops the duplicates that even out the last batch).

    `pad` names outputs whose dimension 1 differs between processes (each pads its own batch) and the value to
    fill them with up to a common width before gathering."""
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                out = forward(model, batch)
                for key, value in (pad or {}).items():
                    out[key] = accelerator.pad_across_processes(out[key], dim=1, pad_index=value)
                yield accelerator.gather_for_metrics(out)
    finally:
        model.train()


def batched_rows(
    model: torch.nn.Module,
    features: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    batch_size: int,
    forward: Forward,
    by_length: bool = True,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Prediction on one process: `features` in batches (of similar length unless `by_length` is off: less padding),
    each collated, moved to the model's device and passed through `forward`; yields the batch's indices into
    `features` and its outputs."""
    order = list(range(len(features)))
    if by_length:
        order.sort(key=lambda i: len(features[i]["input_ids"]))
    device = next(model.parameters()).device
    model.eval()
    # a bar on long inputs only, and only on a terminal (tqdm's disable=None)
    bar = tqdm(total=len(order), unit="row", desc="predict", disable=True if len(order) < 8 * batch_size else None)
    with torch.no_grad(), bar:
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = collate([features[i] for i in idx])
            yield idx, forward(model, {k: v.to(device) for k, v in batch.items()})
            bar.update(len(idx))


def inference_setup(model: torch.nn.Module, precision: str) -> tuple[torch.nn.Module, Any]:
    """The model on accelerate's device (a GPU where there is one) and the autocast of the recipe's precision (bf16
    on a CPU with bf16 units under `auto`): what `predict` and `generate` run under, as evaluation does."""
    from hf_finetune.system import choose_precision, prepare_run

    prepare_run()
    accelerator = Accelerator(mixed_precision=choose_precision(precision))
    return model.to(accelerator.device), accelerator.autocast
