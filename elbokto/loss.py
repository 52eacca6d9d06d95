"""The preference losses on ELBO estimates (DESIGN.md §2): ELBO-KTO (unpaired), its KL baseline,
and ELBO-DPO (paired, the VRPO objective of LLaDA 1.5); :class:`LossConfig` and the ``LOSSES``
table that picks one by ``loss_type``.

Inputs are per-example ELBO estimates B_hat [m] (e.g. from ``fused_linear_elbo``). Only the policy
ELBO gets gradients: the reference is detached here, whatever the caller passes. Metrics are
detached tensors (no host sync) named like TRL's KTO/DPO trainers; they are local to the rank and
the batch, and :func:`pool_metrics` pools those of several batches and ranks as TRL does.

Adding a loss: write ``my_loss(policy_elbo, ref_elbo, ...)``, then one :class:`Loss` record in
``LOSSES`` whose ``compute`` maps a batch's ELBOs to it; ``--loss_type my_loss`` selects it.
"""

from dataclasses import dataclass, field
from typing import Callable, Literal, Mapping, Sequence, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "Loss",
    "LossConfig",
    "compute_loss",
    "elbo_dpo_loss",
    "elbo_kto_loss",
    "kl_baseline",
    "pool_metrics",
]

Baseline = Literal["batch_mean", "none", "kl"]
BASELINES: tuple[str, ...] = get_args(Baseline)

# |beta * (r - b0)| beyond this puts the sigmoid within ~2.5e-3 of 0 or 1: almost no gradient.
_SATURATION = 6.0


@dataclass
class LossConfig:
    """Which preference loss, and its settings (CLI flags). Defaults follow the ELBO-KTO paper."""

    loss_type: str = field(
        default="elbo_kto",
        metadata={
            "help": "'elbo_kto' (unpaired desirable / undesirable examples, the paper's) or "
            "'elbo_dpo' (paired prompt / chosen / rejected data: VRPO, as in LLaDA 1.5)."
        },
    )
    beta: float = field(default=0.1, metadata={"help": "Temperature beta of the loss."})
    lambda_d: float = field(
        default=1.0, metadata={"help": "ELBO-KTO: weight of desirable examples."}
    )
    lambda_u: float = field(
        default=1.0, metadata={"help": "ELBO-KTO: weight of undesirable examples."}
    )
    baseline: Baseline = field(
        default="batch_mean",
        metadata={
            "help": "ELBO-KTO's baseline b0: 'batch_mean' (mean margin of the global batch, "
            "the paper's), 'none' (0) or 'kl' (KTO's KL estimate from mismatched pairs; extra "
            "forwards). ELBO-DPO's chosen-minus-rejected difference cancels any constant b0."
        },
    )

    def __post_init__(self) -> None:
        if self.loss_type not in LOSSES:
            raise ValueError(f"loss_type={self.loss_type!r}; expected one of {sorted(LOSSES)}")
        _check_positive(beta=self.beta)
        _check_weights(lambda_d=self.lambda_d, lambda_u=self.lambda_u)
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline={self.baseline!r}; expected one of {BASELINES}")
        if self.paired and (self.baseline == "kl" or (self.lambda_d, self.lambda_u) != (1, 1)):
            raise ValueError(
                f"loss_type={self.loss_type!r} compares the two responses of a pair: "
                "baseline='kl' and the class weights lambda_d / lambda_u are "
                "ELBO-KTO settings and do not apply"
            )

    @property
    def paired(self) -> bool:
        """Whether the loss takes pairs (consecutive chosen, rejected rows) instead of examples."""
        return LOSSES[self.loss_type].paired


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
        beta * r over desirable / undesirable examples), rewards/margins (their difference),
        logps/chosen, logps/rejected (mean policy ELBO per class: the ELBO stands in for the
        log-probability), each NaN when the batch holds no example of its class (absent, not 0:
        :func:`pool_metrics` weighs them by the counts), count/chosen, count/rejected,
        elbo/policy, elbo/reference (means),
        saturated_fraction (share of examples with |beta * (r - b0)| > 6), baseline (the b0
        used), and kl (the clamped KL estimate, = b0) with baseline="kl" only.
    """
    _check_elbos(policy_elbo=policy_elbo, ref_elbo=ref_elbo)
    shape = policy_elbo.shape
    if (
        not isinstance(desirable, Tensor)
        or desirable.dtype != torch.bool
        or desirable.shape != shape
    ):
        got = (
            f"{desirable.dtype} {list(desirable.shape)}"
            if isinstance(desirable, Tensor)
            else type(desirable)
        )
        raise ValueError(f"desirable must be a bool tensor of shape {list(shape)}; got {got}")
    _check_positive(beta=beta)
    _check_weights(lambda_d=lambda_d, lambda_u=lambda_u)
    if baseline not in BASELINES:
        raise ValueError(f"baseline={baseline!r}; expected one of {BASELINES}")
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
    # Filled in the loss dtype (torch.where of two Python floats would round them to float32);
    # fills, not copies from the host.
    lam = torch.where(
        desirable,
        torch.full((), lambda_d, dtype=dtype, device=r.device),
        torch.full((), lambda_u, dtype=dtype, device=r.device),
    )
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
            "logps/chosen": _group_mean(policy, desirable),
            "logps/rejected": _group_mean(policy, ~desirable),
            "count/chosen": desirable.sum().to(dtype),
            "count/rejected": (~desirable).sum().to(dtype),
            "elbo/policy": _mean(policy),
            "elbo/reference": _mean(ref),
            "saturated_fraction": _mean((beta * (r - b0)).abs().gt(_SATURATION).to(dtype)),
            "baseline": b0.clone(),
        }
        if baseline == "kl":
            metrics["kl"] = b0.clone()
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
    _check_elbos(
        policy_elbo_mismatched=policy_elbo_mismatched, ref_elbo_mismatched=ref_elbo_mismatched
    )
    dtype = torch.promote_types(policy_elbo_mismatched.dtype, torch.float32)
    margins = policy_elbo_mismatched.to(dtype) - ref_elbo_mismatched.to(dtype)
    return _global_mean(margins).clamp(min=0)


# How pool_metrics weighs a class mean: by the count of its class (TRL's KTO pooling).
_CLASS_COUNT = {
    "rewards/chosen": "count/chosen",
    "logps/chosen": "count/chosen",
    "rewards/rejected": "count/rejected",
    "logps/rejected": "count/rejected",
}
_COUNTS = ("count/chosen", "count/rejected")


def pool_metrics(
    metrics: Mapping[str, Sequence[Tensor]],
    reduce_sum: Callable[[Tensor], Tensor] = lambda totals: totals,
) -> dict[str, float]:
    """The metrics of several batches (and ranks) as one, pooled as TRL's KTO trainer pools them.

    With counts (ELBO-KTO): a class mean (rewards/ and logps/ of chosen or rejected) is the mean
    over all examples of its class, i.e. the batches' means weighed by count/chosen or
    count/rejected, and is left out when no batch holds the class; rewards/margins is the pooled
    chosen minus the pooled rejected mean (left out unless both are present); the counts add up;
    any other metric is weighed by its batch's number of examples. Without counts (ELBO-DPO),
    every metric is the mean over the batches.

    Args:
        metrics: name -> detached scalar tensors, one per batch (the dicts of the loss
            functions, gathered); every name holds the same batches.
        reduce_sum: sums a float64 [2 * names] tensor over the ranks (e.g. accelerate's
            ``reduce(t, "sum")``); called once, by every rank, on every call. Default: one rank.

    Returns:
        name -> float; one host sync.
    """
    counted = all(name in metrics for name in _COUNTS)
    names = sorted(name for name in metrics if not (counted and name == "rewards/margins"))
    if not names:
        return {}

    def stacked(name: str) -> Tensor:
        return torch.stack([v.detach().reshape(()) for v in metrics[name]]).double()

    examples = stacked(_COUNTS[0]) + stacked(_COUNTS[1]) if counted else None
    sums, weights = [], []
    for name in names:
        values = stacked(name)
        if name in _COUNTS or examples is None:  # None exactly when not counted
            weight = torch.ones_like(values)
        else:
            weight = stacked(_CLASS_COUNT[name]) if name in _CLASS_COUNT else examples
        # A batch without the class holds NaN there, with weight 0: it adds nothing.
        sums.append(torch.where(weight > 0, values * weight, 0).sum())
        weights.append(weight.sum())
    totals = reduce_sum(torch.stack(sums + weights)).tolist()
    pooled = {}
    for name, total, weight in zip(names, totals[: len(names)], totals[len(names) :]):
        if name in _COUNTS:
            pooled[name] = total
        elif weight > 0:
            pooled[name] = total / weight
    if counted and "rewards/chosen" in pooled and "rewards/rejected" in pooled:
        pooled["rewards/margins"] = pooled["rewards/chosen"] - pooled["rewards/rejected"]
    return pooled


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
        (share of pairs whose chosen reward is the larger), logps/chosen, logps/rejected (mean
        policy ELBOs).
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
            "logps/chosen": _mean(policy_chosen.detach().to(dtype)),
            "logps/rejected": _mean(policy_rejected.detach().to(dtype)),
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
    """Mean of x over the entries where the bool ``group`` is True; NaN (0 / 0) for an empty
    group, which has no mean."""
    return torch.where(group, x, 0).sum() / group.sum()


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


def _check_weights(**values: float) -> None:
    for name, value in values.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 <= value < float("inf")
        ):
            raise ValueError(f"{name}={value!r}; expected a finite number >= 0")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not 0 < value < float("inf")
        ):
            raise ValueError(f"{name}={value!r}; expected a finite number > 0")


def _kto(
    policy_elbo: Tensor, ref_elbo: Tensor, desirable: Tensor, config: LossConfig, kl: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    return elbo_kto_loss(
        policy_elbo,
        ref_elbo,
        desirable,
        beta=config.beta,
        lambda_d=config.lambda_d,
        lambda_u=config.lambda_u,
        baseline=config.baseline,
        kl=kl,
    )


def _dpo(
    policy_elbo: Tensor, ref_elbo: Tensor, desirable: Tensor, config: LossConfig, kl: Tensor | None
) -> tuple[Tensor, dict[str, Tensor]]:
    if desirable.dim() != 1 or desirable.numel() % 2:
        raise ValueError(
            f"a paired batch holds (chosen, rejected) rows: an even number, got "
            f"{list(desirable.shape)}"
        )
    # Checked on the device: no host sync in the step (raises at once on CPU).
    torch._assert_async(
        desirable[0::2].all() & ~desirable[1::2].any(),
        "a paired batch must alternate chosen (desirable) and rejected rows",
    )
    return elbo_dpo_loss(
        policy_elbo[0::2], ref_elbo[0::2], policy_elbo[1::2], ref_elbo[1::2], beta=config.beta
    )


@dataclass(frozen=True)
class Loss:
    """One entry of :data:`LOSSES`.

    compute: (policy_elbo float [B], ref_elbo float [B], desirable bool [B], config, kl scalar or
        None) -> (scalar loss, detached metrics).
    paired: the batch holds pairs as consecutive rows, chosen (desirable) then rejected, and both
        rows of a pair share their Monte-Carlo draws.
    """

    compute: Callable[
        [Tensor, Tensor, Tensor, LossConfig, Tensor | None], tuple[Tensor, dict[str, Tensor]]
    ]
    paired: bool


LOSSES: dict[str, Loss] = {
    "elbo_kto": Loss(_kto, paired=False),
    "elbo_dpo": Loss(_dpo, paired=True),
}


def compute_loss(
    config: LossConfig,
    policy_elbo: Tensor,
    ref_elbo: Tensor,
    desirable: Tensor,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss ``config.loss_type`` names, on one batch's ELBOs (see :class:`Loss`)."""
    return LOSSES[config.loss_type].compute(policy_elbo, ref_elbo, desirable, config, kl)
