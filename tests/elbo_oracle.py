"""The float64 oracle the kernels are checked against: dense logits, plain autograd."""

from __future__ import annotations

import torch
from torch import Tensor

BACKENDS = ("torch", "triton", "cpu")


def elbo_oracle(logits: Tensor, targets: Tensor, mask: Tensor, weights: Tensor,
                sample_index: Tensor, num_samples: int) -> Tensor:
    """float64 [num_samples] from float64 logits [C, L, V] (differentiable)."""
    logp = torch.log_softmax(logits, dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = weights.double() if weights.dim() == 2 else weights.double().unsqueeze(1)
    per_copy = torch.where(mask, picked * w, 0.0).sum(1)
    return torch.zeros(num_samples, dtype=torch.float64).index_add(0, sample_index, per_copy)


def linear_oracle(hidden, weight, bias, softcap, *args) -> Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return elbo_oracle(logits, *args)


def tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """(value, gradient) relative tolerances of DESIGN.md §4."""
    return (1e-5, 1e-5) if dtype == torch.float32 else (1e-4, 1e-2)


def assert_close(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """|actual - expected| <= rel * max|expected| elementwise (float64 comparison)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    err = (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0
    assert err <= rel * max(scale, 1e-12), f"{what}: max error {err:.3g} > {rel:g} * {scale:.3g}"
