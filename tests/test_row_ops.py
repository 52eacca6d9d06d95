"""The row primitives of every backend (``RowOps``: row_lse, row_grad) against the float64
oracle, and the backend registry."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from devices import DEVICE, on_device

from elbokto_kernels.backends import BACKENDS, resolve_backend, row_ops, usable_backends
from elbokto_kernels.oracle import assert_close, row_grad_oracle, row_lse_oracle, tolerances

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CPU = torch.device("cpu")


def make_x(n, v, dtype, layout, gen, scale=4.0):
    """[n, v] logits on the test device, laid out as asked: contiguous, a column slice of a wider
    tensor, every other row of a taller one, or the transpose of a [v, n] tensor (column stride
    n). The layout is made on the device (a copy across devices may not keep it)."""

    def random(*shape):
        return on_device((torch.randn(*shape, generator=gen) * scale).to(dtype))

    if layout == "contiguous":
        return random(n, v)
    if layout == "column_slice":
        return random(n, v + 7)[:, 3 : v + 3]
    if layout == "row_strided":
        return random(2 * n, v)[::2]
    assert layout == "transposed"
    return random(v, n).t()


def make_rows(n, m, gen):
    return torch.randperm(n, generator=gen)[:m]


def make_targets(m, v, gen):
    """Targets in [0, V) with about one in four outside (another vocabulary chunk's)."""
    t = torch.randint(0, v, (m,), generator=gen)
    outside = torch.rand(m, generator=gen) < 0.25
    far = torch.where(torch.rand(m, generator=gen) < 0.5, -1 - t, v + t)
    return torch.where(outside, far, t)


def selected_and_untouched(num_rows, rows):
    """(row ids that row_grad writes, mask of the rows it must leave alone)."""
    selected = torch.arange(num_rows, device=DEVICE) if rows is None else rows
    untouched = torch.ones(num_rows, dtype=torch.bool, device=DEVICE)
    untouched[selected] = False
    return selected, untouched


def check_row_ops(backend, x, rows, targets, softcap, out_dtype=None):
    """row_lse and row_grad of ``backend`` against the float64 oracle, at DESIGN.md §4's
    tolerances; returns (lse, target_logit). Tensors are moved to the test device."""
    x, rows, targets = on_device(x, rows, targets)
    ops = row_ops(backend)
    value_tol, grad_tol = tolerances(x.dtype)
    lse, target_logit = ops.row_lse(x, rows, targets, softcap)
    assert lse.dtype == target_logit.dtype == torch.float32
    assert lse.shape == target_logit.shape == targets.shape
    want_lse, want_target_logit = row_lse_oracle(x, rows, targets, softcap)
    assert_close(lse, want_lse, value_tol, "lse")
    assert_close(target_logit, want_target_logit, value_tol, "target logit")
    # The optional row maxima (gradient filtering's tile maxima) change nothing else.
    row_max = torch.full(targets.shape, 7.0, device=DEVICE)
    again = ops.row_lse(x, rows, targets, softcap, row_max)
    assert torch.equal(again[0], lse) and torch.equal(again[1], target_logit)
    z = (x if rows is None else x[rows]).double()
    z = z if softcap is None else softcap * torch.tanh(z / softcap)
    assert_close(row_max, z.amax(1), value_tol, "row max")

    scale = on_device(torch.randn(targets.numel(), generator=torch.Generator().manual_seed(1)))
    out_dtype = out_dtype or x.dtype
    grad_tol = max(grad_tol, tolerances(out_dtype)[1])
    out = torch.full(x.shape, 7.0, dtype=out_dtype, device=DEVICE)
    ops.row_grad(x, rows, targets, want_lse.float(), scale, softcap, out)
    selected, untouched = selected_and_untouched(x.shape[0], rows)
    assert_close(
        out[selected], row_grad_oracle(x, rows, targets, scale, softcap), grad_tol, "gradient"
    )
    assert (out[untouched] == 7.0).all(), "rows outside `rows` must be left untouched"
    return lse, target_logit


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 7.5])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "row_strided", "transposed"])
@pytest.mark.parametrize("with_rows", [False, True])
def test_row_ops(backend, dtype, softcap, layout, with_rows):
    gen = torch.Generator().manual_seed(0)
    n, v = 37, 1003  # V neither a power of two nor a multiple of a vector width
    x = make_x(n, v, dtype, layout, gen)
    rows = make_rows(n, 19, gen) if with_rows else None
    check_row_ops(backend, x, rows, make_targets(19 if with_rows else n, v, gen), softcap)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_llada_vocabulary(backend, dtype):
    gen = torch.Generator().manual_seed(0)
    x = make_x(4, 126464, dtype, "contiguous", gen)
    check_row_ops(backend, x, torch.tensor([3, 0, 2]), torch.tensor([126463, 0, 70001]), None)


@pytest.mark.parametrize("softcap", [None, 7.5])
def test_several_vocabulary_blocks(backend, softcap):
    """Rows longer than every backend's block (C++: 2048 columns, Triton under the interpreter:
    16384), with the row maximum in the last block, the first, or one late spike: the online
    log-sum-exp must rescale its running sum whenever a later block raises the maximum."""
    gen = torch.Generator().manual_seed(3)
    v = 2 * 16384 + 7
    x = make_x(4, v, torch.float32, "contiguous", gen)
    ramp = torch.linspace(-6.0, 6.0, v, device=DEVICE)
    x[1] += ramp
    x[2] -= ramp
    x[3, v - 2] = 25.0
    check_row_ops(backend, x, None, torch.tensor([0, v - 1, 16384, v - 2]), softcap)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_logits_into_half_gradient(backend, out_dtype):
    # fused_linear_elbo with half inputs: float32 chunk logits, gradient in the input dtype.
    gen = torch.Generator().manual_seed(0)
    x = make_x(16, 515, torch.float32, "contiguous", gen)
    check_row_ops(backend, x, None, make_targets(16, 515, gen), 30.0, out_dtype=out_dtype)


@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_grad_in_place(backend, with_rows, softcap):
    """out is x itself (fused_linear_elbo overwrites recomputed float32 logits)."""
    gen = torch.Generator().manual_seed(0)
    n, v = 12, 2500  # more than one block of columns for the C++ kernel
    x = make_x(n, v, torch.float32, "contiguous", gen)
    rows = make_rows(n, 5, gen) if with_rows else None
    targets = make_targets(5 if with_rows else n, v, gen)
    scale = torch.rand(targets.numel(), generator=gen) + 0.5
    rows, targets, scale = on_device(rows, targets, scale)
    lse, _ = row_lse_oracle(x, rows, targets, softcap)
    want = row_grad_oracle(x, rows, targets, scale, softcap)
    before = x.clone()
    row_ops(backend).row_grad(x, rows, targets, lse.float(), scale, softcap, x)
    selected, untouched = selected_and_untouched(n, rows)
    assert_close(x[selected], want, tolerances(torch.float32)[1], "gradient")
    assert torch.equal(x[untouched], before[untouched])


def test_no_rows(backend):
    ops = row_ops(backend)
    x = torch.randn(5, 100, device=DEVICE)
    for rows, n in ((torch.empty(0, dtype=torch.long, device=DEVICE), 5), (None, 0)):
        xs = x[:n]
        targets = torch.empty(0, dtype=torch.long, device=DEVICE)
        lse, target_logit = ops.row_lse(xs, rows, targets, None)
        assert lse.shape == target_logit.shape == (0,)
        out = torch.full_like(xs, 3.0)
        ops.row_grad(xs, rows, targets, lse, lse, None, out)
        assert (out == 3.0).all()


# The interpreter's numpy warns when the softcap's exp(2x / s) overflows to inf, its intended limit.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_extreme_logits(backend, dtype, softcap):
    gen = torch.Generator().manual_seed(0)
    n, v = 6, 333
    x = torch.randn(n, v, generator=gen)
    x[0, 5] = 1e4  # one dominant logit, at the target: p = 1, gradient 0
    x[1, 7] = 1e4  # dominant logit away from the target
    x[2, :] = -1e4  # all equal and very negative
    x[3, ::3] = -1e4
    x[4, 10:20] = float("-inf")  # masked-out vocabulary entries
    x[5, 0], x[5, 1] = 1e4, -1e4
    x, targets = on_device(x.to(dtype), torch.tensor([5, 3, 0, 0, 2, 1]))
    lse, target_logit = check_row_ops(backend, x, None, targets, softcap)
    assert torch.isfinite(lse).all() and torch.isfinite(target_logit).all()
    out = torch.empty_like(x)
    row_ops(backend).row_grad(x, None, targets, lse, torch.ones(n, device=DEVICE), softcap, out)
    assert torch.isfinite(out.float()).all()
    assert (out[4, 10:20] == 0).all()


# ------------------------------------------------------------------------------- the registry


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1",
    reason="checks the interpreter's registry entry (--device cpu)",
)
def test_usable_backends_on_cpu(monkeypatch):
    usable = usable_backends(CPU)
    assert usable == [name for name in BACKENDS[1:] if name in usable]  # registry order
    assert "torch" in usable and "triton" in usable  # conftest.py set TRITON_INTERPRET=1
    assert resolve_backend("auto", CPU) == usable[1]  # the interpreter is never "auto"'s pick
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "triton" not in usable_backends(CPU)
    with pytest.raises(
        ValueError,
        match="backend 'triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1",
    ):
        resolve_backend("triton", CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_no_backend_for_a_missing_device():
    assert usable_backends("cuda") == []


def test_registry_errors():
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors, got meta"):
        resolve_backend("cpu", torch.device("meta"))
    with pytest.raises(ValueError, match="no backend 'auto'"):
        row_ops("auto")


def test_importing_the_package_imports_no_triton():
    """So that TRITON_INTERPRET can still be set after ``import elbokto_kernels``."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    code = (
        "import sys, elbokto_kernels, elbokto_kernels.selfcheck; sys.exit('triton' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=300).returncode == 0


# ------------------------------------------------------------------------- non-finite logits


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_logits_as_the_oracle(backend, value, softcap):
    """A NaN or an infinity in a row gives what the float64 oracle (torch's logsumexp and its
    autograd) gives, on every backend: the same NaN, the same infinities, NaN gradients exactly
    where the oracle has them. Row 0 holds the value at its target, row 1 away from it in a later
    vocabulary block (past the C++ kernel's 2048 columns), row 2 at both places, row 3 none."""
    gen = torch.Generator().manual_seed(0)
    n, v = 4, 3000
    x = torch.randn(n, v, generator=gen)
    targets = torch.tensor([5, 7, 9, 11])
    x[0, 5] = x[1, 2500] = x[2, 9] = x[2, 2600] = value
    x, targets = on_device(x, targets)
    ops = row_ops(backend)
    lse, target_logit = ops.row_lse(x, None, targets, softcap)
    want_lse, want_target = row_lse_oracle(x, None, targets, softcap)
    torch.testing.assert_close(lse.double(), want_lse, equal_nan=True, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        target_logit.double(), want_target, equal_nan=True, rtol=1e-5, atol=1e-5
    )
    scale = torch.full((n,), 0.5, device=DEVICE)
    out = torch.empty_like(x)
    ops.row_grad(x, None, targets, lse, scale, softcap, out)
    want = row_grad_oracle(x, None, targets, scale, softcap)
    assert torch.equal(out.isnan(), want.isnan()), "NaN gradients where the oracle has them"
    torch.testing.assert_close(out.double().nan_to_num(), want.nan_to_num(), rtol=1e-4, atol=1e-6)
