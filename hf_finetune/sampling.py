"""Batching: length-grouped training batches (batches of similar length pad less; SST-2 sentences average ~10
tokens), the run's loaders, and how examples turn into optimizer steps."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

if TYPE_CHECKING:
    from hf_finetune.recipe import TrainingConfig
    from hf_finetune.tasks import Task


class LengthGroupedSampler(Sampler[int]):
    """transformers' length grouping (random mega-batches, each sorted by length), reseeded per epoch so that every
    process draws the same order and a resumed run replays the interrupted epoch exactly. transformers' own
    `LengthGroupedSampler` takes one generator for the whole run, which breaks both."""

    def __init__(
        self, lengths: Sequence[int], group_size: int, seed: int, group_by_length: bool = True
    ) -> None:
        self.lengths = list(lengths)
        self.group_size = group_size
        self.seed = seed
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if not self.group_by_length:
            return iter(torch.randperm(len(self.lengths), generator=generator).tolist())
        return iter(get_length_grouped_indices(self.lengths, self.group_size, generator=generator))


def eval_order(lengths: Sequence[int]) -> list[int]:
    """The evaluation loader's order of a split's rows: by length (stable), so padded batches carry little padding.
    Metrics do not depend on it; a task pairing outputs with its rows without an index column uses it."""
    return sorted(range(len(lengths)), key=lengths.__getitem__)


def sorted_by_length(dataset: Dataset) -> Dataset:
    return dataset.select(eval_order(dataset["length"])).remove_columns("length")


def eval_loader(dataset: Dataset, batch_size: int, collate_fn: Any) -> DataLoader:
    """The evaluation loader shared by training-time and checkpoint evaluation."""
    # its own generator, so creating an iterator leaves the global RNG (dropout, resumed runs) alone
    return DataLoader(
        sorted_by_length(dataset),
        batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
    )


@dataclass
class Schedule:
    """How a run's examples turn into optimizer steps."""

    per_epoch: int
    total_steps: int
    epochs: int
    global_batch: int
    """Examples per optimizer step: batch_size x processes x grad_accum."""


def make_schedule(num_examples: int | None, t: TrainingConfig, world: int) -> Schedule:
    """The loader deals global batches (split across processes) and accelerate syncs gradients at the end of the epoch
    even when the last accumulation window is short. A stream (`num_examples` None) is one epoch of max_steps."""
    if num_examples is None:
        return Schedule(t.max_steps, t.max_steps, 1, t.batch_size * world * t.grad_accum)
    per_epoch = math.ceil(math.ceil(num_examples / (t.batch_size * world)) / t.grad_accum)
    total = t.max_steps or max(1, math.ceil(per_epoch * t.epochs))
    return Schedule(per_epoch, total, math.ceil(total / per_epoch), t.batch_size * world * t.grad_accum)


def build_loaders(task: Task, encoded: Any, t: TrainingConfig, world: int) -> tuple[DataLoader, dict[str, DataLoader]]:
    """The training loader deals global batches (batch_size x processes), which accelerate splits across processes."""
    collate = task.collator()
    global_batch = t.batch_size * world
    train_set = encoded["train"]
    # its own generator: a DataLoader without one draws its worker seed from the global RNG at every iter(), which a
    # resumed run would do once more than the uninterrupted one, shifting every dropout mask after it
    if isinstance(train_set, torch.utils.data.IterableDataset):  # a stream, in its own order (streaming.py)
        train_loader = DataLoader(
            train_set, global_batch, collate_fn=collate, generator=torch.Generator().manual_seed(t.seed)
        )
    else:
        group = task.group_by_length if t.group_by_length is None else t.group_by_length
        sampler = LengthGroupedSampler(train_set["length"], global_batch * t.grad_accum, t.seed, group)
        train_loader = DataLoader(
            train_set.remove_columns("length"), global_batch, sampler=sampler, collate_fn=collate,
            generator=torch.Generator().manual_seed(t.seed),
        )  # fmt: skip
    eval_loaders = {
        split: eval_loader(encoded[split], t.eval_batch * world, collate)
        for split in ("validation", "test")
        if split in encoded
    }
    return train_loader, eval_loaders
