"""``fused_elbo``: per-sample ELBO from logits, one fused pass over the masked rows.

Registered as the custom op ``elbokto::fused_elbo`` with its autograd, so torch.compile treats it as
opaque. The op returns ``(out, lse)``: the per-row log-sum-exp is saved for the backward, which
recomputes the softmax and applies the per-row scale ``grad_out[sample] * w`` (upstream gradients
differ per sample, so nothing is precomputed for a scalar upstream).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import memory
from .backends import Backend, resolve_backend, row_ops
from .call_forms import Reduction, check_reduction, normalise, reduce
from .masked_rows import (
    check_compute_dtype,
    check_elbo_inputs,
    gather_masked_rows,
    masked_index,
    reduce_rows,
    rows_at,
    unmasked_index,
)


def fused_elbo(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    sample_index: Tensor | None = None,
    num_samples: int | None = None,
    *,
    reduction: Reduction = "none",
    backend: Backend = "auto",
) -> Tensor:
    """Weighted masked log-likelihood summed per sample: the Monte-Carlo ELBO of each sample.

    ``out[b] = sum_{c: sample_index[c] = b} sum_p mask[c, p] * w[c, p]
    * log_softmax(logits[c, p])[targets[c, p]]``

    Args:
        logits: [C, L, V] float32 / bfloat16 / float16, any strides (C copies of length L);
            or [N, V] (N positions, each its own sample: ``call_forms``). float64 is refused
            (the kernels compute in float32).
        targets: [C, L] (or [N]) integer clean tokens; ignored where ``mask`` is False.
        mask: [C, L] bool, True where the position was masked and is scored; None: where the
            target is not negative (the -100 ignore-index convention).
        weights: [C] (per copy) or [C, L] (per position) float, e.g. ``1 / (t * K)``: the caller
            folds the 1/K of the Monte-Carlo mean in. None: 1.
        sample_index: [C] integer, the sample in [0, num_samples) each copy belongs to. None:
            every copy is its own sample (the plain masked-diffusion loss).
        num_samples: number of samples B (samples without copies get 0); with sample_index.
        reduction: "none" ([num_samples]), "sum", "mean" (over the scored positions) or
            "sample_mean" (over the samples).
        backend: "auto" (triton on CUDA, the C++ kernel on CPU when it builds, else torch),
            "triton", "torch" or "cpu".

    Returns:
        [num_samples] float32, or a scalar when reduced. Differentiable w.r.t. ``logits``; the
        gradient comes back in logits' dtype, exactly zero at unmasked positions. One host sync
        (the masked-row count) in forward and one in backward. The training loss is its
        negative.
    """
    check_reduction(reduction)
    call = normalise("logits", "V", logits, targets, mask, weights, sample_index, num_samples)
    logits, targets = call.x, call.targets
    check_compute_dtype("logits", logits)
    if tuple(targets.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"targets must be [C, L] = {list(logits.shape[:2])}, got {tuple(targets.shape)}"
        )
    check_elbo_inputs(
        targets, call.mask, call.weights, call.sample_index, call.num_samples, logits.device
    )
    name = resolve_backend(backend, logits.device)
    out, _ = torch.ops.elbokto.fused_elbo(
        logits, targets, call.mask, call.weights, call.sample_index, call.num_samples, name
    )
    return reduce(out, call, reduction)


@torch.library.custom_op("elbokto::fused_elbo", mutates_args=())
def _fused_elbo(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    num_samples: int,
    backend: str,
) -> tuple[Tensor, Tensor]:
    C, L, V = logits.shape
    rows = gather_masked_rows(targets, mask, weights, sample_index, V, num_samples)
    # reshape is a view for contiguous logits and for vocabulary slices; a copy only when C and L
    # cannot be merged (e.g. a transposed view).
    lse, target_logit = row_ops(backend).row_lse(
        logits.reshape(C * L, V), rows.index, rows.target, None
    )
    return reduce_rows(rows, target_logit, lse, num_samples, targets.shape)


@_fused_elbo.register_fake
def _(logits, targets, mask, weights, sample_index, num_samples, backend):
    return (
        logits.new_empty(num_samples, dtype=torch.float32),
        logits.new_empty(targets.shape, dtype=torch.float32),
    )


@torch.library.custom_op("elbokto::fused_elbo_backward", mutates_args=())
def _fused_elbo_backward(
    grad_out: Tensor,
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    lse: Tensor,
    backend: str,
) -> Tensor:
    C, L, V = logits.shape
    rows = rows_at(masked_index(mask), targets, weights, sample_index)
    scale = grad_out.float()[rows.sample] * rows.scale
    # Every gradient row is written once: zeros for the unmasked rows, the kernel for the rest.
    grad = memory.empty((C * L, V), logits.dtype, logits.device)
    grad.index_fill_(0, unmasked_index(mask, rows.count), 0)
    row_ops(backend).row_grad(
        logits.reshape(C * L, V),
        rows.index,
        rows.target,
        lse.reshape(-1)[rows.index],
        scale,
        None,
        grad,
    )
    return grad.view(C, L, V)


@_fused_elbo_backward.register_fake
def _(grad_out, logits, targets, mask, weights, sample_index, lse, backend):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, targets, mask, weights, sample_index, _, backend = inputs
    ctx.save_for_backward(logits, targets, mask, weights, sample_index, output[1])
    ctx.backend = backend
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero tensors for the non-differentiable output


def _backward(ctx, grad_out, _grad_lse):
    logits, targets, mask, weights, sample_index, lse = ctx.saved_tensors
    grad = torch.ops.elbokto.fused_elbo_backward(
        grad_out, logits, targets, mask, weights, sample_index, lse, ctx.backend
    )
    return grad, None, None, None, None, None, None


_fused_elbo.register_autograd(_backward, setup_context=_setup_context)
