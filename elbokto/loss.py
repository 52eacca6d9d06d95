"""ELBO-KTO loss (DESIGN.md §2), its KL baseline, and the paired ELBO-DPO sibling.

Inputs are per-example ELBO estimates B_hat [m] (e.g. from ``fused_linear_elbo``). Only the policy
ELBO gets gradients: the reference is detached here, whatever the caller passes. Metrics are
detached tensors (no host sync) named like TRL's KTO/DPO trainers; they are local to the rank.
"""

from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["elbo_dpo_loss", "elbo_kto_loss", "kl_baseline"]

Baseline = Literal["batch_mean", "none", "kl"]

# |beta * (r - b0)| beyond this puts the sigmoid within ~2.5e-3 of 0 or 1: almost no gradient.
_SATURATION = 6.0


def elbo_kto_loss(
    policy_elbo: Tensor,
    ref_elbo: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    baseline: Baseline = "batch_mean",
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ELBO-KTO loss of a local batch of m examples.

        r_i  = policy_elbo_i - ref_elbo_i
        loss = (1/m) sum_i lambda_i * (1 - sigmoid(beta * s_i * (r_i - b0)))

    with s_i = +1, lambda_i = lambda_d for desirable examples and s_i = -1, lambda_i = lambda_u
    otherwise. m is the LOCAL batch size: with equal local batch sizes, data-parallel gradient
    averaging turns this into the global-batch mean. An empty local batch gives a zero loss that
    still takes part in the baseline's all-reduce.

    Args:
        policy_elbo: float [m], differentiable.
        ref_elbo: float [m]; detached here.
        desirable: bool [m].
        beta: > 0, the KTO temperature.
        lambda_d, lambda_u: >= 0, weights of desirable / undesirable examples.
        baseline: b0, always without gradient.
            "batch_mean": mean of r over the GLOBAL batch (all ranks of the default process group
                when torch.distributed is initialised; every rank must then call this);
            "none": 0;
            "kl": ``kl`` clamped at 0, e.g. from :func:`kl_baseline`.
        kl: float scalar tensor, required with baseline="kl" and rejected otherwise.

    Returns:
        (loss, metrics): loss is a scalar of policy_elbo's dtype promoted to at least float32.
        metrics maps TRL's names to detached scalars: rewards/chosen, rewards/rejected (means of
        beta * r over desirable / undesirable examples, 0 for an empty group), rewards/margins,
        count/chosen, count/rejected, elbo/policy, elbo/reference (means), kl (the b0 used),
        saturated_fraction (share of examples with |beta * (r - b0)| > 6).
    """
    _check_elbos(policy_elbo=policy_elbo, ref_elbo=ref_elbo)
    shape = policy_elbo.shape
    if not isinstance(desirable, Tensor) or desirable.dtype != torch.bool or desirable.shape != shape:
        got = f"{desirable.dtype} {list(desirable.shape)}" if isinstance(desirable, Tensor) else type(desirable)
        raise ValueError(f"desirable must be a bool tensor of shape {list(shape)}; got {got}")
    _check_positive(beta=beta)
    for name, value in {"lambda_d": lambda_d, "lambda_u": lambda_u}.items():
        if not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
            raise ValueError(f"{name}={value!r}; expected a finite number >= 0")
    if baseline not in ("batch_mean", "none", "kl"):
        raise ValueError(f"baseline={baseline!r}; expected 'batch_mean', 'none' or 'kl'")
    if (kl is None) != (baseline != "kl"):
        raise ValueError(
            f"kl is required with baseline='kl' and only then; got baseline={baseline!r}, kl={kl!r}"
        )

    dtype = torch.promote_types(policy_elbo.dtype, torch.float32)
    policy = policy_elbo.to(dtype)
    ref = ref_elbo.detach().to(dtype)
    r = policy - ref
    if baseline == "batch_mean":
        b0 = _global_mean(r)
    elif baseline == "kl":
        if not isinstance(kl, Tensor) or kl.numel() != 1 or not kl.is_floating_point():
            raise ValueError(f"kl must be a floating scalar tensor; got {kl!r}")
        b0 = kl.detach().reshape(()).to(device=r.device, dtype=dtype).clamp(min=0)
    else:
        b0 = torch.zeros((), dtype=dtype, device=r.device)

    sign = desirable.to(dtype) * 2 - 1
    lam = torch.where(desirable, lambda_d, lambda_u).to(dtype)
    z = beta * sign * (r - b0)
    # 1 - sigmoid(z) = sigmoid(-z), without the cancellation for large z.
    loss = (lam * torch.sigmoid(-z)).sum() / max(r.numel(), 1)

    with torch.no_grad():
        rewards = beta * r
        chosen, rejected = _group_mean(rewards, desirable), _group_mean(rewards, ~desirable)
        metrics = {
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "count/chosen": desirable.sum().to(dtype),
            "count/rejected": (~desirable).sum().to(dtype),
            "elbo/policy": _mean(policy),
            "elbo/reference": _mean(ref),
            "kl": b0.clone(),
            "saturated_fraction": _mean((beta * (r - b0)).abs().gt(_SATURATION).to(dtype)),
        }
    return loss, metrics


def kl_baseline(policy_elbo_mismatched: Tensor, ref_elbo_mismatched: Tensor) -> Tensor:
    """KTO's z0 for baseline="kl": detached max(0, mean(policy - ref)) over the GLOBAL batch.

    Args:
        policy_elbo_mismatched, ref_elbo_mismatched: float [n] ELBOs of mismatched (prompt,
            response) pairs, e.g. each prompt with another example's response. When
            torch.distributed is initialised, every rank of the default group must call this.

    Returns:
        float scalar tensor (at least float32), no gradient; 0 for an empty global batch.
    """
    _check_elbos(policy_elbo_mismatched=policy_elbo_mismatched, ref_elbo_mismatched=ref_elbo_mismatched)
    dtype = torch.promote_types(policy_elbo_mismatched.dtype, torch.float32)
    return _global_mean(policy_elbo_mismatched.to(dtype) - ref_elbo_mismatched.to(dtype)).clamp(min=0)


def elbo_dpo_loss(
    policy_chosen: Tensor,
    ref_chosen: Tensor,
    policy_rejected: Tensor,
    ref_rejected: Tensor,
    *,
    beta: float = 0.1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ELBO-DPO (VRPO) loss of m preference pairs: mean_i -log sigmoid(beta * (r_w,i - r_l,i)).

    Args:
        policy_chosen, policy_rejected: float [m] policy ELBOs, differentiable.
        ref_chosen, ref_rejected: float [m] reference ELBOs; detached here.
        beta: > 0.

    Returns:
        (loss, metrics): scalar loss (0 for m = 0) and detached scalars rewards/chosen,
        rewards/rejected (means of beta * (policy - ref)), rewards/margins, rewards/accuracies
        (share of pairs whose chosen reward is the larger).
    """
    _check_elbos(
        policy_chosen=policy_chosen,
        ref_chosen=ref_chosen,
        policy_rejected=policy_rejected,
        ref_rejected=ref_rejected,
    )
    _check_positive(beta=beta)
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)
    chosen = beta * (policy_chosen.to(dtype) - ref_chosen.detach().to(dtype))
    rejected = beta * (policy_rejected.to(dtype) - ref_rejected.detach().to(dtype))
    loss = -F.logsigmoid(chosen - rejected).sum() / max(chosen.numel(), 1)
    with torch.no_grad():
        metrics = {
            "rewards/chosen": _mean(chosen),
            "rewards/rejected": _mean(rejected),
            "rewards/margins": _mean(chosen - rejected),
            "rewards/accuracies": _mean((chosen > rejected).to(dtype)),
        }
    return loss, metrics


def _global_mean(x: Tensor) -> Tensor:
    """Detached mean of a 1-D tensor over all ranks (0 if globally empty), as a scalar of x's dtype.

    All-reduces a [sum, count] pair rather than gathering the values: ranks may hold different
    (even zero) numbers of examples.
    """
    x = x.detach()
    count = torch.full((), x.numel(), dtype=torch.float64, device=x.device)  # a fill: no host copy
    stats = torch.stack([x.sum(dtype=torch.float64), count])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1].clamp(min=1)).to(x.dtype)


def _mean(x: Tensor) -> Tensor:
    """Mean of a 1-D tensor; 0 when it is empty."""
    return x.sum() / max(x.numel(), 1)


def _group_mean(x: Tensor, group: Tensor) -> Tensor:
    """Mean of x over the entries where the bool ``group`` is True; 0 for an empty group."""
    return torch.where(group, x, 0).sum() / group.sum().clamp(min=1)


def _check_elbos(**tensors: Tensor) -> None:
    """Each tensor must be floating, 1-D, with the shape and device of the first."""
    first_name, first = next(iter(tensors.items()))
    for name, x in tensors.items():
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() != 1:
            got = f"{x.dtype} {list(x.shape)}" if isinstance(x, Tensor) else type(x)
            raise ValueError(f"{name} must be a floating tensor [m]; got {got}")
        if x.shape != first.shape or x.device != first.device:
            raise ValueError(
                f"{name} is {list(x.shape)} on {x.device} "
                f"but {first_name} is {list(first.shape)} on {first.device}"
            )


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ValueError(f"{name}={value!r}; expected a finite number > 0")
