"""Gradient filtering (``filter_eps``): which tiles of the logit gradient the backward computes.

The logit gradient of masked row r is ``scale_r * (onehot(t_r) - softmax(z_r)) * dz/dx``. For a
trained model almost every entry of ``softmax - onehot`` is too small to matter next to the large
ones: below bfloat16's precision for all but a few hundredths of a percent of them. The filtered
backward skips the tiles that hold only such entries, a *tile* being one masked row x one chunk of
the vocabulary walk (``vocab_walk.py``, sorted by mean logit so that what survives gathers in few
chunks): for a skipped tile it neither recomputes the logits nor adds to dH and dW.

A tile (row r, chunk c) is live when some entry has p >= eps before the upstream scale: the row's
largest (soft-capped) logit in the chunk, which the forward's log-sum-exp recorded, is at least
``lse_r + log(eps)``; and the row's scale is nonzero (a zero scale contributes exactly zero). A
row whose target lies in a skipped tile (p_t < eps there, so the target's entry is
``scale * (1 - p_t) * dz/dx`` with a small p_t) is a *lone target*: its ``scale * dz/dx`` is added
to dH, dW and the bias gradient apart, for all such rows at once, so that a chunk live for the
target alone costs nothing. Every dropped quantity is therefore a softmax entry below eps in
magnitude (p * |dz/dx| < eps, |dz/dx| <= 1) before the scale: the error of dH[r, d] is at most
``eps * |scale_r| * sum_{v dropped in row r} |W[v, d]|``, that of dW[v, d] at most
``eps * sum_{r: (r, v) dropped} |scale_r * h[r, d]|`` (DESIGN.md §4). The forward value (the
log-sum-exp) is never filtered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional, Union

import torch
from torch import Tensor

# None or 0: exact; "auto": the compute dtype's eps / 32; a float: that threshold.
FilterEps = Union[None, float, Literal["auto"]]


def resolve_filter_eps(filter_eps: FilterEps, dtype: torch.dtype) -> Optional[float]:
    """The threshold for a compute ``dtype``: None (and 0, which skips nothing) for the exact op;
    "auto" for ``torch.finfo(dtype).eps / 32`` (2^-12 for bfloat16, 2^-15 for float16, 2^-28 for
    float32); a positive float as given."""
    if filter_eps is None:
        return None
    if filter_eps == "auto":
        return torch.finfo(dtype).eps / 32
    if isinstance(filter_eps, str) or not math.isfinite(filter_eps) or filter_eps < 0:
        raise ValueError(
            f"filter_eps must be None, 'auto' or a finite float >= 0, got {filter_eps!r}"
        )
    return float(filter_eps) or None


@dataclass(frozen=True)
class FilterPlan:
    """What the filtered backward computes.

    live: one entry per chunk of the walk: None when every row is live, else the live rows
        (int64 [n], n < M, increasing; empty when the chunk is skipped whole).
    lone: int64 [k], the lone-target rows (their target's tile is skipped; nonzero scale).
    """

    live: list[Optional[Tensor]]
    lone: Tensor


def plan(
    tile_max: Tensor, lse: Tensor, scale: Tensor, target_chunk: Tensor, eps: float
) -> FilterPlan:
    """The live tiles and lone targets of a filtered backward; one host sync (all counts
    together).

    Args:
        tile_max: float32 [num_chunks, M], each row's largest (soft-capped) logit in each chunk.
        lse: float32 [M], the rows' log-sum-exp. scale: float32 [M], their upstream scale.
        target_chunk: int64 [M], the chunk holding each row's target.
        eps: the threshold.
    """
    num_rows = tile_max.shape[1]
    # Written as "not below" so that a NaN logit keeps its tile: its NaN gradient is not dropped.
    live = ~(tile_max - lse < math.log(eps)) & (scale != 0)
    lone = (scale != 0) & ~live.gather(0, target_chunk.view(1, -1)).view(-1)
    counts = torch.cat([live.sum(1), lone.sum().view(1)]).tolist()
    flat = torch.nonzero_static(live.reshape(-1), size=sum(counts[:-1])).reshape(-1)
    *per_chunk, num_lone = counts
    rows = (flat % max(num_rows, 1)).split(per_chunk)
    return FilterPlan(
        [None if n == num_rows else r for n, r in zip(per_chunk, rows, strict=True)],
        torch.nonzero_static(lone, size=num_lone).reshape(-1),
    )
