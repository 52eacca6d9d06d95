"""Compaction of the masked positions into rows: the only place that reads the mask.

Every backend works on the masked rows alone. This module turns the user's dense
``targets / mask / weights / sample_index`` into per-row tensors, validates the targets of masked
positions, and does the one host synchronisation of a forward pass: the masked-row count, fetched
together with the number of bad targets in a single ``tolist()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MaskedRows:
    """The masked positions of a ``[C, L]`` grid, flattened to rows of ``[C * L, ...]``.

    Attributes:
        index: int64 [M], flat position ``c * L + p`` of each masked row, increasing.
        target: int64 [M], the clean token of each row, in [0, V).
        scale: float32 [M], the ELBO weight of each row (``weights[c]`` or ``weights[c, p]``).
        sample: int64 [M], the sample each row adds to.
    """

    index: Tensor
    target: Tensor
    scale: Tensor
    sample: Tensor

    @property
    def count(self) -> int:
        return self.index.numel()


# The dtypes the kernels take; their arithmetic is float32. float64 is refused rather than silently
# computed in float32 (oracle.py holds the float64 reference).
COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_compute_dtype(name: str, t: Tensor) -> None:
    """ValueError unless ``t`` has one of the kernels' dtypes."""
    if t.dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f"{name} must be float32, bfloat16 or float16, got {t.dtype}"
            + (
                " (the kernels compute in float32; elbokto_kernels.oracle has the "
                "float64 reference)"
                if t.dtype == torch.float64
                else ""
            )
        )


def check_elbo_inputs(
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    num_samples: int,
    device: torch.device,
) -> None:
    """Shape, dtype and device checks shared by both ops (no host sync)."""
    if targets.dim() != 2:
        raise ValueError(f"targets must be [C, L], got shape {tuple(targets.shape)}")
    C, L = targets.shape
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if mask.shape != (C, L) or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be bool [C, L] = [{C}, {L}], got {mask.dtype} {tuple(mask.shape)}"
        )
    if weights.shape not in ((C,), (C, L)) or not weights.dtype.is_floating_point:
        raise ValueError(
            f"weights must be floating [C] = [{C}] or [C, L] = [{C}, {L}], "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )
    if weights.requires_grad:
        raise ValueError("weights must not require grad: they are constants of the draws")
    if sample_index.shape != (C,) or sample_index.dtype.is_floating_point:
        raise ValueError(
            f"sample_index must be integer [C] = [{C}], got {sample_index.dtype} "
            f"{tuple(sample_index.shape)}"
        )
    if not isinstance(num_samples, int) or num_samples < 0:
        raise ValueError(f"num_samples must be a non-negative int, got {num_samples!r}")
    for name, t in (
        ("targets", targets),
        ("mask", mask),
        ("weights", weights),
        ("sample_index", sample_index),
    ):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} like the model outputs")


def gather_masked_rows(
    targets: Tensor,
    mask: Tensor,
    weights: Tensor,
    sample_index: Tensor,
    vocab_size: int,
    num_samples: int,
) -> MaskedRows:
    """Compacts the masked positions into rows and validates them.

    Raises ValueError for a masked target outside [0, vocab_size) or a copy of a masked position
    whose sample index is outside [0, num_samples), naming the first offending copy and position.
    """
    C, L = targets.shape
    flat_mask = mask.reshape(-1)
    pos_sample = sample_index.reshape(C, 1).expand(C, L).reshape(-1)
    flat_targets = targets.reshape(-1)
    bad = flat_mask & (
        (flat_targets < 0)
        | (flat_targets >= vocab_size)
        | (pos_sample < 0)
        | (pos_sample >= num_samples)
    )
    # The one host sync of the forward pass: the masked-row count (needed to size the row
    # tensors) and the bad-input count travel together.
    count, num_bad = torch.stack([flat_mask.sum(), bad.sum()]).tolist()
    if num_bad:
        first = int(bad.nonzero()[0, 0])
        c, p = divmod(first, L)
        t, s = int(flat_targets[first]), int(pos_sample[first])
        if not 0 <= t < vocab_size:
            raise ValueError(
                f"target {t} at copy {c}, position {p} is outside the vocabulary [0, {vocab_size})"
            )
        raise ValueError(f"sample_index {s} of copy {c} is outside [0, {num_samples})")
    index = torch.nonzero_static(flat_mask, size=count).reshape(-1)
    return rows_at(index, targets, weights, sample_index)


def rows_at(index: Tensor, targets: Tensor, weights: Tensor, sample_index: Tensor) -> MaskedRows:
    """Row tensors for already validated flat positions ``index`` (int64 [M])."""
    L = targets.shape[1]
    copy = index // L
    if weights.dim() == 1:
        scale = weights.float()[copy]
    else:
        scale = weights.reshape(-1).float()[index]
    return MaskedRows(
        index=index,
        target=targets.reshape(-1)[index].long(),
        scale=scale,
        sample=sample_index.long()[copy],
    )


def masked_index(mask: Tensor) -> Tensor:
    """Flat positions (int64 [M]) of a validated mask; one host sync for the count (backward)."""
    flat_mask = mask.reshape(-1)
    return torch.nonzero_static(flat_mask, size=int(flat_mask.sum())).reshape(-1)


def unmasked_index(mask: Tensor, num_masked: int) -> Tensor:
    """Flat positions (int64) where ``mask`` is False, given the masked count (no sync)."""
    return torch.nonzero_static(~mask.reshape(-1), size=mask.numel() - num_masked).reshape(-1)


def reduce_rows(
    rows: MaskedRows, target_logit: Tensor, lse: Tensor, num_samples: int, shape: torch.Size
) -> tuple[Tensor, Tensor]:
    """The ops' outputs from per-row float32 [M] values: the per-sample ELBO [num_samples] and
    the per-position LSE [C, L] (zero where unmasked) that the backward reads."""
    out = torch.zeros(num_samples, dtype=torch.float32, device=lse.device)
    out.index_add_(0, rows.sample, rows.scale * (target_logit - lse))
    lse_full = torch.zeros(shape.numel(), dtype=torch.float32, device=lse.device)
    lse_full[rows.index] = lse
    return out, lse_full.view(shape)
