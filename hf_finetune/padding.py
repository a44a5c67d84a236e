"""Right padding shared by the collators that pad themselves (LM, seq2seq): the tokenizer's `pad` cannot pad labels
with -100 or the offset pairs whole-word masking needs; and the width buckets of classification batches on a CPU."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import DataCollatorWithPadding

MULTIPLE = 8  # widths in multiples of 8: fewer distinct shapes for the kernels, as transformers' collators offer


def right_pad(sequences: list[list[int]], value: int, multiple: int = MULTIPLE) -> torch.Tensor:
    """(rows, width) long tensor of `sequences` right-padded with `value`, width rounded up to `multiple`."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def bucket_width(width: int) -> int:
    """`width` rounded up so that only its three leading bits may be set: 1..8 stay, then 10, 12, 14, 16, 20, 24, 28,
    32, 40, 48, ... Four widths per doubling; a width just past a power of two grows by up to a quarter.

    Why in bf16/fp16 on a CPU: oneDNN compiles and keeps a kernel (with a ~250 KB descriptor) for every matmul
    shape, and dynamic padding makes new shapes for every batch width. On SST-2's length-grouped batches of 32 this
    keeps 19 of the 55 widths for 5.8% more tokens; multiples of 4 keep 16 for 11%, multiples of 8 keep 9 for 25%
    (SST-2 sentences are short). Measured on/off in docs/benchmarks.md (issue #8)."""
    if width <= 8:
        return width
    step = 1 << (width - 1).bit_length() - 3
    return -(-width // step) * step


@dataclasses.dataclass
class BucketedPadding(DataCollatorWithPadding):
    """`DataCollatorWithPadding` that pads each batch to `bucket_width` of its longest row (capped at `max_length`)."""

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        width = bucket_width(max(len(f["input_ids"]) for f in features))
        if self.max_length is not None:
            width = min(width, self.max_length)
        fixed = dataclasses.replace(self, padding="max_length", max_length=width, pad_to_multiple_of=None)
        return DataCollatorWithPadding.__call__(fixed, features)
