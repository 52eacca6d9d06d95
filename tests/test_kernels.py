"""fused_elbo and fused_linear_elbo, every backend (the ``backend`` fixture of conftest.py),
against the float64 oracle."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, on_device

from elbokto_kernels import fused_elbo, fused_linear_elbo
from elbokto_kernels.backends import resolve_backend
from elbokto_kernels.oracle import assert_close, elbo_oracle, linear_elbo_oracle, tolerances
from elbokto_kernels.versions import release

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TORCH = release(torch.__version__)


def make_case(
    C, L, V, *, seed, num_samples=3, p_mask=0.5, per_position=False, scale=3.0, dtype=torch.float32
):
    """Random logits [C, L, V], targets (-100 where unmasked), mask, weights, sample_index."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(C, L, V, generator=g) * scale).to(dtype)
    mask = torch.rand(C, L, generator=g) < p_mask
    targets = torch.randint(0, V, (C, L), generator=g).masked_fill(~mask, -100)
    weights = torch.rand((C, L) if per_position else (C,), generator=g) + 0.5
    # The last sample gets no copies: its output and gradient must be exactly zero.
    sample_index = torch.randint(0, max(num_samples - 1, 1), (C,), generator=g)
    return logits, targets, mask, weights, sample_index, num_samples


def check_elbo(backend, logits, targets, mask, weights, sample_index, num_samples, seed=0):
    """fused_elbo's values and logit gradients against the float64 oracle, on the test device."""
    logits, targets, mask, weights, sample_index = on_device(
        logits, targets, mask, weights, sample_index
    )
    dtype = logits.dtype
    value_tol, grad_tol = tolerances(dtype)
    x = logits.detach().requires_grad_()
    out = fused_elbo(x, targets, mask, weights, sample_index, num_samples, backend=backend)
    x64 = logits.detach().double().requires_grad_()
    ref = elbo_oracle(x64, targets, mask, weights, sample_index, num_samples)
    assert out.dtype == torch.float32 and out.shape == (num_samples,)
    assert_close(out, ref, value_tol, "values")
    upstream = on_device(torch.randn(num_samples, generator=torch.Generator().manual_seed(seed)))
    (grad,) = torch.autograd.grad(out, x, upstream)
    (ref_grad,) = torch.autograd.grad(ref, x64, upstream.double())
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert_close(grad, ref_grad, grad_tol, "gradients")
    assert torch.all(grad[~mask] == 0), "unmasked positions must get exactly zero gradient"
    return out, grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_position", [False, True])
def test_elbo_random(backend, dtype, per_position):
    for seed in range(2):
        case = make_case(5, 7, 37, seed=seed, per_position=per_position, dtype=dtype)
        out, _ = check_elbo(backend, *case, seed=seed)
        assert out[-1] == 0


def test_elbo_llada_vocab(backend):
    logits, targets, mask, weights, sample_index, n = make_case(2, 2, 126464, seed=1, p_mask=1.0)
    check_elbo(backend, logits, targets, mask, weights, sample_index, n)


def test_elbo_one_row(backend):
    check_elbo(
        backend,
        torch.randn(1, 1, 50),
        torch.tensor([[7]]),
        torch.tensor([[True]]),
        torch.tensor([2.0]),
        torch.tensor([0]),
        1,
    )


def test_elbo_nothing_masked(backend):
    logits, targets, mask, weights, sample_index, n = make_case(3, 4, 11, seed=2, p_mask=0.0)
    x, targets, mask, weights, sample_index = on_device(
        logits, targets, mask, weights, sample_index
    )
    x.requires_grad_()
    out = fused_elbo(x, targets, mask, weights, sample_index, n, backend=backend)
    assert torch.equal(out, torch.zeros(n, device=DEVICE))
    (grad,) = torch.autograd.grad(out, x, torch.randn(n, device=DEVICE))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_elbo_extreme_logits(backend, dtype):
    # +-1e4 logits: a naive exp overflows; the online max must keep every term finite.
    case = make_case(3, 5, 40, seed=3, scale=1e4, dtype=dtype)
    out, grad = check_elbo(backend, *case)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


def test_elbo_non_contiguous(backend):
    logits, targets, mask, weights, sample_index, n = make_case(4, 6, 33, seed=4)
    logits = on_device(logits)  # the layouts are made on the device
    wide = torch.randn(4, 6, 40, device=DEVICE)
    wide[..., :33] = logits
    check_elbo(backend, wide[..., :33], targets, mask, weights, sample_index, n)  # vocab slice
    transposed = logits.transpose(0, 1).contiguous().transpose(0, 1)  # C and L not mergeable
    assert not transposed.is_contiguous()
    check_elbo(backend, transposed, targets, mask, weights, sample_index, n)


def test_elbo_bad_targets(backend):
    logits, targets, mask, weights, sample_index, n = make_case(3, 4, 10, seed=5, p_mask=1.0)
    logits, targets, mask, weights, sample_index = on_device(
        logits, targets, mask, weights, sample_index
    )
    for bad in (10, -1):
        t = targets.clone()
        t[2, 1] = bad
        with pytest.raises(ValueError, match=rf"target {bad} at copy 2, position 1 .*\[0, 10\)"):
            fused_elbo(logits, t, mask, weights, sample_index, n, backend=backend)
    with pytest.raises(ValueError, match="sample_index"):
        fused_elbo(logits, targets, mask, weights, sample_index, 0, backend=backend)


def test_elbo_input_errors():
    logits, targets, mask, weights, sample_index, n = make_case(3, 4, 10, seed=6)
    with pytest.raises(ValueError, match="mask must be bool"):
        fused_elbo(logits, targets, mask.int(), weights, sample_index, n)
    with pytest.raises(ValueError, match="weights must be floating"):
        fused_elbo(logits, targets, mask, weights[:2], sample_index, n)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_elbo(logits, targets, mask, weights, sample_index, n, backend="cuda")
    with pytest.raises(ValueError, match="targets must be"):
        fused_elbo(logits, targets[:, :2], mask, weights, sample_index, n)


def test_auto_backend_on_cpu():
    assert resolve_backend("auto", torch.device("cpu")) in ("cpu", "torch")


def make_linear_case(C, L, D, V, *, seed, dtype=torch.float32, bias=False, scale=1.0, **kw):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(C, L, D, generator=g) * scale).to(dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype)
    b = (torch.randn(V, generator=g)).to(dtype) if bias else None
    _, targets, mask, weights, sample_index, n = make_case(C, L, V, seed=seed, **kw)
    return hidden, weight, b, (targets, mask, weights, sample_index, n)


def check_linear(
    backend,
    hidden,
    weight,
    bias,
    rest,
    *,
    softcap=None,
    chunk_size=None,
    keep_logits=False,
    grads=(True, True, True),
    seed=0,
):
    """fused_linear_elbo's values and gradients against the float64 oracle, on the test device;
    rest: (targets, mask, weights, sample_index, num_samples)."""
    hidden, weight, bias = on_device(hidden, weight, bias)
    rest = (*on_device(*rest[:4]), rest[4])
    value_tol, grad_tol = tolerances(hidden.dtype, vocab=weight.shape[0])
    leaves = [
        t.detach().requires_grad_(need) if t is not None else None
        for t, need in zip((hidden, weight, bias), grads)
    ]
    out = fused_linear_elbo(
        leaves[0],
        leaves[1],
        *rest,
        bias=leaves[2],
        softcap=softcap,
        chunk_size=chunk_size,
        keep_logits=keep_logits,
        backend=backend,
    )
    leaves64 = [
        t.detach().double().requires_grad_(need) if t is not None else None
        for t, need in zip((hidden, weight, bias), grads)
    ]
    ref = linear_elbo_oracle(leaves64[0], leaves64[1], leaves64[2], softcap, *rest)
    assert_close(out, ref, value_tol, "values")
    upstream = on_device(torch.randn(rest[-1], generator=torch.Generator().manual_seed(seed)))
    wanted = [(a, b) for a, b in zip(leaves, leaves64) if a is not None and a.requires_grad]
    got = torch.autograd.grad(out, [a for a, _ in wanted], upstream, retain_graph=True)
    # A second backward of the same graph must not see anything the first one overwrote.
    again = torch.autograd.grad(out, [a for a, _ in wanted], upstream)
    assert all(torch.equal(g, a) for g, a in zip(got, again))
    expected = torch.autograd.grad(ref, [b for _, b in wanted], upstream.double())
    for (leaf, _), g, e in zip(wanted, got, expected):
        assert g.dtype == leaf.dtype and g.shape == leaf.shape
        assert_close(g, e, grad_tol, "gradient")
    return out, got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 2.5])
def test_linear_random(backend, dtype, softcap):
    hidden, weight, bias, rest = make_linear_case(
        4, 6, 16, 37, seed=7, dtype=dtype, bias=True, scale=2.0, per_position=dtype == torch.float32
    )
    # chunk_size 16 splits V = 37 into three chunks: the running LSE merge is exercised, and
    # kept logits are laid out chunk by chunk.
    for chunk_size, keep_logits in ((None, False), (16, False), (16, True)):
        out, grads = check_linear(
            backend,
            hidden,
            weight,
            bias,
            rest,
            softcap=softcap,
            chunk_size=chunk_size,
            keep_logits=keep_logits,
        )
        assert out[-1] == 0
        grad_hidden = grads[0]
        assert torch.all(grad_hidden[~on_device(rest[1])] == 0)


def test_linear_target_in_the_next_chunk(backend):
    # chunk_size 24 of V = 40: the first chunk's kernel block (triton) is 32 columns wide, and the
    # targets 25 and 30, of the second chunk, fall in its padding.
    hidden, weight, _, (_, mask, weights, sample_index, n) = make_linear_case(
        1, 4, 8, 40, seed=17, p_mask=1.0
    )
    targets = torch.tensor([[25, 3, 30, 10]])
    check_linear(
        backend, hidden, weight, None, (targets, mask, weights, sample_index, n), chunk_size=24
    )


def test_linear_llada_vocab(backend):
    hidden, weight, bias, rest = make_linear_case(1, 3, 8, 126464, seed=8, p_mask=1.0)
    check_linear(backend, hidden, weight, None, rest, softcap=30.0)


def test_linear_frozen_head_and_no_bias(backend):
    hidden, weight, _, rest = make_linear_case(3, 5, 12, 29, seed=9)
    for keep_logits in (False, True):
        check_linear(
            backend, hidden, weight, None, rest, grads=(True, False, False), keep_logits=keep_logits
        )
        check_linear(
            backend, hidden, weight, None, rest, grads=(False, True, False), keep_logits=keep_logits
        )


def test_linear_nothing_masked_and_one_row(backend):
    hidden, weight, bias, rest = make_linear_case(2, 3, 8, 19, seed=10, bias=True, p_mask=0.0)
    for keep_logits in (False, True):
        out, grads = check_linear(backend, hidden, weight, bias, rest, keep_logits=keep_logits)
        assert torch.equal(out, torch.zeros_like(out))
        assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    hidden, weight, bias, rest = make_linear_case(1, 1, 8, 19, seed=11, bias=True, p_mask=1.0)
    check_linear(backend, hidden, weight, bias, rest)


def test_linear_extreme_and_non_contiguous(backend):
    hidden, weight, bias, rest = make_linear_case(3, 4, 8, 23, seed=12, scale=300.0)
    view = on_device(hidden).transpose(0, 1).contiguous().transpose(0, 1)
    assert not view.is_contiguous()
    out, _ = check_linear(backend, view, weight, bias, rest)
    assert torch.isfinite(out).all()


def test_linear_errors():
    hidden, weight, bias, (targets, mask, weights, sample_index, n) = make_linear_case(
        2, 3, 8, 19, seed=13, p_mask=1.0
    )
    bad = targets.clone()
    bad[1, 2] = 19
    with pytest.raises(ValueError, match="target 19 at copy 1, position 2"):
        fused_linear_elbo(hidden, weight, bad, mask, weights, sample_index, n)
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_elbo(hidden, weight.double(), targets, mask, weights, sample_index, n)
    with pytest.raises(ValueError, match="softcap must be positive"):
        fused_linear_elbo(hidden, weight, targets, mask, weights, sample_index, n, softcap=0.0)


def test_custom_ops_opcheck():
    logits, targets, mask, weights, sample_index, n = make_case(3, 4, 10, seed=14)
    logits.requires_grad_()
    torch.library.opcheck(
        torch.ops.elbokto.fused_elbo.default,
        (logits, targets, mask, weights, sample_index, n, "torch"),
    )
    hidden, weight, bias, rest = make_linear_case(3, 4, 8, 10, seed=14, bias=True)
    for keep_logits, filter_eps in ((False, None), (True, None), (False, 1e-3), (True, 1e-3)):
        torch.library.opcheck(
            torch.ops.elbokto.fused_linear_elbo.default,
            (
                hidden.requires_grad_(),
                weight.requires_grad_(),
                bias.requires_grad_(),
                *rest,
                2.0,
                4,
                keep_logits,
                filter_eps,
                "torch",
            ),
        )


def test_torch_compile_sees_opaque_ops():
    """fullgraph=True: the ops trace as single nodes (fake tensors), forward and backward."""
    logits, targets, mask, weights, sample_index, n = make_case(3, 4, 11, seed=15)
    hidden, weight, _, rest = make_linear_case(3, 4, 8, 11, seed=15)
    upstream = torch.tensor([1.0, -2.0, 0.5])

    def step(x, h, w):
        return (
            (
                fused_elbo(x, targets, mask, weights, sample_index, n, backend="torch")
                + fused_linear_elbo(h, w, *rest, backend="torch")
                + fused_linear_elbo(h, w, *rest, keep_logits=True, backend="torch")
                + fused_linear_elbo(h, w, *rest, filter_eps=1e-3, backend="torch")
            )
            * upstream
        ).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (logits, hidden, weight)]
    # The kept logits' and the filter's sizes depend on the mask: dynamo before torch 2.11 traces
    # such ops only when told to (docs/versions.md).
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=TORCH < (2, 11)):
        got = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(step(*leaves), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)


def test_keep_logits_only_for_a_backward(monkeypatch):
    """keep_logits allocates the [M * V] logits store only when a gradient will be taken."""
    from elbokto_kernels import linear_elbo

    hidden, weight, _, rest = make_linear_case(2, 3, 8, 11, seed=16, p_mask=1.0)
    store = 2 * 3 * 11  # M * V floats; the chunk workspace is M * 4
    sizes = []
    allocate = linear_elbo.memory.empty
    monkeypatch.setattr(
        linear_elbo.memory,
        "empty",
        lambda shape, *a: sizes.append(tuple(shape)) or allocate(shape, *a),
    )
    with torch.no_grad():
        fused_linear_elbo(hidden, weight, *rest, chunk_size=4, keep_logits=True, backend="torch")
    # No tensor requires grad: no backward either.
    fused_linear_elbo(hidden, weight, *rest, chunk_size=4, keep_logits=True, backend="torch")
    assert sizes and (store,) not in sizes
    fused_linear_elbo(
        hidden.requires_grad_(), weight, *rest, chunk_size=4, keep_logits=True, backend="torch"
    )
    assert (store,) in sizes


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=str)
def test_non_finite_inputs_propagate_as_in_the_oracle(backend, value):
    """A NaN or +inf logit, or a NaN in a hidden state, is never hidden: the sample's ELBO and
    the gradients are what the float64 oracle gives (NaN where it has NaN), on every backend."""
    logits, targets, mask, weights, sample_index, n = make_case(3, 4, 37, seed=20, p_mask=1.0)
    logits[0, 1, 5] = value  # sample of copy 0: its ELBO is NaN or -inf
    logits, targets, mask, weights, sample_index = on_device(
        logits, targets, mask, weights, sample_index
    )
    x = logits.clone().requires_grad_()
    out = fused_elbo(x, targets, mask, weights, sample_index, n, backend=backend)
    x64 = logits.double().requires_grad_()
    ref = elbo_oracle(x64, targets, mask, weights, sample_index, n)
    torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert not torch.isfinite(out[sample_index[0]])
    upstream = torch.ones(n, device=DEVICE)
    (grad,) = torch.autograd.grad(out, x, upstream)
    (want,) = torch.autograd.grad(ref, x64, upstream.double())
    assert torch.equal(grad.isnan(), want.isnan())

    hidden, weight, _, rest = make_linear_case(2, 3, 8, 29, seed=21, p_mask=1.0)
    hidden[0, 2, 3] = float("nan")
    hidden, weight = on_device(hidden, weight)
    rest = (*on_device(*rest[:4]), rest[4])
    h = hidden.clone().requires_grad_()
    out = fused_linear_elbo(h, weight, *rest, backend=backend)
    ref = linear_elbo_oracle(hidden.double(), weight.double(), None, None, *rest)
    torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-5)
    assert out.isnan().any()
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert grad.isnan().any(), "the NaN reaches the hidden states' gradient"


def test_float64_is_refused_not_downcast():
    logits, targets, mask, weights, sample_index, n = make_case(2, 3, 11, seed=22)
    with pytest.raises(
        ValueError,
        match=r"logits must be float32, bfloat16 or float16, got "
        r"torch.float64 \(the kernels compute in float32",
    ):
        fused_elbo(logits.double(), targets, mask, weights, sample_index, n)
    hidden, weight, _, rest = make_linear_case(2, 3, 8, 11, seed=22)
    with pytest.raises(ValueError, match="hidden must be float32, bfloat16 or float16"):
        fused_linear_elbo(hidden.double(), weight.double(), *rest)


def test_linear_follows_autocast_like_nn_linear(backend):
    """Under autocast, float32 hidden states and head run in the autocast dtype (bf16 here), as
    nn.Linear would: the same result as bf16 inputs, gradients back in float32. A bf16 hidden
    with a float32 head outside autocast is refused, as F.linear refuses it."""
    hidden, weight, bias, rest = make_linear_case(2, 4, 8, 19, seed=23, bias=True, p_mask=1.0)
    hidden, weight, bias = on_device(hidden, weight, bias)
    rest = (*on_device(*rest[:4]), rest[4])
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = fused_linear_elbo(leaves[0], leaves[1], *rest, bias=leaves[2], backend=backend)
    want = fused_linear_elbo(
        hidden.bfloat16(), weight.bfloat16(), *rest, bias=bias.bfloat16(), backend=backend
    )
    assert torch.equal(out, want)
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)
    with pytest.raises(ValueError, match="weight must be .* of dtype torch.bfloat16"):
        fused_linear_elbo(hidden.bfloat16(), weight, *rest, backend=backend)
