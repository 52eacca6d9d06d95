"""Psi(S): the Monte-Carlo noise that ELBO-KTO's bias and variance bounds scale with (DESIGN §2).

    Psi(S) = (m-1)/m * (v - c) = mean_i Var_MC(r_i - mean_j r_j)

v: mean per-item MC variance of the margins r_i; c: mean MC covariance between distinct items.
Estimate it from R >= 2 independent redraws (fresh seeds) of the margins of one fixed batch, once
per estimator setting (n_t, n_yt, antithetic, sharing, CRN), to choose a setting by a number.

Gradient noise: the spread of one step's loss gradient over the same redraws. The MC noise of the
margins only rescales each example's gradient (its sign is the label's), while the noise of the
policy ELBO's own gradient enters its direction; the gradient noise weighs both.
"""

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["GradientNoise", "PsiEstimate", "estimate_gradient_noise", "estimate_psi"]


@dataclass(frozen=True)
class PsiEstimate:
    """Sample estimates (unbiased over redraws, divisor R - 1) from a margins matrix [R, m].

    Attributes:
        psi: mean_i Var_MC(r_i - mean_j r_j), computed in this form (no cancellation when c ~ v,
            the regime that shared draws aim for); equals (m-1)/m * (v - c) up to rounding.
        v: mean_i Var_MC(r_i).
        c: mean over i != j of Cov_MC(r_i, r_j).
        psi_baseline: mean_i Var_MC(r_i - b) for the baseline passed to :func:`estimate_psi`, else
            None. For the batch-mean baseline b0 = mean_j r_j, psi_baseline - psi = Var_MC(b - b0).
        num_redraws: R.
        batch_size: m.
    """

    psi: float
    v: float
    c: float
    psi_baseline: float | None
    num_redraws: int
    batch_size: int


def estimate_psi(margins: Tensor, baseline: Tensor | float | None = None) -> PsiEstimate:
    """Estimate Psi(S) from R independent redraws of the margins of the same m items.

    Args:
        margins: float [R, m]; row k holds r_1..r_m (policy ELBO - reference ELBO) under redraw k.
        baseline: optional baseline b, the same for every item: a float, a scalar tensor, or a
            float tensor [R] (one value per redraw, e.g. a KL estimate drawn with the margins).

    Returns:
        PsiEstimate with Python floats, computed in float64 (a diagnostic: it syncs with the host).
    """
    if not isinstance(margins, Tensor) or not margins.is_floating_point() or margins.dim() != 2:
        got = (
            f"{margins.dtype} {list(margins.shape)}"
            if isinstance(margins, Tensor)
            else type(margins)
        )
        raise ValueError(f"margins must be a floating tensor [R, m]; got {got}")
    num_redraws, batch_size = margins.shape
    if num_redraws < 2 or batch_size < 2:
        raise ValueError(
            f"margins is [{num_redraws}, {batch_size}]; need R >= 2 redraws and m >= 2 items"
        )
    r = margins.detach().to(torch.float64)

    def var(x: Tensor) -> Tensor:
        """Unbiased variance over the redraws (dim 0)."""
        return ((x - x.mean(0)) ** 2).sum(0) / (num_redraws - 1)

    v = var(r).mean()
    # sum_{i,j} Cov(r_i, r_j) = Var(sum_i r_i): the off-diagonal part without an [m, m] matrix.
    c = (var(r.sum(1)) - batch_size * v) / (batch_size * (batch_size - 1))
    psi = var(r - r.mean(1, keepdim=True)).mean()

    psi_baseline = None
    if baseline is not None:
        b = baseline.detach() if isinstance(baseline, Tensor) else baseline
        b = torch.as_tensor(b, dtype=torch.float64, device=r.device)
        if b.dim() == 0:
            b = b.expand(num_redraws)
        if b.shape != (num_redraws,):
            raise ValueError(
                f"baseline must be a scalar or [R] = [{num_redraws}]; got {list(b.shape)}"
            )
        psi_baseline = float(var(r - b[:, None]).mean())
    return PsiEstimate(
        psi=float(psi),
        v=float(v),
        c=float(c),
        psi_baseline=psi_baseline,
        num_redraws=num_redraws,
        batch_size=batch_size,
    )


@dataclass(frozen=True)
class GradientNoise:
    """Spread of a loss gradient g over R independent MC redraws of one batch.

    Attributes:
        variance: trace of the covariance of g, E||g - E g||^2 (unbiased, divisor R - 1).
        signal: ||E g||^2, unbiased (||mean g||^2 - variance / R); can come out <= 0 when the
            noise swamps the mean.
        relative_variance: variance / signal, the inverse signal-to-noise ratio of one step's
            gradient (inf when signal <= 0).
        num_redraws: R.
    """

    variance: float
    signal: float
    relative_variance: float
    num_redraws: int


def estimate_gradient_noise(gradients: Iterable[Sequence[Tensor]]) -> GradientNoise:
    """Estimate the gradient noise from R >= 2 gradients of the same loss under independent
    redraws, streamed: each item is one redraw's parameter gradients (any shapes and devices, the
    same every time). Welford's update on the device keeps one float32 mean per parameter and a
    float64 sum of squared deviations (no cancellation when the redraws nearly agree); the only
    host sync is at the end.
    """
    mean: list[Tensor] = []
    deviations: Tensor | None = None  # sum over redraws of (g - old mean) . (g - new mean)
    num_redraws = 0
    for grads in gradients:
        grads = [g.detach().float() for g in grads]
        num_redraws += 1
        if deviations is None:  # the first redraw
            mean = [g.clone() for g in grads]
            deviations = torch.zeros((), dtype=torch.float64, device=grads[0].device)
            continue
        if [g.shape for g in grads] != [m.shape for m in mean]:
            raise ValueError("every redraw must give gradients of the same parameters")
        for m, g in zip(mean, grads):
            delta = g - m
            m.add_(delta, alpha=1 / num_redraws)
            deviations += (delta * (g - m)).sum(dtype=torch.float64).to(deviations.device)
    if deviations is None or num_redraws < 2:
        raise ValueError(f"got {num_redraws} redraws; need R >= 2")
    # A float64 zero to start from (0 + x is exact): the sum is a tensor even without parameters.
    mean_sq = sum(
        (m.square().sum(dtype=torch.float64).to(deviations.device) for m in mean),
        torch.zeros_like(deviations),
    )
    variance, norm_sq = torch.stack([deviations / (num_redraws - 1), mean_sq]).tolist()
    signal = norm_sq - variance / num_redraws
    return GradientNoise(
        variance=variance,
        signal=signal,
        relative_variance=variance / signal if signal > 0 else float("inf"),
        num_redraws=num_redraws,
    )
