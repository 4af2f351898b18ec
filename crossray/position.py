"""Where a streamed training run stands in its data, so a restore resumes the stream exactly there.

In stream mode nothing is stored: the training data is a list of *items*, each a block of
`block_sequences` corpus sequences in one epoch (`StreamPlan.items`: item = epoch x blocks + block),
extracted when the Train workers pull them. Each row carries its item and its index in the item, and
every worker marks the rows it trains on (`RowMarks`); rank 0 merges all workers' marks into the
`StreamPosition` it saves with each checkpoint: the items every row of which was trained (`done`),
and for the others the rows that were (`partial`, a bit per row).

A shuffle buffer holds rows of many items at once (a row can linger there long after its item went
by), so at a checkpoint many items are partly trained. On a restore the stream leaves out the done
items and streams the partial ones again with their trained rows dropped: the run resumes at exactly
the rows the restored state had not trained on. No row is trained twice within an epoch and none is
skipped (`duplicate_rows` counts any row marked twice, and stays 0).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


def to_ranges(items: Iterable[int]) -> list[list[int]]:
    """Integers as sorted [start, stop) ranges (compact for the mostly contiguous done items)."""
    out: list[list[int]] = []
    for i in sorted(set(items)):
        if out and out[-1][1] == i:
            out[-1][1] = i + 1
        else:
            out.append([i, i + 1])
    return out


def from_ranges(ranges: Iterable[Iterable[int]]) -> set[int]:
    return {i for start, stop in ranges for i in range(start, stop)}


def pack_bits(mask: np.ndarray) -> str:
    return base64.b64encode(np.packbits(mask).tobytes()).decode()


def unpack_bits(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(text), np.uint8), count=n).astype(bool)


@dataclass(frozen=True)
class StreamPlan:
    """The items of a stream: `epochs` passes over `n_sequences` in blocks of `block_sequences`."""

    n_sequences: int
    block_sequences: int
    rows_per_sequence: int
    epochs: int
    seed: int = 0

    @classmethod
    def for_rows(cls, rows: int, n_sequences: int, block_sequences: int, rows_per_sequence: int,
                 seed: int = 0) -> StreamPlan:
        """Enough epochs for `rows` trained rows, plus one for what the workers' buffers hold back."""
        epochs = math.ceil(rows / (n_sequences * rows_per_sequence)) + 1
        return cls(n_sequences, block_sequences, rows_per_sequence, epochs, seed)

    @property
    def n_blocks(self) -> int:
        return math.ceil(self.n_sequences / self.block_sequences)

    def block(self, item: int) -> tuple[int, int]:
        """[start, stop) of the sequences of an item."""
        b = item % self.n_blocks
        return b * self.block_sequences, min((b + 1) * self.block_sequences, self.n_sequences)

    def item_rows(self, item: int) -> int:
        start, stop = self.block(item)
        return (stop - start) * self.rows_per_sequence

    def items(self) -> list[int]:
        """Every item in delivery order: the first epoch in corpus order (like the paper's buffer,
        which refills from consecutive sequences), each later epoch in its own seeded order."""
        out = list(range(self.n_blocks))
        for epoch in range(1, self.epochs):
            order = np.random.default_rng([self.seed, epoch]).permutation(self.n_blocks)
            out.extend((epoch * self.n_blocks + order).tolist())
        return out

    def to_json(self) -> dict:
        return {"n_sequences": self.n_sequences, "block_sequences": self.block_sequences,
                "rows_per_sequence": self.rows_per_sequence, "epochs": self.epochs, "seed": self.seed}


class RowMarks:
    """One worker's trained rows since its last `take`, by item: fed each batch's item and row columns."""

    def __init__(self, plan: StreamPlan) -> None:
        self.plan = plan
        self.marks: dict[int, np.ndarray] = {}

    def add(self, items_B, rows_B) -> None:
        items_B, rows_B = np.asarray(items_B), np.asarray(rows_B)
        order = np.argsort(items_B, kind="stable")
        items_B, rows_B = items_B[order], rows_B[order]
        values, starts = np.unique(items_B, return_index=True)
        for item, rows in zip(values.tolist(), np.split(rows_B, starts[1:]), strict=True):
            mask = self.marks.get(item)
            if mask is None:
                mask = self.marks[item] = np.zeros(self.plan.item_rows(item), bool)
            mask[rows] = True

    def take(self) -> dict[int, np.ndarray]:
        out, self.marks = self.marks, {}
        return out


@dataclass
class StreamPosition:
    """The rows of a `StreamPlan` trained so far: whole items (`done`) and rows of the others."""

    plan: StreamPlan
    done: set[int] = field(default_factory=set)
    partial: dict[int, np.ndarray] = field(default_factory=dict)
    """Item -> trained rows (a bool per row) of the items not done."""
    rows: int = 0
    """Rows trained on (steps x batch size, when every row is counted once)."""
    duplicate_rows: int = 0
    """Rows marked a second time (0 when the resume is exact)."""
    restores: int = 0

    def add(self, marks: dict[int, np.ndarray]) -> None:
        """One worker's marks since the last `add` (every worker's, one `add` each)."""
        for item, mask in marks.items():
            new = int(mask.sum())
            self.rows += new
            if item in self.done:
                self.duplicate_rows += new
                continue
            have = self.partial.pop(item, None)
            if have is not None:
                self.duplicate_rows += int((have & mask).sum())
                mask = have | mask
            if mask.all():
                self.done.add(item)
            else:
                self.partial[item] = mask

    def pending_rows(self) -> int:
        """Rows of partly trained items not trained yet (held in buffers, or in flight)."""
        return sum(int((~m).sum()) for m in self.partial.values())

    def resume(self) -> dict:
        """What the stream needs to resume here: the done items as ranges, and per partial item its
        trained rows (packed bits), which the extraction drops."""
        return {"done": to_ranges(self.done),
                "partial": {item: pack_bits(m) for item, m in self.partial.items()}}

    def to_json(self) -> dict:
        return {"plan": self.plan.to_json(), "done": to_ranges(self.done),
                "partial": {str(k): pack_bits(m) for k, m in sorted(self.partial.items())},
                "rows": self.rows, "duplicate_rows": self.duplicate_rows, "restores": self.restores}

    @classmethod
    def from_json(cls, d: dict) -> StreamPosition:
        plan = StreamPlan(**d["plan"])
        partial = {int(k): unpack_bits(v, plan.item_rows(int(k))) for k, v in d["partial"].items()}
        return cls(plan, from_ranges(d["done"]), partial, d["rows"], d["duplicate_rows"], d["restores"])
