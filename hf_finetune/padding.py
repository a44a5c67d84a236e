"""Right padding shared by the collators that pad themselves (LM, seq2seq): the tokenizer's `pad` cannot pad labels
with -100 or the offset pairs whole-word masking needs."""

from __future__ import annotations

import torch

MULTIPLE = 8  # widths in multiples of 8: fewer distinct shapes for the kernels, as transformers' collators offer


def right_pad(sequences: list[list[int]], value: int, multiple: int = MULTIPLE) -> torch.Tensor:
    """(rows, width) long tensor of `sequences` right-padded with `value`, width rounded up to `multiple`."""
    width = -(-max(len(s) for s in sequences) // multiple) * multiple
    out = torch.full((len(sequences), width), value, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out
