"""The dense float64 oracle every backend is checked against (tests, self-check, GPU check).

Materialises the full logits and uses plain autograd: slow and memory-hungry by design, and
independent of the row primitives it checks.
"""

from __future__ import annotations

import torch
from torch import Tensor


def elbo_oracle(logits: Tensor, targets: Tensor, mask: Tensor, weights: Tensor,
                sample_index: Tensor, num_samples: int) -> Tensor:
    """``fused_elbo`` in float64: logits [C, L, V] float64 -> [num_samples] float64."""
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = weights.double() if weights.dim() == 2 else weights.double().unsqueeze(1)
    per_copy = torch.where(mask, picked * w, 0.0).sum(1)
    out = torch.zeros(num_samples, dtype=torch.float64, device=logits.device)
    return out.index_add(0, sample_index, per_copy)


def linear_elbo_oracle(hidden: Tensor, weight: Tensor, bias: Tensor | None,
                       softcap: float | None, targets: Tensor, mask: Tensor, weights: Tensor,
                       sample_index: Tensor, num_samples: int) -> Tensor:
    """``fused_linear_elbo`` in float64 (hidden, weight, bias already float64)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return elbo_oracle(logits, targets, mask, weights, sample_index, num_samples)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(value, gradient) tolerances of DESIGN.md §4, relative to the largest reference entry."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().clamp_min(1e-12)
    return ((actual.double() - expected.double()).abs().max() / scale).item()
