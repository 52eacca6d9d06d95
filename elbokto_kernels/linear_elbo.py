"""``fused_linear_elbo``: per-sample ELBO from final hidden states, never materialising logits.

Only the masked rows are gathered (``h``: [M, D]). The vocabulary is walked in chunks of Vc
columns: a GEMM gives the float32 logits of all M rows for that chunk, a backend row primitive
folds them into the running log-sum-exp (forward) or turns them into the logit gradient
(backward), and further GEMMs give dH and dW for the chunk. Chunking over the vocabulary rather
than over rows means each dW chunk is ONE GEMM over all M rows (float32 accumulation inside the
GEMM, no float32 [V, D] buffer), while dH ([M, D], small) accumulates in float32 across chunks.
Peak extra memory: M * Vc * (4 + itemsize) bytes for the chunk, plus 4 * M * D for dH.

FLOPs: forward 2MDV, backward 6MDV (logits recomputed, dH, dW); dW is skipped when the head is
frozen (LoRA), dH when the hidden states need no gradient. Upstream gradients differ per sample,
so nothing of the backward can be done ahead in the forward; the recompute is the price of not
holding M x V float32 logits. ``keep_logits=True`` pays that memory instead (backward 4MDV).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import memory
from .backends import resolve_backend, row_ops
from .masked_rows import (check_elbo_inputs, gather_masked_rows, masked_index, reduce_rows,
                          rows_at)

# Float32 elements of one logit chunk: 2^26 (256 MiB) on GPU, 2^22 (16 MiB) on CPU. At M = 16384,
# D = 4096 the workspace is then ~0.8 GB: logits 256 MiB + half gradient 128 MiB + dH 256 MiB +
# gathered rows 128 MiB, while each GEMM still has 4096 columns.
_CHUNK_ELEMENTS = {"cuda": 1 << 26, "cpu": 1 << 22}


def fused_linear_elbo(hidden: Tensor, weight: Tensor, targets: Tensor, mask: Tensor,
                      weights: Tensor, sample_index: Tensor, num_samples: int, *,
                      bias: Tensor | None = None, softcap: float | None = None,
                      chunk_size: int | None = None, keep_logits: bool = False,
                      backend: str = "auto") -> Tensor:
    """``fused_elbo`` of ``logits = hidden @ weight.T (+ bias)``, soft-capped when asked.

    Args:
        hidden: [C, L, D] float32 / bfloat16 / float16 final hidden states.
        weight: [V, D] LM-head weight, hidden's dtype. bias: optional [V], same dtype.
        targets, mask, weights, sample_index, num_samples: as in ``fused_elbo``.
        softcap: Gemma-style final-logit soft-capping ``s * tanh(logits / s)``; None for none.
        chunk_size: vocabulary columns per chunk; None picks one from a memory budget.
        keep_logits: keep the float32 logits of the M masked rows (4 * M * V bytes) from forward
            to backward instead of recomputing them: a quarter fewer FLOPs for that memory.
        backend: "auto", "triton", "torch" or "cpu" for the row primitives (GEMMs are torch's).

    Returns:
        [num_samples] float32, differentiable w.r.t. hidden, weight and bias (gradients in their
        dtypes; float32 accumulation). No [C * L, V] tensor is ever built; with keep_logits one
        [M, V] float32 tensor lives until the backward.
    """
    if hidden.dim() != 3 or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be floating [C, L, D], got {hidden.dtype} "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2] or weight.dtype != hidden.dtype:
        raise ValueError(f"weight must be [V, D={hidden.shape[2]}] of dtype {hidden.dtype}, got "
                         f"{weight.dtype} {tuple(weight.shape)}")
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(f"bias must be [V={weight.shape[0]}] of dtype {weight.dtype}, got "
                         f"{bias.dtype} {tuple(bias.shape)}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"targets must be [C, L] = {list(hidden.shape[:2])}, got "
                         f"{tuple(targets.shape)}")
    check_elbo_inputs(targets, mask, weights, sample_index, num_samples, hidden.device)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, expected {hidden.device}")
    name = resolve_backend(backend, hidden.device)
    # Logits are kept only for a backward that will happen.
    keep_logits = bool(keep_logits) and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    out, _, _ = torch.ops.elbokto.fused_linear_elbo(
        hidden, weight, bias, targets, mask, weights, sample_index, num_samples,
        None if softcap is None else float(softcap), chunk_size or 0, keep_logits, name)
    return out


def _chunk_columns(vocab: int, num_rows: int, chunk_size: int, device: torch.device) -> int:
    if chunk_size:
        return min(chunk_size, vocab)
    budget = _CHUNK_ELEMENTS.get(device.type, _CHUNK_ELEMENTS["cpu"])
    return min(vocab, max(128, budget // max(num_rows, 1) // 128 * 128))


def _gemm_rows(hidden: Tensor, index: Tensor) -> Tensor:
    """The masked rows [M, D] as the GEMMs take them: float32 on CPU, which has no half GEMM
    with float32 output (converted once here rather than once per chunk)."""
    h = hidden.reshape(-1, hidden.shape[-1])[index]
    return h if h.is_cuda else h.float()


def _matmul_into(out: Tensor, a: Tensor, b: Tensor, accumulate: bool = False) -> Tensor:
    """``out = a @ b`` (``out += a @ b`` when accumulating) with a float32 product.

    Float32 results go straight into ``out``: on CPU a fresh temporary per chunk would cost its
    page faults every chunk. Half operands use a half GEMM with float32 output on CUDA; on CPU,
    which has none, float32 copies."""
    if a.is_cuda and a.dtype != torch.float32:
        if out.dtype == torch.float32 and not accumulate:
            return torch.mm(a, b, out_dtype=torch.float32, out=out)
        product = torch.mm(a, b, out_dtype=torch.float32)
    else:
        a, b = a.float(), b.float()  # no-ops for float32 operands
        if out.dtype == torch.float32:
            return out.addmm_(a, b) if accumulate else torch.mm(a, b, out=out)
        product = torch.mm(a, b)
    return out.add_(product) if accumulate else out.copy_(product)


class _ChunkWorkspace:
    """The vocabulary walk and its buffers.

    Logits of a chunk are computed into one float32 [M, chunk] buffer reused by every chunk, or
    into ``store``, float32 [M * V] holding the whole [M, V] logits chunk by chunk (chunk
    [start, end) is the [M, end - start] block at offset M * start), which a backward with
    ``filled=True`` then reads instead of recomputing.

    Args:
        h: [M, D] masked rows from ``_gemm_rows``; weight: [V, D]; bias: [V] or None.
        chunk_size: columns per chunk, 0 for the device's memory budget.
        store, filled: see above; None / False for the recompute path.
    """

    def __init__(self, h: Tensor, weight: Tensor, bias: Optional[Tensor], chunk_size: int,
                 store: Optional[Tensor] = None, filled: bool = False):
        self.h, self.weight, self.bias, self.store, self.filled = h, weight, bias, store, filled
        self.chunk = _chunk_columns(weight.shape[0], h.shape[0], chunk_size, h.device)
        size = h.shape[0] * self.chunk
        half = h.dtype != torch.float32
        # The float32 buffer holds computed logits (no store) or the gradient of kept ones.
        needs_z = store is None or (filled and not half)
        self._z = memory.empty((size,), torch.float32, h.device) if needs_z else None
        self._dz = memory.empty((size,), h.dtype, h.device) if half else None

    def chunks(self):
        """(start, end) column ranges of the vocabulary, ``chunk`` columns each."""
        vocab = self.weight.shape[0]
        for start in range(0, vocab, self.chunk):
            yield start, min(start + self.chunk, vocab)

    def _block(self, buffer: Tensor, start: int, end: int, offset: int = 0) -> Tensor:
        rows = self.h.shape[0]
        return buffer[offset: offset + rows * (end - start)].view(rows, end - start)

    def logits(self, start: int, end: int) -> Tensor:
        """float32 [M, end - start] logits of the chunk: read back when kept, else computed."""
        if self.store is None:
            return self._compute(self._block(self._z, start, end), start, end)
        z = self._block(self.store, start, end, self.h.shape[0] * start)
        return z if self.filled else self._compute(z, start, end)

    def _compute(self, z: Tensor, start: int, end: int) -> Tensor:
        _matmul_into(z, self.h, self.weight[start:end].t())
        if self.bias is not None:
            z += self.bias[start:end].float()
        return z

    def grad_buffer(self, z: Tensor, start: int, end: int) -> Tensor:
        """Where the chunk's logit gradient goes: a half buffer for the half GEMMs; else over
        recomputed logits in place (each element is read before the same program writes it), or
        the float32 buffer for kept logits, which a second backward (retain_graph) reads again."""
        if self._dz is not None:
            return self._block(self._dz, start, end)
        return z if self.store is None else self._block(self._z, start, end)


@torch.library.custom_op("elbokto::fused_linear_elbo", mutates_args=())
def _fused_linear_elbo(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                       mask: Tensor, weights: Tensor, sample_index: Tensor, num_samples: int,
                       softcap: Optional[float], chunk_size: int, keep_logits: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (out [num_samples], lse [C, L], kept logits float32 [M * V] or empty)."""
    C, L, D = hidden.shape
    rows = gather_masked_rows(targets, mask, weights, sample_index, weight.shape[0], num_samples)
    h = _gemm_rows(hidden, rows.index)
    ops = row_ops(backend)
    lse = torch.full((rows.count,), float("-inf"), dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros_like(lse)
    kept = (memory.empty((rows.count * weight.shape[0],), torch.float32, hidden.device)
            if keep_logits else hidden.new_empty(0, dtype=torch.float32))
    work = _ChunkWorkspace(h, weight, bias, chunk_size, kept if keep_logits else None)
    for start, end in work.chunks():
        z = work.logits(start, end)
        chunk_lse, chunk_target = ops.row_lse(z, None, rows.target - start, softcap)
        lse = torch.logaddexp(lse, chunk_lse)
        target_logit += chunk_target
    return reduce_rows(rows, target_logit, lse, num_samples, targets.shape) + (kept,)


@_fused_linear_elbo.register_fake
def _(hidden, weight, bias, targets, mask, weights, sample_index, num_samples, softcap,
      chunk_size, keep_logits, backend):
    kept = torch.library.get_ctx().new_dynamic_size() * weight.shape[0] if keep_logits else 0
    return (hidden.new_empty(num_samples, dtype=torch.float32),
            hidden.new_empty(targets.shape, dtype=torch.float32),
            hidden.new_empty(kept, dtype=torch.float32))


@torch.library.custom_op("elbokto::fused_linear_elbo_backward", mutates_args=())
def _fused_linear_elbo_backward(
        grad_out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
        targets: Tensor, mask: Tensor, weights: Tensor, sample_index: Tensor, lse: Tensor,
        kept: Tensor, softcap: Optional[float], chunk_size: int, keep_logits: bool,
        backend: str, needs_hidden_grad: bool, needs_weight_grad: bool,
        needs_bias_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_hidden, grad_weight, grad_bias); an unneeded one is an empty tensor. ``kept``
    is the forward's third output (the logits when ``keep_logits``)."""
    C, L, D = hidden.shape
    rows = rows_at(masked_index(mask), targets, weights, sample_index)
    h = _gemm_rows(hidden, rows.index)
    scale = grad_out.float()[rows.sample] * rows.scale
    row_lse = lse.reshape(-1)[rows.index]
    ops = row_ops(backend)
    grad_h = torch.zeros((rows.count, D) if needs_hidden_grad else (0,), dtype=torch.float32,
                         device=hidden.device)
    # Every chunk writes its rows of grad_w, so it needs no zero fill.
    grad_w = (memory.empty(weight.shape, weight.dtype, weight.device) if needs_weight_grad
              else weight.new_empty(0))
    grad_b = torch.zeros_like(bias) if needs_bias_grad else weight.new_empty(0)
    work = _ChunkWorkspace(h, weight, bias, chunk_size, kept if keep_logits else None,
                           filled=True)
    for start, end in work.chunks():
        z = work.logits(start, end)
        dz = work.grad_buffer(z, start, end)
        ops.row_grad(z, None, rows.target - start, row_lse, scale, softcap, dz)
        if needs_hidden_grad:
            _matmul_into(grad_h, dz, weight[start:end], accumulate=True)
        if needs_weight_grad:
            _matmul_into(grad_w[start:end], dz.t(), h)
        if needs_bias_grad:
            grad_b[start:end] = dz.float().sum(0)
    if needs_hidden_grad:
        full = torch.zeros((C * L, D), dtype=hidden.dtype, device=hidden.device)
        full[rows.index] = grad_h.to(hidden.dtype)
        grad_h = full.view(C, L, D)
    else:
        grad_h = hidden.new_empty(0)
    return grad_h, grad_w, grad_b


@_fused_linear_elbo_backward.register_fake
def _(grad_out, hidden, weight, bias, targets, mask, weights, sample_index, lse, kept, softcap,
      chunk_size, keep_logits, backend, needs_hidden_grad, needs_weight_grad, needs_bias_grad):
    def maybe(flag, like):
        return torch.empty_like(like) if flag else like.new_empty(0)
    return (maybe(needs_hidden_grad, hidden), maybe(needs_weight_grad, weight),
            maybe(needs_bias_grad, weight if bias is None else bias))


def _setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, mask, weights, sample_index, _, softcap, chunk_size,
     keep_logits, backend) = inputs
    _, lse, kept = output
    ctx.save_for_backward(hidden, weight, bias, targets, mask, weights, sample_index, lse, kept)
    ctx.options = (softcap, chunk_size, keep_logits, backend)
    ctx.mark_non_differentiable(lse, kept)
    # Without this autograd would build zero "gradients" of lse and kept (M * V floats).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, _grad_lse, _grad_kept):
    hidden, weight, bias, targets, mask, weights, sample_index, lse, kept = ctx.saved_tensors
    needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
    grad_h, grad_w, grad_b = torch.ops.elbokto.fused_linear_elbo_backward(
        grad_out, hidden, weight, bias, targets, mask, weights, sample_index, lse, kept,
        *ctx.options, needs_h, needs_w, needs_b and bias is not None)
    return (grad_h if needs_h else None, grad_w if needs_w else None,
            grad_b if needs_b and bias is not None else None) + (None,) * 9


_fused_linear_elbo.register_autograd(_backward, setup_context=_setup_context)
