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

``filter_eps`` (``grad_filter.py``) goes under that floor: forward and backward walk the vocabulary
sorted by mean logit (``vocab_walk.py``), the forward records each row's largest logit per chunk,
(a by-product of its log-sum-exp), and the backward recomputes logits and adds to dH and dW only
for the (row, chunk) tiles that hold
an entry the gradient can see; the others cost nothing but their share of the forward. Both
passes share one chunk loop each with the exact op, whose tiles are all live.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor

from . import memory
from .backends import Backend, resolve_backend, row_ops
from .call_forms import Reduction, check_reduction, normalise, reduce
from .grad_filter import FilterEps, FilterPlan, plan, resolve_filter_eps
from .masked_rows import (
    check_compute_dtype,
    check_elbo_inputs,
    gather_masked_rows,
    masked_index,
    reduce_rows,
    rows_at,
)
from .vocab_walk import Chunk, VocabWalk, chunk_columns, mean_logit_order


def fused_linear_elbo(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    sample_index: Tensor | None = None,
    num_samples: int | None = None,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    chunk_size: int | None = None,
    keep_logits: bool = False,
    filter_eps: FilterEps = None,
    reduction: Reduction = "none",
    backend: Backend = "auto",
) -> Tensor:
    """``fused_elbo`` of ``logits = hidden @ weight.T (+ bias)``, soft-capped when asked.

    Args:
        hidden: [C, L, D] float32 / bfloat16 / float16 final hidden states, or [N, D] (N
            positions, each its own sample); float64 is refused (the kernels compute in float32).
        weight: [V, D] LM-head weight, hidden's dtype. bias: optional [V], same dtype. Under
            ``torch.autocast`` all three are first cast to the autocast dtype, as ``nn.Linear``
            does; outside it a dtype mismatch is refused, as ``F.linear`` refuses it.
        targets, mask, weights, sample_index, num_samples, reduction: as in ``fused_elbo``
            (the same defaults).
        softcap: Gemma-style final-logit soft-capping ``s * tanh(logits / s)``; None for none.
        chunk_size: vocabulary columns per chunk; None picks one from a memory budget.
        keep_logits: keep the float32 logits of the M masked rows (4 * M * V bytes) from forward
            to backward instead of recomputing them: a quarter fewer FLOPs for that memory.
        filter_eps: gradient filtering. None (default) or 0: the exact gradients. A float, or
            "auto" (``torch.finfo(hidden.dtype).eps / 32``: 2^-12 for bfloat16): the backward
            skips every tile (one masked row x one chunk of the vocabulary, walked in order of
            mean logit) whose entries of ``softmax - onehot`` are all below it before the
            upstream scale, so dH, dW and the bias gradient err by at most filter_eps x the
            upstream scale per dropped entry (DESIGN.md §4; ``grad_filter.py``). The value is
            exact. Costs one more host sync in the backward.
        backend: "auto", "triton", "torch" or "cpu" for the row primitives (GEMMs are torch's).

    Returns:
        [num_samples] float32 (a scalar when reduced), differentiable w.r.t. hidden, weight and
        bias (gradients in their dtypes; float32 accumulation). No [C * L, V] tensor is ever
        built; with keep_logits one [M, V] float32 tensor lives until the backward.
    """
    if torch.is_autocast_enabled(hidden.device.type):
        # As nn.Linear under autocast: the GEMMs run in the autocast dtype. The casts are
        # differentiable, so the gradients come back in the inputs' own dtypes.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    check_reduction(reduction)
    call = normalise("hidden", "D", hidden, targets, mask, weights, sample_index, num_samples)
    hidden, targets = call.x, call.targets
    check_compute_dtype("hidden", hidden)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2] or weight.dtype != hidden.dtype:
        raise ValueError(
            f"weight must be [V, D={hidden.shape[2]}] of dtype {hidden.dtype}, got "
            f"{weight.dtype} {tuple(weight.shape)}"
        )
    if bias is not None and (bias.shape != weight.shape[:1] or bias.dtype != weight.dtype):
        raise ValueError(
            f"bias must be [V={weight.shape[0]}] of dtype {weight.dtype}, got "
            f"{bias.dtype} {tuple(bias.shape)}"
        )
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if tuple(targets.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"targets must be [C, L] = {list(hidden.shape[:2])}, got {tuple(targets.shape)}"
        )
    check_elbo_inputs(
        targets, call.mask, call.weights, call.sample_index, call.num_samples, hidden.device
    )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device}, expected {hidden.device}")
    filter_eps = resolve_filter_eps(filter_eps, hidden.dtype)
    name = resolve_backend(backend, hidden.device)
    # Logits are kept, and the walk sorted for the filter, only for a backward that will happen.
    backward_follows = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    out, *_ = torch.ops.elbokto.fused_linear_elbo(
        hidden,
        weight,
        bias,
        targets,
        call.mask,
        call.weights,
        call.sample_index,
        call.num_samples,
        None if softcap is None else float(softcap),
        chunk_size or 0,
        bool(keep_logits) and backward_follows,
        filter_eps if backward_follows else None,
        name,
    )
    return reduce(out, call, reduction)


def _walk(
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    chunk_size: int,
    filter_eps: Optional[float],
    order: Optional[Tensor] = None,
) -> VocabWalk:
    """The forward's vocabulary walk (sorted when filtering), or the backward's from the order
    the forward returned (empty for the natural order)."""
    filtered = filter_eps is not None
    chunk = chunk_columns(weight.shape[0], h.shape[0], chunk_size, h.device, filtered)
    if order is None:
        order = mean_logit_order(h, weight, bias) if filtered else None
    return VocabWalk(weight.shape[0], chunk, order if order is None or order.numel() else None)


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
    """The buffers of a vocabulary walk, reused by every chunk.

    Logits of a chunk are computed into one float32 [M, chunk] buffer, or into ``store``, float32
    [M * V] holding the whole [M, V] logits chunk by chunk (chunk [start, end) of the walk is the
    [M, end - start] block at offset M * start), which a backward with ``filled=True`` then reads
    instead of recomputing. A filtered backward computes the live rows of a chunk only
    (``live``: their ids, int64 [n]; None for all M rows): their hidden states are gathered, and
    their dH is computed apart before it is added to its rows.

    Args:
        h: [M, D] masked rows from ``_gemm_rows``; weight: [V, D]; bias: [V] or None.
        walk: the vocabulary walk; a sorted one gathers each chunk's weight rows.
        store, filled: see above; None / False for the recompute path.
        filtered: a filtered backward (gathers live rows).
    """

    def __init__(
        self,
        h: Tensor,
        weight: Tensor,
        bias: Optional[Tensor],
        walk: VocabWalk,
        store: Optional[Tensor] = None,
        filled: bool = False,
        filtered: bool = False,
    ):
        self.h, self.weight, self.bias, self.store, self.filled = h, weight, bias, store, filled
        rows, dim, device = h.shape[0], h.shape[1], h.device
        size = rows * walk.chunk
        half = h.dtype != torch.float32
        # The float32 buffer holds computed logits (no store), the gradient of kept ones, or
        # the kept logits of a chunk's live rows.
        needs_z = store is None or (filled and (filtered or not half))
        self._z = memory.empty((size,), torch.float32, device) if needs_z else None
        self._dz = memory.empty((size,), h.dtype, device) if half else None
        self._w = (
            memory.empty((walk.chunk, dim), weight.dtype, device)
            if walk.order is not None
            else None
        )
        self._h = memory.empty((rows, dim), h.dtype, device) if filtered else None
        self._dh = memory.empty((rows, dim), torch.float32, device) if filtered else None
        # A sorted chunk's rows of dW are computed here, then copied to where they belong.
        self._dw = (
            memory.empty((walk.chunk, dim), weight.dtype, device)
            if filtered and walk.order is not None
            else None
        )

    def _block(self, buffer: Optional[Tensor], rows: int, width: int, offset: int = 0) -> Tensor:
        return _allocated(buffer)[offset : offset + rows * width].view(rows, width)

    def weight_rows(self, chunk: Chunk) -> Tensor:
        """[width, D]: the chunk's rows of the weight (a view, or gathered for a sorted walk)."""
        return chunk.rows(self.weight, None if self._w is None else self._w[: chunk.width])

    def live_h(self, live: Optional[Tensor]) -> Tensor:
        """[n, D]: the hidden states of the live rows."""
        if live is None:
            return self.h
        return torch.index_select(self.h, 0, live, out=_allocated(self._h)[: live.numel()])

    def logits(
        self, chunk: Chunk, w: Tensor, live: Optional[Tensor] = None, h: Optional[Tensor] = None
    ) -> Tensor:
        """float32 [n, width] logits of the chunk's live rows (all M when ``live`` is None; ``h``
        their hidden states, ``w`` the chunk's weight rows): read back when kept, else
        computed."""
        if self.store is None:
            n = self.h.shape[0] if live is None else live.numel()
            return self._compute(
                self._block(self._z, n, chunk.width), chunk, w, self.h if h is None else h
            )
        rows = self.h.shape[0]
        z = self._block(self.store, rows, chunk.width, rows * chunk.start)
        if not self.filled:
            return self._compute(z, chunk, w, self.h)
        if live is None:
            return z
        return torch.index_select(z, 0, live, out=self._block(self._z, live.numel(), chunk.width))

    def _compute(self, z: Tensor, chunk: Chunk, w: Tensor, h: Tensor) -> Tensor:
        _matmul_into(z, h, w.t())
        if self.bias is not None:
            z += chunk.rows(self.bias).float()
        return z

    def grad_buffer(self, z: Tensor, chunk: Chunk, live: Optional[Tensor] = None) -> Tensor:
        """Where the chunk's logit gradient goes: a half buffer for the half GEMMs; else over
        recomputed (or gathered) logits in place (each element is read before the same program
        writes it), or the float32 buffer for kept logits, which a second backward
        (retain_graph) reads again."""
        if self._dz is not None:
            return self._block(self._dz, z.shape[0], chunk.width)
        return (
            z
            if self.store is None or live is not None
            else self._block(self._z, z.shape[0], chunk.width)
        )

    def add_live_dh(self, grad_h: Tensor, live: Tensor, dz: Tensor, w: Tensor) -> None:
        """grad_h[live] += dz @ w (float32 [M, D]; dz [n, width], w [width, D])."""
        # index_put_ rather than index_add_, which costs ~10x more on CPU whatever n.
        grad_h.index_put_(
            (live,), _matmul_into(_allocated(self._dh)[: live.numel()], dz, w), accumulate=True
        )

    def write_rows(self, dst: Tensor, chunk: Chunk, fill: Callable[[Tensor], Tensor]) -> None:
        """``dst[chunk's ids] = fill(out)``, dst being dW [V, D] or the bias gradient [V]:
        ``out`` is dst's own rows in the natural order, else a buffer copied to the right
        rows."""
        if chunk.ids is None:
            fill(dst[chunk.start : chunk.end])
            return
        out = _allocated(self._dw)[: chunk.width] if dst.dim() == 2 else dst.new_empty(chunk.width)
        dst.index_copy_(0, chunk.ids, fill(out))


def _column_sums_into(out: Tensor, dz: Tensor) -> Tensor:
    """The bias gradient of a chunk: dz [n, width] summed over rows in float32, into out."""
    return out.copy_(dz.float().sum(0))


def _allocated(buffer: Optional[Tensor]) -> Tensor:
    assert buffer is not None, "the workspace allocates every buffer its path reads"
    return buffer


@torch.library.custom_op("elbokto::fused_linear_elbo", mutates_args=())
def _fused_linear_elbo(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    num_samples: int,
    softcap: Optional[float],
    chunk_size: int,
    keep_logits: bool,
    filter_eps: Optional[float],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (out [num_samples], lse [C, L], kept logits float32 [M * V] or empty, and for
    the filter the rows' largest (soft-capped) logit per chunk, float32 [num_chunks * M], and
    the walk's order, int64 [V]; both empty without the filter)."""
    rows = gather_masked_rows(targets, mask, weights, sample_index, weight.shape[0], num_samples)
    h = _gemm_rows(hidden, rows.index)
    ops = row_ops(backend)
    walk = _walk(h, weight, bias, chunk_size, filter_eps)
    lse = torch.full((rows.count,), float("-inf"), dtype=torch.float32, device=hidden.device)
    target_logit = torch.zeros_like(lse)
    kept = (
        memory.empty((rows.count * weight.shape[0],), torch.float32, hidden.device)
        if keep_logits
        else hidden.new_empty(0, dtype=torch.float32)
    )
    tile_max = hidden.new_empty(
        (walk.num_chunks, rows.count) if filter_eps is not None else 0, dtype=torch.float32
    )
    work = _ChunkWorkspace(h, weight, bias, walk, kept if keep_logits else None)
    target = walk.positions(rows.target)
    for chunk in walk.chunks():
        z = work.logits(chunk, work.weight_rows(chunk))
        chunk_lse, chunk_target = ops.row_lse(
            z,
            None,
            target - chunk.start,
            softcap,
            tile_max[chunk.index] if tile_max.numel() else None,
        )
        lse = torch.logaddexp(lse, chunk_lse)
        target_logit += chunk_target
    order = walk.order if walk.order is not None else hidden.new_empty(0, dtype=torch.int64)
    return reduce_rows(rows, target_logit, lse, num_samples, targets.shape) + (
        kept,
        tile_max.view(-1),
        order,
    )


@_fused_linear_elbo.register_fake
def _(
    hidden,
    weight,
    bias,
    targets,
    mask,
    weights,
    sample_index,
    num_samples,
    softcap,
    chunk_size,
    keep_logits,
    filter_eps,
    backend,
):
    ctx = torch.library.get_ctx()
    kept = ctx.new_dynamic_size() * weight.shape[0] if keep_logits else 0
    filtered = filter_eps is not None
    return (
        hidden.new_empty(num_samples, dtype=torch.float32),
        hidden.new_empty(targets.shape, dtype=torch.float32),
        hidden.new_empty(kept, dtype=torch.float32),
        hidden.new_empty(ctx.new_dynamic_size() if filtered else 0, dtype=torch.float32),
        hidden.new_empty(weight.shape[0] if filtered else 0, dtype=torch.int64),
    )


@torch.library.custom_op("elbokto::fused_linear_elbo_backward", mutates_args=())
def _fused_linear_elbo_backward(
    grad_out: Tensor,
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    lse: Tensor,
    kept: Tensor,
    tile_max: Tensor,
    order: Tensor,
    softcap: Optional[float],
    chunk_size: int,
    keep_logits: bool,
    filter_eps: Optional[float],
    backend: str,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns (grad_hidden, grad_weight, grad_bias); an unneeded one is an empty tensor.
    ``kept``, ``tile_max`` and ``order`` are the forward's last three outputs."""
    C, L, D = hidden.shape
    rows = rows_at(masked_index(mask), targets, weights, sample_index)
    h = _gemm_rows(hidden, rows.index)
    scale = grad_out.float()[rows.sample] * rows.scale
    row_lse = lse.reshape(-1)[rows.index]
    ops = row_ops(backend)
    walk = _walk(h, weight, bias, chunk_size, filter_eps, order)
    target = walk.positions(rows.target)
    skip = (
        None
        if filter_eps is None
        else plan(
            tile_max.view(walk.num_chunks, rows.count),
            row_lse,
            scale,
            target // walk.chunk,
            filter_eps,
        )
    )
    if skip is not None and not keep_logits and all(live is None for live in skip.live):
        # Every tile is live: nothing to skip, and the natural walk gathers no weight rows.
        skip, walk, target = None, _walk(h, weight, bias, chunk_size, None), rows.target
    grad_h = torch.zeros(
        (rows.count, D) if needs_hidden_grad else (0,), dtype=torch.float32, device=hidden.device
    )
    # Every chunk writes its rows of grad_w, so it needs no zero fill, except where the filter
    # skips chunks without live rows.
    grad_w = (
        memory.empty(weight.shape, weight.dtype, weight.device)
        if needs_weight_grad
        else weight.new_empty(0)
    )
    if needs_weight_grad and skip is not None:
        grad_w.zero_()
    grad_b = (
        weight.new_zeros(weight.shape[:1])
        if bias is not None and needs_bias_grad
        else weight.new_empty(0)
    )
    work = _ChunkWorkspace(
        h, weight, bias, walk, kept if keep_logits else None, filled=True, filtered=skip is not None
    )
    for chunk, rows_live in zip(
        walk.chunks(), [None] * walk.num_chunks if skip is None else skip.live, strict=True
    ):
        if rows_live is not None and not rows_live.numel():
            continue

        def pick(t: Tensor, rows_live: Optional[Tensor] = rows_live) -> Tensor:
            return t if rows_live is None else t[rows_live]

        w = work.weight_rows(chunk)
        h_live = work.live_h(rows_live)
        z = work.logits(chunk, w, rows_live, h_live)
        dz = work.grad_buffer(z, chunk, rows_live)
        ops.row_grad(z, None, pick(target) - chunk.start, pick(row_lse), pick(scale), softcap, dz)
        if needs_hidden_grad:
            if rows_live is None:
                _matmul_into(grad_h, dz, w, accumulate=True)
            else:
                work.add_live_dh(grad_h, rows_live, dz, w)
        if needs_weight_grad:
            work.write_rows(grad_w, chunk, partial(_matmul_into, a=dz.t(), b=h_live))
        if needs_bias_grad:
            work.write_rows(grad_b, chunk, partial(_column_sums_into, dz=dz))
    if skip is not None:
        _add_lone_targets(
            skip, rows.target, h, weight, bias, scale, softcap, grad_h, grad_w, grad_b
        )
    if needs_hidden_grad:
        full = torch.zeros((C * L, D), dtype=hidden.dtype, device=hidden.device)
        full[rows.index] = grad_h.to(hidden.dtype)
        grad_h = full.view(C, L, D)
    else:
        grad_h = hidden.new_empty(0)
    return grad_h, grad_w, grad_b


def _add_lone_targets(
    skip: FilterPlan,
    target: Tensor,
    h: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    scale: Tensor,
    softcap: Optional[float],
    grad_h: Tensor,
    grad_w: Tensor,
    grad_b: Tensor,
) -> None:
    """Adds the target term ``scale * dz/dx`` of the lone-target rows (``grad_filter``) to each
    wanted (non-empty) gradient: grad_h float32 [M, D] at their rows, grad_w [V, D] and grad_b
    [V] at their targets (vocabulary ids, int64 [M]); h [M, D] are the masked rows."""
    rows = skip.lone
    ids = target[rows]
    w, h_rows, g = weight[ids].float(), h[rows].float(), scale[rows]
    if softcap is not None:
        x = (h_rows * w).sum(1)
        if bias is not None:
            x = x + bias[ids].float()
        g = g * (1.0 - torch.tanh(x / softcap) ** 2)
    if grad_h.numel():
        grad_h.index_put_((rows,), g[:, None] * w, accumulate=True)
    if grad_w.numel():
        grad_w.index_put_((ids,), (g[:, None] * h_rows).to(grad_w.dtype), accumulate=True)
    if grad_b.numel():
        grad_b.index_put_((ids,), g.to(grad_b.dtype), accumulate=True)


@_fused_linear_elbo_backward.register_fake
def _(
    grad_out,
    hidden,
    weight,
    bias,
    targets,
    mask,
    weights,
    sample_index,
    lse,
    kept,
    tile_max,
    order,
    softcap,
    chunk_size,
    keep_logits,
    filter_eps,
    backend,
    needs_hidden_grad,
    needs_weight_grad,
    needs_bias_grad,
):
    def maybe(flag, like):
        return torch.empty_like(like) if flag else like.new_empty(0)

    return (
        maybe(needs_hidden_grad, hidden),
        maybe(needs_weight_grad, weight),
        maybe(needs_bias_grad, weight if bias is None else bias),
    )


def _setup_context(ctx, inputs, output):
    (
        hidden,
        weight,
        bias,
        targets,
        mask,
        weights,
        sample_index,
        _,
        softcap,
        chunk_size,
        keep_logits,
        filter_eps,
        backend,
    ) = inputs
    _, lse, kept, tile_max, order = output
    ctx.save_for_backward(
        hidden, weight, bias, targets, mask, weights, sample_index, lse, kept, tile_max, order
    )
    ctx.options = (softcap, chunk_size, keep_logits, filter_eps, backend)
    ctx.mark_non_differentiable(lse, kept, tile_max, order)
    # Without this autograd would build zero "gradients" of lse and kept (M * V floats).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, *_grad_aux):
    (hidden, weight, bias, targets, mask, weights, sample_index, lse, kept, tile_max, order) = (
        ctx.saved_tensors
    )
    needs_h, needs_w, needs_b = ctx.needs_input_grad[:3]
    grad_h, grad_w, grad_b = torch.ops.elbokto.fused_linear_elbo_backward(
        grad_out,
        hidden,
        weight,
        bias,
        targets,
        mask,
        weights,
        sample_index,
        lse,
        kept,
        tile_max,
        order,
        *ctx.options,
        needs_h,
        needs_w,
        needs_b and bias is not None,
    )
    return (
        grad_h if needs_h else None,
        grad_w if needs_w else None,
        grad_b if needs_b and bias is not None else None,
    ) + (None,) * 10


_fused_linear_elbo.register_autograd(_backward, setup_context=_setup_context)
