"""The call forms the two public ops accept, turned into the one form the custom ops take.

The ops compute on C copies of L positions ([C, L, V] logits or [C, L, D] hidden states) with
per-copy weights and a sample per copy. Adopters call them in simpler forms too:

* **2-D** ``[N, V]`` logits (or ``[N, D]`` hidden states) with ``[N]`` targets: N positions, each
  its own sample: the output is the weighted log-probability of each scored row (0 elsewhere);
* **defaults**: ``mask=None`` scores the positions whose target is not negative (the ``-100``
  ignore-index convention); ``weights=None`` weighs every position 1; ``sample_index=None`` makes
  every copy its own sample (``num_samples`` = C): the plain masked-diffusion (MDLM / SFT) loss;
* **reduction** of the per-sample output: "none" (``[num_samples]``), "sum", "mean" (over the
  scored positions, as ``cross_entropy`` averages over non-ignored targets) or "sample_mean"
  (over the samples).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

Reduction = Literal["none", "sum", "mean", "sample_mean"]
REDUCTIONS: tuple[str, ...] = get_args(Reduction)


@dataclass(frozen=True)
class Call:
    """One call in the ops' form: ``x`` [C, L, F], ``targets`` / ``mask`` [C, L], ``weights`` [C] or
    [C, L], ``sample_index`` [C], ``num_samples``."""

    x: Tensor
    targets: Tensor
    mask: Tensor
    weights: Tensor
    sample_index: Tensor
    num_samples: int


def normalise(
    name: str,
    feature: str,
    x: Tensor,
    targets: Tensor,
    mask: Tensor | None,
    weights: Tensor | None,
    sample_index: Tensor | None,
    num_samples: int | None,
) -> Call:
    """The call in the ops' form; ValueError for a form none of the above describes. ``name`` and
    ``feature`` name x and its last dimension in messages ("logits", "V")."""
    if x.dim() == 2:  # N copies of one position: [N] weights stay per copy
        if targets.dim() != 1:
            raise ValueError(
                f"with 2-D {name} [N, {feature}], targets must be [N], got {tuple(targets.shape)}"
            )
        x, targets = x.unsqueeze(1), targets.unsqueeze(1)
        mask = None if mask is None else mask.reshape(-1, 1)
    elif x.dim() != 3:
        raise ValueError(
            f"{name} must be [C, L, {feature}] or [N, {feature}], got {tuple(x.shape)}"
        )
    if mask is None:
        mask = targets >= 0
    if weights is None:
        weights = torch.ones(targets.shape[0], dtype=torch.float32, device=targets.device)
    if sample_index is None:
        if num_samples not in (None, targets.shape[0]):
            raise ValueError(
                f"num_samples={num_samples} without sample_index: every copy is its "
                f"own sample, so it must be C = {targets.shape[0]} (or left out)"
            )
        sample_index = torch.arange(targets.shape[0], device=targets.device)
        num_samples = targets.shape[0]
    elif num_samples is None:
        raise ValueError("sample_index needs num_samples (samples without copies get 0)")
    return Call(x, targets, mask, weights, sample_index, num_samples)


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def reduce(out: Tensor, call: Call, reduction: str) -> Tensor:
    """The per-sample output [num_samples] reduced as asked (no host sync)."""
    if reduction == "none":
        return out
    total = out.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / call.mask.sum().clamp(min=1)
    return total / max(call.num_samples, 1)
