"""The vocabulary walk of ``fused_linear_elbo``: which columns each chunk holds, in which order.

The exact op walks the vocabulary in its natural order, ``chunk`` columns at a time. With gradient
filtering (``grad_filter.py``) forward and backward walk it sorted by the mean logit of each entry
over the masked rows, highest first, so that the entries a trained model gives probability to sit
together in the first chunks and the later chunks hold (almost) nothing the backward must compute.
The weight is never permuted in memory: a sorted chunk gathers its rows of the weight, and writes
its rows of dW back where they belong.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor

# Float32 elements of one logit chunk: 2^26 (256 MiB) on GPU, 2^22 (16 MiB) on CPU. At M = 16384,
# D = 4096 the workspace is then ~0.8 GB: logits 256 MiB + half gradient 128 MiB + dH 256 MiB +
# gathered rows 128 MiB, while each GEMM still has 4096 columns.
CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}
# A chunk of a filtered walk is the vocabulary extent of a filter tile: narrower chunks skip more
# and cost GEMM efficiency. It spans at most FILTER_COLUMNS (on CPU the best of 1024 / 2048 at
# V = 32000, benchmarks/README.md; on GPU one block of the Triton row kernels) and at most a
# 1 / FILTER_MIN_CHUNKS share of the vocabulary, so that small vocabularies are filtered too, in
# multiples of 128 columns; the memory budget above still applies.
FILTER_COLUMNS = {"cuda": 4096, "cpu": 2048}
FILTER_MIN_CHUNKS = 16


@dataclass(frozen=True)
class Chunk:
    """Positions [start, end) of the walk and, for a sorted walk, the vocabulary ids there
    (``ids``: int64 [end - start]); None in the natural order, where the ids are start..end-1."""

    index: int
    start: int
    end: int
    ids: Optional[Tensor]

    @property
    def width(self) -> int:
        return self.end - self.start

    def rows(self, t: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """The chunk's entries of ``t`` ([V, ...]: the weight, a bias): a view in the natural
        order, else gathered (into ``out`` when given, [width, ...])."""
        if self.ids is None:
            return t[self.start : self.end]
        return torch.index_select(t, 0, self.ids, out=out) if out is not None else t[self.ids]


@dataclass(frozen=True)
class VocabWalk:
    """The chunks of a vocabulary of ``vocab`` entries, ``chunk`` columns each.

    order: None for the natural order, or int64 [V], the vocabulary ids in walk order.
    """

    vocab: int
    chunk: int
    order: Optional[Tensor] = None

    @property
    def num_chunks(self) -> int:
        return -(-self.vocab // self.chunk)

    def chunks(self) -> Iterator[Chunk]:
        for index, start in enumerate(range(0, self.vocab, self.chunk)):
            end = min(start + self.chunk, self.vocab)
            ids = None if self.order is None else self.order[start:end]
            yield Chunk(index, start, end, ids)

    def positions(self, ids: Tensor) -> Tensor:
        """Where vocabulary ids (int64 [M]) lie in the walk: chunk ``p // chunk``, column
        ``p % chunk`` of it."""
        if self.order is None:
            return ids
        rank = torch.empty_like(self.order)
        rank[self.order] = torch.arange(self.vocab, device=self.order.device)
        return rank[ids]


def chunk_columns(
    vocab: int, num_rows: int, chunk_size: int, device: torch.device, filtered: bool
) -> int:
    """Columns per chunk: ``chunk_size`` when given, else the device's memory budget in multiples
    of 128 columns, for a filtered walk also within FILTER_COLUMNS and a FILTER_MIN_CHUNKS-th of
    the vocabulary."""
    if chunk_size:
        return min(chunk_size, vocab)
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cpu"])
    columns = max(128, budget // max(num_rows, 1) // 128 * 128)
    if filtered:
        share = -(-vocab // FILTER_MIN_CHUNKS)
        columns = min(
            columns, FILTER_COLUMNS.get(device.type, FILTER_COLUMNS["cpu"]), -(-share // 128) * 128
        )
    return min(vocab, columns)


def mean_logit_order(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """int64 [V]: the vocabulary sorted by mean logit over the M masked rows, highest first.

    By linearity the mean logit of entry v is ``mean(h) . weight[v] (+ bias[v])``: one [V, D]
    matrix-vector product instead of a pass over the [M, V] logits. h: [M, D]; weight [V, D].
    """
    mean_h = h.float().mean(0) if h.shape[0] else h.new_zeros(h.shape[1], dtype=torch.float32)
    # In the weight's dtype: a float32 copy of a half weight would be a [V, D] temporary, and
    # the order only has to be good, not exact.
    mean_logit = torch.mv(weight, mean_h.to(weight.dtype)).float()
    if bias is not None:
        mean_logit = mean_logit + bias.float()
    return torch.argsort(mean_logit, descending=True, stable=True)
