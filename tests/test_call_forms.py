"""The ops' simpler call forms (``elbokto_kernels/call_forms.py``) against the full form:
2-D inputs, mask / weights / sample_index left out, and the reductions, on every backend."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, on_device

from elbokto_kernels import fused_elbo, fused_linear_elbo
from elbokto_kernels.oracle import assert_close, elbo_oracle, tolerances


def sft_case(B=3, L=5, V=23, D=8, seed=0):
    """An MDLM / SFT batch: logits, hidden states and head, targets with -100 where unmasked,
    per-sequence weights 1 / t."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, L, generator=g) < 0.6
    mask[-1] = False  # a sequence with nothing masked
    targets = torch.randint(0, V, (B, L), generator=g).masked_fill(~mask, -100)
    logits = torch.randn(B, L, V, generator=g)
    hidden, head = torch.randn(B, L, D, generator=g), torch.randn(V, D, generator=g) / D**0.5
    weights = 1 / (torch.rand(B, generator=g) + 0.1)
    return on_device(logits, hidden, head, targets, mask, weights)


def test_defaults_are_the_plain_masked_diffusion_loss(backend):
    logits, hidden, head, targets, mask, weights = sft_case()
    full = fused_elbo(
        logits, targets, mask, weights, torch.arange(3, device=DEVICE), 3, backend=backend
    )
    assert torch.equal(fused_elbo(logits, targets, weights=weights, backend=backend), full)
    ones = torch.ones(3, device=DEVICE)
    assert torch.equal(
        fused_elbo(logits, targets, backend=backend),
        fused_elbo(logits, targets, mask, ones, backend=backend),
    )
    assert full[-1] == 0
    linear = fused_linear_elbo(
        hidden, head, targets, mask, weights, torch.arange(3, device=DEVICE), 3, backend=backend
    )
    assert torch.equal(
        fused_linear_elbo(hidden, head, targets, weights=weights, backend=backend), linear
    )


def test_2d_inputs_are_one_sample_per_row(backend):
    logits, hidden, head, targets, mask, weights = sft_case()
    per_position = weights[:, None].expand(3, 5)
    x = logits.reshape(15, 23).requires_grad_()
    rows = fused_elbo(x, targets.reshape(15), weights=per_position.reshape(15), backend=backend)
    assert rows.shape == (15,)
    logp = torch.log_softmax(logits.reshape(15, 23).double(), -1)
    want = torch.where(
        mask.reshape(15),
        logp.gather(1, targets.reshape(15, 1).clamp(min=0))[:, 0]
        * per_position.reshape(15).double(),
        0.0,
    )
    assert_close(rows, want, tolerances(torch.float32)[0], "per-row values")
    (grad,) = torch.autograd.grad(rows.sum(), x)
    assert torch.all(grad[~mask.reshape(15)] == 0)
    h = hidden.reshape(15, 8)
    linear_rows = fused_linear_elbo(h, head, targets.reshape(15), backend=backend)
    want = fused_linear_elbo(hidden, head, targets, backend=backend)
    torch.testing.assert_close(linear_rows.view(3, 5).sum(1), want, rtol=1e-5, atol=1e-5)


def test_reductions(backend):
    logits, hidden, head, targets, mask, weights = sft_case()
    x = logits.double()
    per_sample = elbo_oracle(x, targets, mask, weights, torch.arange(3, device=DEVICE), 3)
    want = {
        "sum": per_sample.sum(),
        "mean": per_sample.sum() / mask.sum(),
        "sample_mean": per_sample.mean(),
    }
    for reduction, value in want.items():
        got = fused_elbo(logits, targets, weights=weights, reduction=reduction, backend=backend)
        assert got.shape == ()
        assert_close(got, value, tolerances(torch.float32)[0], reduction)
        linear = fused_linear_elbo(
            hidden, head, targets, weights=weights, reduction=reduction, backend=backend
        )
        assert linear.shape == ()
    # Nothing scored: a mean of zero terms is 0, not NaN.
    nothing = fused_elbo(logits, torch.full_like(targets, -100), reduction="mean", backend=backend)
    assert nothing.item() == 0


def test_call_form_errors():
    logits, hidden, head, targets, mask, weights = sft_case()
    with pytest.raises(
        ValueError,
        match=r"reduction must be one of \('none', 'sum', 'mean', "
        r"'sample_mean'\), got 'avg'",
    ):
        fused_elbo(logits, targets, reduction="avg")
    with pytest.raises(ValueError, match="sample_index needs num_samples"):
        fused_elbo(logits, targets, mask, weights, torch.zeros(3, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match="num_samples=2 without sample_index"):
        fused_elbo(logits, targets, mask, weights, None, 2)
    with pytest.raises(ValueError, match=r"with 2-D logits \[N, V\], targets must be \[N\]"):
        fused_elbo(logits.reshape(15, 23), targets)
    with pytest.raises(ValueError, match=r"hidden must be \[C, L, D\] or \[N, D\]"):
        fused_linear_elbo(hidden[0, 0], head, targets)
