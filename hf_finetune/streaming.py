"""Training data read as a stream (`data.train.streaming: true`): rows come from a `datasets.IterableDataset` (local
files or the Hub) and are tokenised on the fly (and, for language modelling, packed into blocks), never held all at
once, so a corpus larger than memory trains in the memory of a small one (docs/benchmarks.md, "streaming").

Resuming is exact: the loop records, for the first item (block or row) it has not yet trained on, where that item
starts in the stream (the pass over the data, the row, the token inside the row), and the resumed stream skips to it."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch

Position = tuple[int, int, int]
"""(pass over the data, row of the stream, token offset inside that row's tokens) where an item starts."""


class Stream(torch.utils.data.IterableDataset):
    """The position bookkeeping every stream shares: where each recently read item starts, and where to resume."""

    KEEP = 4096  # item positions remembered: the loop asks for one a few batches behind the reader

    def __init__(self, source: Any) -> None:
        self.source = source
        self.start: Position = (0, 0, 0)
        self.first_block = 0
        """The index (counted from the stream's very start) of the item at `start`."""
        self.starts: OrderedDict[int, Position] = OrderedDict()

    def resume(self, position: Position, blocks_done: int) -> None:
        """Continue at the item that starts at `position`, the `blocks_done`-th of the stream."""
        self.start, self.first_block = tuple(position), blocks_done  # type: ignore[assignment]

    def position_of(self, block: int) -> Position:
        """Where item number `block` starts: one already read, or the next to read."""
        if block == self.first_block and not self.starts:
            return self.start
        if block not in self.starts:
            raise RuntimeError(f"stream position of item {block} is no longer known (kept {len(self.starts)})")
        return self.starts[block]

    def _remember(self, block: int, position: Position) -> None:
        self.starts[block] = position
        while len(self.starts) > self.KEEP:
            self.starts.popitem(last=False)


class RowStream(Stream):
    """One example per row (classification): `encode(row, index)` turns a row into its features. The stream restarts
    when it runs out (another pass)."""

    def __init__(self, source: Any, encode: Callable[[dict[str, Any], int], dict[str, Any]]) -> None:
        super().__init__(source)
        self.encode = encode

    def __iter__(self) -> Iterator[dict[str, Any]]:
        passes, row, _ = self.start
        item = self.first_block
        self.starts.clear()
        while True:
            any_row = False
            for index, example in enumerate(self.source.skip(row) if row else self.source, start=row):
                any_row = True
                self._remember(item, (passes, index, 0))
                self._remember(item + 1, (passes, index + 1, 0))
                yield self.encode(example, index)
                item += 1
            if not any_row and row == 0:
                return  # an empty stream
            passes, row = passes + 1, 0


class PackedStream(Stream):
    """Blocks of `block_size` tokens cut from the concatenated token stream of `source`'s rows (the block run by
    `pack` on a whole split, here one row at a time). Each column `tokenise` returns (input_ids, and for masked LM
    special_tokens_mask / offset_mapping) is packed alike. The stream restarts when it runs out (another pass)."""

    def __init__(self, source: Any, column: str, tokenise: Callable[[list[str]], dict[str, list]], block_size: int):
        super().__init__(source)
        self.column, self.tokenise, self.block_size = column, tokenise, block_size

    def __iter__(self) -> Iterator[dict[str, list]]:
        size = self.block_size
        passes, row, offset = self.start
        block = self.first_block
        self.starts.clear()
        while True:
            buffer: dict[str, list] = {}
            # the rows whose tokens are in the buffer: (row, offset of its first buffered token, buffered count)
            segments: list[list[int]] = []
            rows = self.source.skip(row) if row else self.source
            any_row = False
            for index, example in enumerate(rows, start=row):
                any_row = True
                encoded = self.tokenise([example[self.column]])
                if not encoded["input_ids"]:
                    continue  # a blank row carries no token
                cut = offset if index == row else 0
                tokens = {k: v[0][cut:] for k, v in encoded.items()}
                if not tokens["input_ids"]:
                    continue
                for k, v in tokens.items():
                    buffer.setdefault(k, []).extend(v)
                segments.append([index, cut, len(tokens["input_ids"])])
                while len(buffer["input_ids"]) >= size:
                    self._remember(block, (passes, segments[0][0], segments[0][1]))
                    out = {k: v[:size] for k, v in buffer.items()}
                    buffer = {k: v[size:] for k, v in buffer.items()}
                    taken = size
                    while taken and segments:  # drop what the block took from the front segments
                        first = segments[0]
                        used = min(taken, first[2])
                        first[1] += used
                        first[2] -= used
                        taken -= used
                        if first[2] == 0:
                            segments.pop(0)
                    # the next block's start is known as soon as this one is cut (the loader reads ahead or not)
                    self._remember(block + 1, (passes, *segments[0][:2]) if segments else (passes, index + 1, 0))
                    yield out
                    block += 1
            if not any_row and row == 0:
                return  # an empty stream
            if buffer.get("input_ids"):  # the pass's last, shorter block
                self._remember(block, (passes, segments[0][0], segments[0][1]))
                self._remember(block + 1, (passes + 1, 0, 0))
                yield {k: list(v) for k, v in buffer.items()}
                block += 1
            passes, row, offset = passes + 1, 0, 0
