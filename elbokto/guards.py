"""Non-finite numbers are stopped before they reach the weights.

A NaN or inf in one ELBO (a bad precomputed value, an overflow in the policy's forward) spreads
through the batch-mean baseline to the whole loss, then to every gradient and, after one optimizer
step, to every weight. The objective checks its ELBOs and loss (:func:`check_step_values`); the
trainer checks the gradients before each optimizer step. Both agree across data-parallel ranks, so
that every rank stops, or skips, the same step.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


class NonFiniteError(ValueError):
    """A NaN or inf in a training step, before the optimizer used it."""


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """Whether every tensor is finite on every rank of the default process group (one host sync;
    every rank must call it when torch.distributed is initialised)."""
    flags = [torch.isfinite(t).all() for t in tensors if t.numel()]
    if not flags:
        flags = [torch.ones((), dtype=torch.bool)]
    device = flags[0].device
    finite = torch.stack([f.to(device) for f in flags]).all().to(torch.int32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def check_step_values(uids: Tensor, *, loss: Tensor, **elbos: Tensor) -> None:
    """Raises :class:`NonFiniteError` when the loss or any per-example ELBO is not finite here or
    on another rank, naming the sources (the keyword names, e.g. policy, reference) and the uids
    of the offending examples.

    Args:
        uids: int64 [B], the batch's example ids.
        loss: scalar.
        **elbos: float [B] per source.
    """
    if all_finite([loss, *elbos.values()]):
        return
    found = []
    for source, values in elbos.items():
        bad = ~torch.isfinite(values)
        if bad.any():
            found.append(
                f"{source} ELBO of uids {uids[bad].tolist()[:8]}"
                f"{' ...' if int(bad.sum()) > 8 else ''}: {values[bad].tolist()[:8]}"
            )
    if not found and not torch.isfinite(loss):
        found.append(
            f"the loss ({float(loss)}) with finite ELBOs (an overflow in the loss or its baseline)"
        )
    where = "; ".join(found) if found else "another data-parallel rank (see its error)"
    raise NonFiniteError(f"non-finite values in the training step: {where}")
