"""The "cpu" backend (C++ kernel): its row primitives against float64 and the torch backend, and
fused_elbo / fused_linear_elbo end to end with backend="cpu" against float64 dense autograd.

The first test to run builds the extension (about 30 s to a minute, once per machine: cached).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from elbokto_kernels import cpu, fused_elbo, fused_linear_elbo, reference
from elbokto_kernels.backends import resolve_backend

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (values, gradients) relative tolerances against float64 (DESIGN.md section 4).
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-2), torch.float16: (1e-4, 1e-2)}


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu.available():
        pytest.skip("the C++ CPU kernel did not build here (see the RuntimeWarning)")


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    """Elementwise rtol, with an absolute floor of rtol * max|want| for the near-zero entries."""
    want = want.double()
    floor = rtol * want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=floor)


def lse_f64(x, rows, targets, softcap):
    z = (x if rows is None else x[rows]).double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    inside = (targets >= 0) & (targets < x.shape[1])
    picked = z.gather(1, targets.clamp(0, x.shape[1] - 1)[:, None])[:, 0]
    return torch.logsumexp(z, 1), torch.where(inside, picked, 0.0)


def grad_f64(x, rows, targets, lse, scale, softcap):
    """[M, V] float64 gradient rows (the contract of row_grad)."""
    u = (x if rows is None else x[rows]).double()
    z = u if softcap is None else softcap * torch.tanh(u / softcap)
    onehot = F.one_hot(targets.clamp(0, x.shape[1] - 1), x.shape[1]).double()
    onehot *= ((targets >= 0) & (targets < x.shape[1]))[:, None]
    g = scale.double()[:, None] * (onehot - torch.exp(z - lse.double()[:, None]))
    return g if softcap is None else g * (1 - torch.tanh(u / softcap) ** 2)


def make_x(n, v, dtype, layout, gen, scale=4.0):
    """[n, v] logits laid out as asked: contiguous, a column slice of a wider tensor, every
    other row of a taller one, or the transpose of a [v, n] tensor (column stride n)."""
    if layout == "contiguous":
        return (torch.randn(n, v, generator=gen) * scale).to(dtype)
    if layout == "column_slice":
        return (torch.randn(n, v + 7, generator=gen) * scale).to(dtype)[:, 3:v + 3]
    if layout == "row_strided":
        return (torch.randn(2 * n, v, generator=gen) * scale).to(dtype)[::2]
    assert layout == "transposed"
    return (torch.randn(v, n, generator=gen) * scale).to(dtype).t()


def make_rows(n, m, gen):
    return torch.randperm(n, generator=gen)[:m]


def make_targets(m, v, gen):
    """Targets in [0, V) with about one in four outside (another vocabulary chunk's)."""
    t = torch.randint(0, v, (m,), generator=gen)
    outside = torch.rand(m, generator=gen) < 0.25
    far = torch.where(torch.rand(m, generator=gen) < 0.5, -1 - t, v + t)
    return torch.where(outside, far, t)


def check_primitives(x, rows, targets, softcap, out_dtype=None):
    """row_lse and row_grad of the cpu backend against float64 and the torch backend."""
    rtol_v, rtol_g = TOL[x.dtype]
    lse, tl = cpu.row_lse(x, rows, targets, softcap)
    assert lse.dtype == tl.dtype == torch.float32 and lse.shape == tl.shape == targets.shape
    want_lse, want_tl = lse_f64(x, rows, targets, softcap)
    assert_rel(lse, want_lse, rtol_v)
    assert_rel(tl, want_tl, rtol_v)
    ref_lse, ref_tl = reference.row_lse(x, rows, targets, softcap)
    assert_rel(lse, ref_lse, rtol_v)
    assert_rel(tl, ref_tl, rtol_v)

    scale = torch.randn(targets.numel(), generator=torch.Generator().manual_seed(1))
    out_dtype = out_dtype or x.dtype
    rtol_g = max(rtol_g, TOL[out_dtype][1])
    out = torch.full(x.shape, 7.0, dtype=out_dtype)  # rows not in `rows` must keep the 7s
    cpu.row_grad(x, rows, targets, want_lse.float(), scale, softcap, out)
    selected = torch.arange(x.shape[0]) if rows is None else rows
    assert_rel(out[selected], grad_f64(x, rows, targets, want_lse.float(), scale, softcap),
               rtol_g)
    untouched = torch.ones(x.shape[0], dtype=torch.bool)
    untouched[selected] = False
    assert (out[untouched] == 7.0).all()
    ref_out = torch.full(x.shape, 7.0, dtype=out_dtype)
    reference.row_grad(x, rows, targets, want_lse.float(), scale, softcap, ref_out)
    assert_rel(out, ref_out, rtol_g)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 7.5])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "row_strided", "transposed"])
@pytest.mark.parametrize("with_rows", [False, True])
def test_row_primitives(dtype, softcap, layout, with_rows):
    gen = torch.Generator().manual_seed(0)
    n, v = 37, 1003  # V neither a power of two nor a multiple of the vector width
    x = make_x(n, v, dtype, layout, gen)
    rows = make_rows(n, 19, gen) if with_rows else None
    check_primitives(x, rows, make_targets(19 if with_rows else n, v, gen), softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llada_vocabulary(dtype):
    gen = torch.Generator().manual_seed(0)
    n, v = 4, 126464
    x = make_x(n, v, dtype, "contiguous", gen)
    check_primitives(x, torch.tensor([3, 0, 2]), torch.tensor([126463, 0, 70001]), None)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_logits_into_half_gradient(out_dtype):
    # fused_linear_elbo with half inputs: float32 chunk logits, gradient in the input dtype.
    gen = torch.Generator().manual_seed(0)
    x = make_x(16, 515, torch.float32, "contiguous", gen)
    check_primitives(x, None, make_targets(16, 515, gen), 30.0, out_dtype=out_dtype)


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_grad_in_place(with_rows, softcap):
    gen = torch.Generator().manual_seed(0)
    n, v = 12, 2500  # more than one 2048-column block
    x = make_x(n, v, torch.float32, "contiguous", gen)
    rows = make_rows(n, 5, gen) if with_rows else None
    targets = make_targets(5 if with_rows else n, v, gen)
    lse, _ = reference.row_lse(x, rows, targets, softcap)
    scale = torch.rand(targets.numel(), generator=gen) + 0.5
    want = x.clone()
    reference.row_grad(x, rows, targets, lse, scale, softcap, want)
    cpu.row_grad(x, rows, targets, lse, scale, softcap, x)
    assert_rel(x, want, 1e-5)


def test_no_rows():
    x = torch.randn(5, 100)
    for rows, n in ((torch.empty(0, dtype=torch.long), 5), (None, 0)):
        xs = x[:n]
        targets = torch.empty(0, dtype=torch.long)
        lse, tl = cpu.row_lse(xs, rows, targets, None)
        assert lse.shape == tl.shape == (0,)
        out = torch.full_like(xs, 3.0)
        cpu.row_grad(xs, rows, targets, lse, lse, None, out)
        assert (out == 3.0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_extreme_logits(dtype, softcap):
    gen = torch.Generator().manual_seed(0)
    n, v = 6, 333
    x = torch.randn(n, v, generator=gen)
    x[0, 5] = 1e4        # one dominant logit, at the target: p = 1, gradient 0
    x[1, 7] = 1e4        # dominant logit away from the target
    x[2, :] = -1e4       # all equal and very negative
    x[3, ::3] = -1e4
    x[4, 10:20] = float("-inf")  # masked-out vocabulary entries
    x[5, 0], x[5, 1] = 1e4, -1e4
    x = x.to(dtype)
    targets = torch.tensor([5, 3, 0, 0, 2, 1])
    lse, tl = cpu.row_lse(x, None, targets, softcap)
    assert torch.isfinite(lse).all() and torch.isfinite(tl).all()
    check_primitives(x, None, targets, softcap)
    out = torch.empty_like(x)
    cpu.row_grad(x, None, targets, lse, torch.ones(n), softcap, out)
    assert torch.isfinite(out.float()).all()
    assert (out[4, 10:20] == 0).all()


def test_bad_arguments():
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="rows"):
        cpu.row_lse(x, torch.tensor([0, 4]), torch.tensor([1, 2]), None)
    with pytest.raises(RuntimeError, match="targets"):
        cpu.row_lse(x, None, torch.tensor([1, 2]), None)
    with pytest.raises(RuntimeError, match="out"):
        cpu.row_grad(x, None, torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(4),
                     None, torch.empty(10, 4).t())


def test_auto_resolves_to_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_build_failure_falls_back_to_torch(monkeypatch):
    from torch.utils import cpp_extension

    built = cpu._build()
    monkeypatch.setattr(cpp_extension, "load", lambda **_: (_ for _ in ()).throw(
        RuntimeError("Ninja is required to load C++ extensions")))
    cpu._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falls back to the torch path"):
            assert not cpu.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning comes once per process
            assert not cpu.available()
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
        with pytest.raises(RuntimeError, match="Ninja"):
            cpu.row_lse(torch.zeros(1, 2), None, torch.zeros(1, dtype=torch.long), None)
    finally:
        # Put the built extension back without loading the shared library a second time.
        cpu._build.cache_clear()
        monkeypatch.setattr(cpp_extension, "load", lambda **_: built[0])
        assert cpu.available()


# ----------------------------------------------------------------------------- end to end

def elbo_f64(logits, targets, mask, weights, sample_index, num_samples, softcap=None):
    z = logits.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    w = weights.double() if weights.dim() == 2 else weights.double()[:, None]
    per_copy = (logp * mask * w).sum(1)
    return torch.zeros(num_samples, dtype=torch.float64).index_add(0, sample_index, per_copy)


def elbo_inputs(C, L, V, gen, per_position_weights):
    mask = torch.rand(C, L, generator=gen) < 0.5
    mask[0, 0] = True
    targets = torch.randint(0, V, (C, L), generator=gen).masked_fill(~mask, -100)
    shape = (C, L) if per_position_weights else (C,)
    weights = torch.rand(shape, generator=gen) + 0.1
    sample_index = torch.tensor([0, 1, 0, 2])[:C]
    return targets, mask, weights, sample_index, 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_position_weights", [False, True])
def test_fused_elbo_end_to_end(dtype, per_position_weights):
    gen = torch.Generator().manual_seed(0)
    C, L, V = 4, 9, 777
    targets, mask, weights, sample_index, B = elbo_inputs(C, L, V, gen, per_position_weights)
    logits = (torch.randn(C, L, V, generator=gen) * 3).to(dtype).requires_grad_()
    grad_out = torch.randn(B, generator=gen)
    out = fused_elbo(logits, targets, mask, weights, sample_index, B, backend="cpu")
    (grad,) = torch.autograd.grad(out, logits, grad_out)

    logits64 = logits.detach().double().requires_grad_()
    want = elbo_f64(logits64, targets, mask, weights, sample_index, B)
    (want_grad,) = torch.autograd.grad(want, logits64, grad_out.double())
    rtol_v, rtol_g = TOL[dtype]
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_rel(out, want, rtol_v)
    assert_rel(grad, want_grad, rtol_g)
    assert (grad[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias,softcap", [(False, None), (True, 20.0)])
def test_fused_linear_elbo_end_to_end(dtype, bias, softcap):
    gen = torch.Generator().manual_seed(0)
    C, L, D, V = 4, 9, 24, 1001
    targets, mask, weights, sample_index, B = elbo_inputs(C, L, V, gen, False)
    hidden = torch.randn(C, L, D, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(V, D, generator=gen)).to(dtype).requires_grad_()
    b = (torch.randn(V, generator=gen)).to(dtype).requires_grad_() if bias else None
    params = [hidden, weight] + ([b] if bias else [])
    grad_out = torch.randn(B, generator=gen)
    # chunk_size 300: targets fall in other chunks than the one being scored.
    out = fused_linear_elbo(hidden, weight, targets, mask, weights, sample_index, B, bias=b,
                            softcap=softcap, chunk_size=300, backend="cpu")
    grads = torch.autograd.grad(out, params, grad_out)

    params64 = [p.detach().double().requires_grad_() for p in params]
    logits = params64[0] @ params64[1].t() + (params64[2] if bias else 0)
    want = elbo_f64(logits, targets, mask, weights, sample_index, B, softcap)
    want_grads = torch.autograd.grad(want, params64, grad_out.double())
    rtol_v, rtol_g = TOL[dtype]
    assert_rel(out, want, rtol_v)
    for got, expected, p in zip(grads, want_grads, params):
        assert got.dtype == p.dtype
        assert_rel(got, expected, rtol_g)
    assert (grads[0][~mask] == 0).all()
