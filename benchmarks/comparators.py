"""Benchmark inputs and the comparators the fused ops are measured against.

Every variant takes the same inputs and returns the per-sample ELBO, float32 [num_samples], so
gpu_check.py and the pytest-benchmark suite time exactly the same work.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K = 8  # Monte-Carlo copies per sample


def make_inputs(m: int, v: int, device: torch.device, seq_len: int = 512, seed: int = 0):
    """ELBO op arguments for [C, L] = 2m positions of which exactly m are masked.

    Returns ``(args, upstream)``: args holds targets [C, L] (-100 where unmasked), mask, per-copy
    weights [C], sample_index [C] (K contiguous copies per sample) and num_samples; upstream is a
    random per-sample gradient [num_samples].
    """
    g = torch.Generator(device=device).manual_seed(seed)
    positions = 2 * m
    L = min(seq_len, positions)
    C = positions // L
    order = torch.randperm(positions, generator=g, device=device)
    mask = torch.zeros(positions, dtype=torch.bool, device=device)
    mask[order[:m]] = True
    mask = mask.view(C, L)
    targets = torch.randint(0, v, (C, L), generator=g, device=device).masked_fill(~mask, -100)
    weights = torch.rand(C, generator=g, device=device) + 0.5
    num_samples = max(1, math.ceil(C / K))
    sample_index = torch.arange(C, device=device) // K
    upstream = torch.randn(num_samples, generator=g, device=device)
    return dict(
        targets=targets,
        mask=mask,
        weights=weights,
        sample_index=sample_index,
        num_samples=num_samples,
    ), upstream


# Logit distributions of known sparsity (bench_cpu.py's docstring states the method): name ->
# (tokens mixed per row k, their scale s, isotropic noise sigma).
ZIPF_DISTRIBUTIONS = {
    "very sparse": (1, 12.0, 0.0),
    "half": (64, 12.0, 0.0),  # about half of the sorted 128 x 128 tiles hold an entry >= 2^-12
    "sparse": (16, 12.0, 0.0),
    "dense": (4, 12.0, 1.0),
    "uniform": (0, 0.0, 2.0),
}


def zipf_hidden_states(weight, rows: int, distribution: str, generator=None):
    """(hidden [rows, D] in weight's dtype, each row's target int64 [rows] or None for
    "uniform"): token frequencies follow a Zipf law (rank r ~ r^-1.1) over a shuffled vocabulary;
    row i mixes k tokens t_1..t_k drawn from it, h_i = s * sum_j W[t_j] / sqrt(k) + sigma * N(0, I),
    its target t_1."""
    k, s, sigma = ZIPF_DISTRIBUTIONS[distribution]
    vocab, dim = weight.shape
    device = weight.device
    hidden = sigma * torch.randn(rows, dim, generator=generator, device=device)
    if not k:
        return hidden.to(weight.dtype), None
    zipf = torch.arange(1, vocab + 1, dtype=torch.float64, device=device) ** -1.1
    token_of_rank = torch.randperm(vocab, generator=generator, device=device)
    draws = torch.multinomial(zipf, rows * k, replacement=True, generator=generator)
    tokens = token_of_rank[draws].view(rows, k)
    for j in range(k):  # not weight[tokens]: [rows, k, D] would not fit at LLaDA's shapes
        hidden += (s / k**0.5) * weight[tokens[:, j]].float()
    return hidden.to(weight.dtype), tokens[:, 0]


def _masked_rows(a):
    idx = a["mask"].reshape(-1).nonzero().squeeze(1)
    L = a["mask"].shape[1]
    return idx, a["targets"].reshape(-1)[idx], a["weights"][idx // L], a["sample_index"][idx // L]


def _reduce(a, per_row, sample):
    out = torch.zeros(a["num_samples"], device=per_row.device)
    return out.index_add(0, sample, per_row.float())


def eager_linear(hidden, weight, a):
    """Masked rows -> matmul logits -> float32 log_softmax -> gather -> weighted index_add."""
    idx, t, w, s = _masked_rows(a)
    logits = hidden.reshape(-1, hidden.shape[-1])[idx] @ weight.T
    logp = torch.log_softmax(logits.float(), -1).gather(1, t[:, None]).squeeze(1)
    return _reduce(a, w * logp, s)


def torch_lce_linear(hidden, weight, a, chunked: bool):
    """torch.nn.functional.linear_cross_entropy on the masked rows, then the weighted sum."""
    idx, t, w, s = _masked_rows(a)
    options = torch.nn.LinearCrossEntropyOptions() if chunked else None
    nll = F.linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1])[idx], weight, t, reduction="none", options=options
    )
    return _reduce(a, -w * nll.float(), s)


def cce_linear(hidden, weight, a):
    """Apple's Cut Cross-Entropy (its default filter_eps="auto": gradient filtering, vocabulary
    sorting) on the masked rows, then the weighted sum."""
    from cut_cross_entropy import linear_cross_entropy

    idx, t, w, s = _masked_rows(a)
    nll = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1])[idx], weight, t, reduction="none"
    )
    return _reduce(a, -w * nll.float(), s)


def liger_linear(hidden, weight, a):
    """Liger's fused linear cross-entropy on the masked rows, then the weighted sum."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    idx, t, w, s = _masked_rows(a)
    nll = liger_fused_linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1])[idx], weight, t, reduction="none"
    )
    return _reduce(a, -w * nll.float(), s)


def eager_elbo(logits, a):
    """Full float32 log_softmax over every position, gather, mask, weighted index_add."""
    logp = (
        torch.log_softmax(logits.float(), -1)
        .gather(-1, a["targets"].clamp(min=0).unsqueeze(-1))
        .squeeze(-1)
    )
    per_copy = (logp * a["mask"] * a["weights"][:, None]).sum(1)
    return _reduce(a, per_copy, a["sample_index"])
