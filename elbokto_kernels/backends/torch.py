"""The "torch" backend: the row primitives of ``RowOps`` in plain PyTorch, on any device torch
runs on (the float64 oracle, ``oracle.py``, is what every backend is checked against).

Chunked over rows so that at most one chunk of float32 log-softmax is alive at a time.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows per chunk are chosen so that a chunk of float32 logits stays near this many elements.
_CHUNK_ELEMENTS = 1 << 22


def _chunks(num_rows: int, vocab: int):
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, num_rows, step):
        yield start, min(start + step, num_rows)


def _load(x: Tensor, rows: Tensor | None, start: int, end: int, softcap: float | None):
    block = (x[start:end] if rows is None else x[rows[start:end]]).float()
    if softcap is None:
        return block, None
    th = torch.tanh(block / softcap)
    return softcap * th, th


def _target_onehot(targets: Tensor, vocab: int) -> tuple[Tensor, Tensor]:
    inside = (targets >= 0) & (targets < vocab)
    return inside, targets.clamp(0, max(vocab - 1, 0)).unsqueeze(1)


def row_lse(
    x: Tensor,
    rows: Tensor | None,
    targets: Tensor,
    softcap: float | None,
    row_max: Tensor | None = None,
):
    num_rows, vocab = targets.numel(), x.shape[1]
    lse = torch.empty(num_rows, dtype=torch.float32, device=x.device)
    target_logit = torch.empty_like(lse)
    for start, end in _chunks(num_rows, vocab):
        z, _ = _load(x, rows, start, end, softcap)
        inside, col = _target_onehot(targets[start:end], vocab)
        lse[start:end] = torch.logsumexp(z, dim=1)
        if row_max is not None:
            torch.amax(z, 1, out=row_max[start:end])
        target_logit[start:end] = torch.where(inside, z.gather(1, col).squeeze(1), 0.0)
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
    num_rows, vocab = targets.numel(), x.shape[1]
    for start, end in _chunks(num_rows, vocab):
        z, th = _load(x, rows, start, end, softcap)
        s = scale[start:end].unsqueeze(1)
        grad = torch.exp(z - lse[start:end].unsqueeze(1)).mul_(-s)
        inside, col = _target_onehot(targets[start:end], vocab)
        grad.scatter_add_(1, col, torch.where(inside.unsqueeze(1), s, 0.0))
        if th is not None:
            grad.mul_(1.0 - th * th)
        if rows is None:
            out[start:end] = grad.to(out.dtype)
        else:
            out[rows[start:end]] = grad.to(out.dtype)
