"""Length-grouped batching: batches of similar length pad less (SST-2 sentences average ~10 tokens)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices


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


def sorted_by_length(dataset: Dataset) -> Dataset:
    """Evaluation order by length, so padded batches carry little padding; metrics do not depend on order."""
    order = sorted(range(len(dataset)), key=dataset["length"].__getitem__)
    return dataset.select(order).remove_columns("length")


def eval_loader(dataset: Dataset, batch_size: int, collate_fn: Any) -> DataLoader:
    """The evaluation loader shared by training-time and checkpoint evaluation."""
    # its own generator, so creating an iterator leaves the global RNG (dropout, resumed runs) alone
    return DataLoader(
        sorted_by_length(dataset),
        batch_size,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(0),
    )
