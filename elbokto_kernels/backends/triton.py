"""The "triton" backend: Triton kernels for the row primitives of ``RowOps``.

One program per masked row streams the vocabulary in blocks of BLOCK_V:
``_row_lse_kernel`` keeps an online log-sum-exp (one exp per element plus one per block),
``_row_grad_kernel`` recomputes the softmax from the saved LSE and writes the scaled gradient.
Arithmetic is float32 whatever the input dtype; offsets are int64 (C*L*V passes 2^31 at LLaDA
shapes). Under TRITON_INTERPRET=1 the kernels run on CPU tensors in the interpreter, for the tests
(``elbokto_kernels.backends`` says when the variable must be set); tanh is written with exp
because libdevice tanh does not run there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..versions import MINIMUM, require_version

require_version("triton", MINIMUM["triton"], "the triton backend")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import Tensor  # noqa: E402

# On GPU every launch has one block shape, 4096 float32 per program over 8 warps (busy, no
# spills), so that the configurations the ops launch are few enough to compile and check ahead
# for sm_80 / sm_90 (``GPU_LAUNCHES``); a row shorter than a block costs one masked block.
GPU_BLOCK_V = 4096


def _repair_interpreter() -> None:
    """Triton's interpreter up to 3.6 converts a scalar argument to an index with
    ``int(array_of_shape_1)``, which numpy >= 2.4 refuses (TypeError on the kernels' first
    ``range(0, vocab, ...)``); later releases squeeze the array first, as done here. The patch is
    applied after the interpreter's own, each time it patches ``tl.tensor`` for a launch."""
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if getattr(patch, "_elbokto_index", False):
        return

    def patch_with_squeeze(tensor, *args, **kwargs):
        patch(tensor, *args, **kwargs)
        tensor.__index__ = lambda self: int(self.handle.data.reshape(()))

    setattr(patch_with_squeeze, "_elbokto_index", True)  # noqa: B010 (a mark on a function)
    interpreter._patch_lang_tensor = patch_with_squeeze


if os.environ.get("TRITON_INTERPRET") == "1":
    _repair_interpreter()


def _block_v(vocab: int) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        # Larger blocks amortise the interpreter's per-op cost.
        return max(16, min(16384, triton.next_power_of_2(max(vocab, 1))))
    return GPU_BLOCK_V


@dataclass(frozen=True)
class Launch:
    """One configuration of a row kernel: which kernel ("row_lse" or "row_grad"), the dtypes
    of the logits and of the gradient (row_grad; None for row_lse), HAS_ROWS, HAS_SOFTCAP."""

    kernel: str
    x_dtype: torch.dtype
    out_dtype: torch.dtype | None
    rows: bool
    softcap: bool


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Every configuration the ops launch (tests/test_triton_compile.py checks that they launch no
# other): fused_elbo scores the masked rows of its logits in their dtype, without soft-capping;
# fused_linear_elbo float32 chunk logits, all rows, soft-capped or not, its logit gradient in
# float32 or the inputs' half dtype. ``benchmarks/kernel_report.py`` compiles each for GPUs.
GPU_LAUNCHES = (
    *(Launch("row_lse", dtype, None, True, False) for dtype in _DTYPES),
    *(Launch("row_grad", dtype, dtype, True, False) for dtype in _DTYPES),
    *(Launch("row_lse", torch.float32, None, False, cap) for cap in (False, True)),
    *(
        Launch("row_grad", torch.float32, dtype, False, cap)
        for dtype in _DTYPES
        for cap in (False, True)
    ),
)


@triton.jit
def _softcap(x, softcap):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): exact limits at +-inf, no libdevice.
    th = 1.0 - 2.0 / (tl.exp(2.0 * x / softcap) + 1.0)
    return softcap * th, th


@triton.jit
def _row_of(rows_ptr, pid, HAS_ROWS: tl.constexpr):
    """The row of x (and out) that program ``pid`` handles: rows[pid], or pid itself."""
    if HAS_ROWS:
        row = tl.load(rows_ptr + pid).to(tl.int64)
    else:
        row = pid
    return row


@triton.jit
def _row_lse_kernel(
    x_ptr,
    stride_xr,
    stride_xv,
    rows_ptr,
    targets_ptr,
    lse_ptr,
    tlogit_ptr,
    max_ptr,
    vocab,
    softcap,
    HAS_ROWS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = _row_of(rows_ptr, pid, HAS_ROWS)
    x_row = x_ptr + row * stride_xr
    target = tl.load(targets_ptr + pid)
    # A finite floor for the running max, so exp(m_old - m_new) never sees (-inf) - (-inf).
    m = -3.0e38
    s = 0.0
    nans = 0
    t_acc = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        valid = cols < vocab
        z = tl.load(x_row + cols * stride_xv, mask=valid, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, _ = _softcap(z, softcap)
        z = tl.where(valid, z, float("-inf"))
        nans += tl.sum((z != z).to(tl.int32), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        # `valid &`: a target of the next vocabulary chunk can fall in this block's padding,
        # where z is -inf.
        t_acc += tl.where(valid & (cols == target), z, 0.0)
    # As torch.logsumexp: +inf for a row holding +inf (where the sum saw inf - inf), NaN for a
    # row holding a NaN (which the running max need not keep).
    lse = tl.where(m == float("inf"), float("inf"), m + tl.log(s))
    tl.store(lse_ptr + pid, tl.where(nans > 0, float("nan"), lse))
    tl.store(max_ptr + pid, m)
    tl.store(tlogit_ptr + pid, tl.sum(t_acc, axis=0))


@triton.jit
def _row_grad_kernel(
    x_ptr,
    stride_xr,
    stride_xv,
    rows_ptr,
    targets_ptr,
    lse_ptr,
    scale_ptr,
    out_ptr,
    stride_or,
    vocab,
    softcap,
    HAS_ROWS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    row = _row_of(rows_ptr, pid, HAS_ROWS)
    x_row = x_ptr + row * stride_xr
    out_row = out_ptr + row * stride_or
    target = tl.load(targets_ptr + pid)
    lse = tl.load(lse_ptr + pid)
    scale = tl.load(scale_ptr + pid)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        valid = cols < vocab
        z = tl.load(x_row + cols * stride_xv, mask=valid, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z, th = _softcap(z, softcap)
        # The true-class term is added in float32 before the cast, so (1 - p) keeps its digits.
        grad = scale * (tl.where(cols == target, 1.0, 0.0) - tl.exp(z - lse))
        if HAS_SOFTCAP:
            grad = grad * (1.0 - th * th)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=valid)


def _launch_args(x: Tensor, rows: Tensor | None, softcap: float | None):
    vocab = x.shape[1]
    block = _block_v(vocab)
    meta = dict(
        HAS_ROWS=rows is not None,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_V=block,
        num_warps=8 if block >= GPU_BLOCK_V else 4,
    )
    return vocab, 0.0 if softcap is None else float(softcap), meta


def row_lse(
    x: Tensor,
    rows: Tensor | None,
    targets: Tensor,
    softcap: float | None,
    row_max: Tensor | None = None,
):
    num_rows = targets.numel()
    lse = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    target_logit = torch.empty_like(lse)
    if num_rows == 0:
        return lse, target_logit
    vocab, cap, meta = _launch_args(x, rows, softcap)
    # The row maxima cost one store per row: written always, into a scratch vector when unwanted.
    _row_lse_kernel[(num_rows,)](
        x,
        x.stride(0),
        x.stride(1),
        rows if rows is not None else targets,
        targets,
        lse,
        target_logit,
        torch.empty_like(lse) if row_max is None else row_max,
        vocab,
        cap,
        **meta,
    )
    return lse, target_logit


def row_grad(
    x: Tensor,
    rows: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    scale: Tensor,
    softcap: float | None,
    out: Tensor,
) -> None:
    num_rows = targets.numel()
    if num_rows == 0:
        return
    vocab, cap, meta = _launch_args(x, rows, softcap)
    _row_grad_kernel[(num_rows,)](
        x,
        x.stride(0),
        x.stride(1),
        rows if rows is not None else targets,
        targets,
        lse,
        scale,
        out,
        out.stride(0),
        vocab,
        cap,
        **meta,
    )
