"""The dense float64 oracle every backend is checked against (tests, self-check, GPU check).

Materialises the full logits and uses plain autograd: slow and memory-hungry by design, and
independent of the row primitives it checks. ``row_lse_oracle`` / ``row_grad_oracle`` are the
row primitives of ``backends.RowOps`` in float64; ``elbo_oracle`` / ``linear_elbo_oracle`` the ops;
``filter_bounds`` the tolerance of the filtered linear op (``filter_eps``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def elbo_oracle(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    num_samples: int,
) -> Tensor:
    """``fused_elbo`` in float64: logits [C, L, V] float64 -> [num_samples] float64.

    log p = z - logsumexp(z), as the row primitives compute it (``row_lse_oracle``): equal to
    log_softmax for finite logits, and for non-finite ones torch.logsumexp's convention (a row
    holding +inf has lse +inf, so its other tokens get -inf; a NaN anywhere gives NaN), where
    log_softmax would turn a +inf row into NaN."""
    logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    w = weights.double() if weights.dim() == 2 else weights.double().unsqueeze(1)
    per_copy = torch.where(mask, picked * w, 0.0).sum(1)
    out = torch.zeros(num_samples, dtype=torch.float64, device=logits.device)
    return out.index_add(0, sample_index, per_copy)


def linear_elbo_oracle(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    num_samples: int,
) -> Tensor:
    """``fused_linear_elbo`` in float64 (hidden, weight, bias already float64)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return elbo_oracle(
        _softcapped(logits, softcap), targets, mask, weights, sample_index, num_samples
    )


def row_lse_oracle(
    x: Tensor, rows: Tensor | None, targets: Tensor, softcap: float | None
) -> tuple[Tensor, Tensor]:
    """``RowOps.row_lse`` in float64: (lse, target_logit), float64 [M] each."""
    z = _softcapped((x if rows is None else x[rows]).double(), softcap)
    vocab = x.shape[1]
    inside = (targets >= 0) & (targets < vocab)
    picked = z.gather(1, targets.clamp(0, vocab - 1).unsqueeze(1)).squeeze(1)
    return torch.logsumexp(z, dim=1), torch.where(inside, picked, 0.0)


def row_grad_oracle(
    x: Tensor, rows: Tensor | None, targets: Tensor, scale: Tensor, softcap: float | None
) -> Tensor:
    """What ``RowOps.row_grad`` writes into ``out[rows]``, float64 [M, V]: by autograd, the
    gradient of ``scale * (target_logit - lse)`` with respect to the rows of x."""
    rows_x = (x if rows is None else x[rows]).detach().double().requires_grad_()
    lse, target_logit = row_lse_oracle(rows_x, None, targets, softcap)
    (grad,) = torch.autograd.grad((scale.double() * (target_logit - lse)).sum(), rows_x)
    return grad


def _softcapped(logits: Tensor, softcap: float | None) -> Tensor:
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def filter_bounds(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    grad_out: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """How far ``filter_eps=eps`` may move each gradient of ``fused_linear_elbo`` (DESIGN.md §4).

    Filtering drops entries of the logit gradient ``g = (onehot - softmax) * dz/dx`` (before the
    per-row scale s = grad_out[sample] * w) that are below eps. Over the entries that are below
    eps here (every entry the op may drop), the bound on each gradient entry is eps * |s| summed
    over what it receives from them:

        dH[r, d] <= eps |s_r| sum_{v: |g_rv| < eps} |W[v, d]|
        dW[v, d] <= eps sum_{r: |g_rv| < eps} |s_r h[r, d]|,   db[v] <= eps sum_{r: ...} |s_r|

    Inputs as for ``linear_elbo_oracle`` (float64) plus grad_out [num_samples]; returns float64
    (dH [C, L, D], dW [V, D], db [V]). The threshold is widened by 1e-3 relative, for entries
    that float32 rounds across it.
    """
    C, L, D = hidden.shape
    index = mask.reshape(-1).nonzero().squeeze(1)
    h = hidden.reshape(-1, D)[index].double()
    logits = h @ weight.double().T
    if bias is not None:
        logits = logits + bias.double()
    z = _softcapped(logits, softcap)
    g = -torch.softmax(z, dim=1)
    g[torch.arange(index.numel()), targets.reshape(-1)[index]] += 1.0
    if softcap is not None:
        g = g * (1.0 - torch.tanh(logits / softcap) ** 2)
    eps = eps * (1 + 1e-3)
    below = (g.abs() < eps).double()
    w = weights.double().reshape(-1)[index] if weights.dim() == 2 else weights.double()[index // L]
    s = (grad_out.double()[sample_index[index // L]] * w).abs()
    grad_h = torch.zeros(C * L, D, dtype=torch.float64, device=hidden.device)
    grad_h[index] = eps * s[:, None] * (below @ weight.double().abs())
    return (grad_h.view(C, L, D), eps * below.T @ (s[:, None] * h.abs()), eps * below.T @ s)


def tolerances(dtype: torch.dtype, vocab: int = 1) -> tuple[float, float]:
    """(value, gradient) tolerances of DESIGN.md §4, relative to the largest reference entry.

    ``vocab``: the length of the sums behind the gradient (the hidden-state gradient of the
    linear op sums V products). A float32 sum that holds a large term (the target's) gains about
    one rounding of that term per addition, so its error grows like 2^-24 sqrt(V): the float32
    gradient tolerance is max(1e-5, 2 * 2^-24 * sqrt(V)) (4.2e-5 at V = 126464)."""
    if dtype == torch.float32:
        return 1e-5, max(1e-5, 2 * 2.0**-24 * vocab**0.5)
    return 1e-4, 1e-2


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64 (0 for empty tensors)."""
    if actual.numel() == 0:
        return 0.0
    scale = expected.double().abs().max().clamp_min(1e-12)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def assert_close(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """Raises AssertionError unless |actual - expected| <= rel * max|expected| elementwise."""
    err = relative_error(actual, expected)
    if not err <= rel:
        raise AssertionError(f"{what}: relative error {err:.3g} > {rel:g}")
