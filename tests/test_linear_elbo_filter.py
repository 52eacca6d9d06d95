"""fused_linear_elbo with gradient filtering (``filter_eps``), every backend: the exact op is left
bit for bit as it was, the filtered gradients stay within DESIGN.md §4's filtered bound of the
float64 oracle, and the sorted walk gathers what survives into few chunks."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, on_device

from elbokto_kernels import fused_linear_elbo
from elbokto_kernels.backends import row_ops
from elbokto_kernels.grad_filter import resolve_filter_eps
from elbokto_kernels.linear_elbo import _matmul_into
from elbokto_kernels.masked_rows import gather_masked_rows, reduce_rows
from elbokto_kernels.oracle import assert_close, filter_bounds, linear_elbo_oracle, tolerances
from elbokto_kernels.vocab_walk import mean_logit_order

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def trained_case(C, L, D, V, *, seed, dtype=torch.float32, bias=False, device=DEVICE):
    """A trained-looking head: each masked row's hidden state points at one token (its target
    for two rows in three), so its softmax has one large entry and a tail of small ones.
    Returns (hidden, weight, bias, (targets, mask, weights, sample_index, num_samples),
    upstream), on ``device``."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(V, D, generator=g) / D**0.5
    pointed = torch.randint(0, V, (C, L), generator=g)
    hidden = 6.0 * weight[pointed] + 0.3 * torch.randn(C, L, D, generator=g)
    mask = torch.rand(C, L, generator=g) < 0.7
    other = torch.randint(0, V, (C, L), generator=g)
    targets = torch.where(torch.rand(C, L, generator=g) < 2 / 3, pointed, other)
    targets = targets.masked_fill(~mask, -100)
    weights = torch.rand(C, generator=g) + 0.5
    sample_index = torch.arange(C) % 3
    b = 0.1 * torch.randn(V, generator=g) if bias else None
    upstream = torch.randn(3, generator=g)

    def cast(t):
        return None if t is None else t.to(device, dtype)

    targets, mask, weights, sample_index, upstream = (
        t.to(device) for t in (targets, mask, weights, sample_index, upstream)
    )
    return cast(hidden), cast(weight), cast(b), (targets, mask, weights, sample_index, 3), upstream


def grads(backend, hidden, weight, bias, rest, upstream, **options):
    """(out, [dH, dW, db or nothing]) of fused_linear_elbo, forward and backward once."""
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = fused_linear_elbo(
        leaves[0],
        leaves[1],
        *rest,
        bias=leaves[2] if bias is not None else None,
        backend=backend,
        **options,
    )
    return out, list(torch.autograd.grad(out, leaves, upstream))


def check_filtered(backend, hidden, weight, bias, rest, upstream, eps, *, softcap=None, **options):
    """The filtered op against the float64 oracle: values at §4's tolerance, each gradient within
    the filtered bound (``oracle.filter_bounds``) plus §4's gradient tolerance. Returns the
    gradients."""
    value_tol, grad_tol = tolerances(hidden.dtype)
    out, got = grads(
        backend, hidden, weight, bias, rest, upstream, softcap=softcap, filter_eps=eps, **options
    )
    leaves64 = [
        t.detach().double().requires_grad_() for t in (hidden, weight, bias) if t is not None
    ]
    ref = linear_elbo_oracle(
        leaves64[0], leaves64[1], leaves64[2] if bias is not None else None, softcap, *rest
    )
    assert_close(out, ref, value_tol, "values")
    exact = torch.autograd.grad(ref, leaves64, upstream.double())
    bounds = filter_bounds(
        hidden.double(), weight.double(), bias, softcap, *rest[:4], upstream, eps
    )
    for name, g, e, bound in zip(("dH", "dW", "db"), got, exact, bounds):
        assert g.dtype == hidden.dtype and g.shape == e.shape
        excess = ((g.double() - e).abs() - bound).max().item()
        assert excess <= grad_tol * e.abs().max().item(), (
            f"{name} exceeds the filtered bound by {excess:.3g}"
        )
    return got


def test_resolve_filter_eps():
    assert resolve_filter_eps(None, torch.bfloat16) is None
    assert resolve_filter_eps(0.0, torch.float32) is None  # skips nothing: the exact op
    assert resolve_filter_eps("auto", torch.bfloat16) == 2.0**-12
    assert resolve_filter_eps("auto", torch.float16) == 2.0**-15
    assert resolve_filter_eps("auto", torch.float32) == 2.0**-28
    assert resolve_filter_eps(1e-3, torch.float32) == 1e-3
    for bad in (-1e-3, float("nan"), "bf16"):
        with pytest.raises(ValueError, match="filter_eps must be"):
            resolve_filter_eps(bad, torch.float32)


def todays_linear_elbo(hidden, weight, bias, rest, upstream, softcap, chunk):
    """The exact op as it was before filtering, written out: the natural vocabulary walk in
    chunks of ``chunk`` columns with the same GEMM and row-primitive calls (torch backend)."""
    targets, mask, weights, sample_index, num_samples = rest
    rows = gather_masked_rows(targets, mask, weights, sample_index, weight.shape[0], num_samples)
    ops, h, V = row_ops("torch"), hidden.reshape(-1, hidden.shape[-1])[rows.index], weight.shape[0]
    spans = [(s, min(s + chunk, V)) for s in range(0, V, chunk)]

    def logits(s, e):
        z = torch.empty(rows.count, e - s)
        _matmul_into(z, h, weight[s:e].t())
        return z + bias[s:e] if bias is not None else z

    lse, target_logit = torch.full((rows.count,), float("-inf")), torch.zeros(rows.count)
    for s, e in spans:
        chunk_lse, chunk_target = ops.row_lse(logits(s, e), None, rows.target - s, softcap)
        lse, target_logit = torch.logaddexp(lse, chunk_lse), target_logit + chunk_target
    out, _ = reduce_rows(rows, target_logit, lse, num_samples, targets.shape)
    scale = upstream[rows.sample] * rows.scale
    grad_h, grad_w, grad_b = torch.zeros_like(h), torch.empty_like(weight), torch.zeros(V)
    for s, e in spans:
        z = logits(s, e)
        ops.row_grad(z, None, rows.target - s, lse, scale, softcap, z)
        _matmul_into(grad_h, z, weight[s:e], accumulate=True)
        _matmul_into(grad_w[s:e], z.t(), h)
        grad_b[s:e] = z.sum(0)
    full = torch.zeros_like(hidden).view(-1, hidden.shape[-1])
    full[rows.index] = grad_h
    return out, [full.view_as(hidden), grad_w, grad_b]


@pytest.mark.parametrize("softcap", [None, 2.5])
def test_unfiltered_is_todays_op_bit_for_bit(softcap):
    hidden, weight, bias, rest, upstream = trained_case(
        4, 6, 16, 37, seed=1, bias=True, device="cpu"
    )
    want_out, want = todays_linear_elbo(hidden, weight, bias, rest, upstream, softcap, 16)
    for eps in (None, 0.0):
        out, got = grads(
            "torch",
            hidden,
            weight,
            bias,
            rest,
            upstream,
            softcap=softcap,
            chunk_size=16,
            filter_eps=eps,
        )
        assert torch.equal(out, want_out)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


@pytest.mark.parametrize(
    "dtype,softcap,keep_logits",
    [
        (torch.float32, None, False),
        (torch.float32, 3.0, False),
        (torch.float32, None, True),
        (torch.bfloat16, None, False),
        (torch.float16, 3.0, True),
    ],
    ids=str,
)
def test_filtered_within_bound(backend, dtype, softcap, keep_logits):
    hidden, weight, bias, rest, upstream = trained_case(
        3, 6, 16, 100, seed=2, dtype=dtype, bias=True
    )
    options = dict(softcap=softcap, chunk_size=32, keep_logits=keep_logits)
    got = check_filtered(backend, hidden, weight, bias, rest, upstream, 2.0**-8, **options)
    _, exact = grads(backend, hidden, weight, bias, rest, upstream, **options)
    # Something was dropped: otherwise the bound tested nothing.
    assert not torch.equal(got[1], exact[1])
    assert torch.all(got[0][~rest[1]] == 0), "unmasked positions get exactly zero gradient"


def test_filter_tests_soft_capped_logits(backend):
    """Logits near -30 soft-capped at 30 sit near -22.8 with dz/dx ~0.42, and the capped softmax
    is flat: every entry of the gradient is ~0.42 / V, above eps, and must be kept. A test on the
    raw logits would see probabilities ~1300 times smaller and drop them all."""
    hidden, weight, _, rest, upstream = trained_case(2, 4, 16, 60, seed=6)
    bias = torch.full((60,), -30.0, device=DEVICE)
    check_filtered(
        backend, hidden / 6, weight, bias, rest, upstream, 2.0**-8, softcap=30.0, chunk_size=16
    )


def test_filtered_frozen_head_one_row_nothing_masked(backend):
    hidden, weight, _, rest, upstream = trained_case(2, 5, 16, 70, seed=3)
    leaves = (hidden.requires_grad_(), weight)
    out = fused_linear_elbo(*leaves, *rest, filter_eps=1e-3, chunk_size=16, backend=backend)
    (grad_h,) = torch.autograd.grad(out, hidden, upstream)
    _, (exact_h, _) = grads(backend, hidden, weight, None, rest, upstream, chunk_size=16)
    bound = filter_bounds(hidden.double(), weight.double(), None, None, *rest[:4], upstream, 1e-3)[
        0
    ]
    assert ((grad_h.double() - exact_h.double()).abs() - bound).max() <= 1e-5
    targets, mask, weights, sample_index, n = rest
    one = mask & (
        torch.arange(mask.numel(), device=DEVICE).view(mask.shape)
        == mask.nonzero()[0, 0] * 5 + mask.nonzero()[0, 1]
    )
    check_filtered(
        backend,
        hidden.detach(),
        weight,
        None,
        (targets, one, weights, sample_index, n),
        upstream,
        1e-3,
        chunk_size=16,
    )
    _, nothing = grads(
        backend,
        hidden.detach(),
        weight,
        None,
        (targets, torch.zeros_like(mask), weights, sample_index, n),
        upstream,
        filter_eps=1e-3,
    )
    assert all(torch.equal(g, torch.zeros_like(g)) for g in nothing)


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_sorted_walk_leaves_unused_entries_exactly_zero(backend, softcap):
    """Eight tokens, scattered over the vocabulary, own eight directions of the hidden space and
    every row points at one of them, its target for all but a few rows. Sorted by mean logit the
    eight fill the first chunk and every later chunk holds entries below eps only: their rows of
    dW are exactly zero (the exact op gives tiny non-zero values), but for the targets of the
    other rows, which the lone-target term reaches (their logits, biased to -10, soft-capped at
    5 have dz/dx ~0.07). In the natural order the eight would keep about six chunks of ten
    live."""
    C, L, D, V, chunk = 4, 8, 32, 320, 32
    g = torch.Generator().manual_seed(4)
    tokens = torch.randperm(V, generator=g)[:8]
    weight = torch.randn(V, D, generator=g) / D**0.5
    weight[:, :8] = 0
    weight[tokens] = torch.eye(8, D)
    position = torch.arange(C * L).view(C, L)
    direction, mask = position % 8, position % 5 != 4  # each direction has masked rows
    hidden = 6.0 * torch.nn.functional.one_hot(direction, D).float()
    hidden[..., 8:] += 0.1 * torch.randn(C, L, D - 8, generator=g)
    others = torch.tensor([v for v in range(V) if v not in tokens])
    lone = position % 7 == 3  # rows whose target the model gives almost no probability
    lone_targets = others[torch.randint(0, others.numel(), (C, L), generator=g)]
    targets = torch.where(lone, lone_targets, tokens[direction]).masked_fill(~mask, -100)
    rest = (targets, mask, torch.rand(C, generator=g) + 0.5, torch.arange(C) % 2, 2)
    upstream = torch.randn(2, generator=g)
    bias = torch.zeros(V).index_fill_(0, lone_targets[lone], -10.0)
    hidden, weight, bias, upstream, tokens, lone_targets, lone, mask = on_device(
        hidden, weight, bias, upstream, tokens, lone_targets, lone, mask
    )
    rest = (*on_device(*rest[:4]), rest[4])
    got = check_filtered(
        backend, hidden, weight, bias, rest, upstream, 1e-2, softcap=softcap, chunk_size=chunk
    )
    zero_rows = (got[1] == 0).all(1)
    reached = lone_targets[lone & mask].unique()
    assert not zero_rows[tokens].any() and not zero_rows[reached].any()
    assert zero_rows.sum() >= V - chunk - reached.numel()
    _, exact = grads(
        backend, hidden, weight, bias, rest, upstream, softcap=softcap, chunk_size=chunk
    )
    assert not (exact[1] == 0).all(1).any()


def test_mean_logit_order():
    g = torch.Generator().manual_seed(5)
    h, weight, bias = (
        torch.randn(9, 6, generator=g),
        torch.randn(40, 6, generator=g),
        torch.randn(40, generator=g),
    )
    want = (h.double() @ weight.double().T + bias.double()).mean(0)
    order = mean_logit_order(h, weight, bias)
    assert torch.equal(torch.sort(order).values, torch.arange(40))
    assert torch.all(want[order][:-1] >= want[order][1:])
