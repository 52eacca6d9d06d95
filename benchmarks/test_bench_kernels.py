"""pytest-benchmark suite of the fused ops on CUDA (skipped elsewhere).

    pytest benchmarks/test_bench_kernels.py --benchmark-enable

Forward + backward at LLaDA shapes (D = 4096, V = 126464, bf16), the fused ops on every backend
that works on the GPU against the eager comparators of gpu_check.py. For the full table with
hardware limits, run gpu_check.py.
"""

import pytest
import torch

from elbokto_kernels import usable_backends

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D, V = 4096, 126464
VARIANTS = usable_backends("cuda") + ["eager"]  # only "eager" without a GPU: all skipped then


@pytest.fixture(scope="module", params=[2048, 8192], ids=lambda m: f"M{m}")
def case(request):
    """(hidden, weight, logits, args, upstream) for M masked rows of 2M positions, bf16."""
    from comparators import make_inputs

    device = torch.device("cuda")
    a, up = make_inputs(request.param, V, device)
    h = torch.randn(*a["mask"].shape, D, device=device, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(V, D, device=device) / D**0.5).bfloat16().requires_grad_()
    x = torch.randn(*a["mask"].shape, V, device=device, dtype=torch.bfloat16).requires_grad_()
    return h, w, x, a, up


def _bench(benchmark, fn, leaves, upstream):
    def step():
        torch.autograd.grad(fn(), leaves, upstream)
        torch.cuda.synchronize()

    benchmark.pedantic(step, warmup_rounds=2, rounds=10)


@pytest.mark.parametrize("variant", VARIANTS)
def test_linear_elbo(benchmark, case, variant):
    from comparators import eager_linear

    from elbokto_kernels import fused_linear_elbo

    h, w, x, a, up = case
    if variant == "eager":
        fn = lambda: eager_linear(h, w, a)  # noqa: E731
    else:
        fn = lambda: fused_linear_elbo(h, w, **a, backend=variant)  # noqa: E731
    _bench(benchmark, fn, (h, w), up)


@pytest.mark.parametrize("variant", VARIANTS)
def test_elbo(benchmark, case, variant):
    from comparators import eager_elbo

    from elbokto_kernels import fused_elbo

    h, w, x, a, up = case
    if variant == "eager":
        fn = lambda: eager_elbo(x, a)  # noqa: E731
    else:
        fn = lambda: fused_elbo(x, **a, backend=variant)  # noqa: E731
    _bench(benchmark, fn, (x,), up)
