"""pytest-benchmark suite of the "cpu" backend and its comparators, at bench_cpu.py's quick shapes.

    pytest benchmarks/test_bench_cpu.py --benchmark-enable

Forward + backward, float32, one process for all variants: for the goal shapes, peak memory and
fresh-process figures, run ``python benchmarks/bench_cpu.py``.
"""

import pytest
from bench_cpu import SHAPES, THP, VARIANTS, _inputs, _step, backend_of

# Left to bench_cpu.py: the default chunked linear_cross_entropy, by far the slowest variant on
# CPU, and the "+thp" variants, which need a process started with THP_MEM_ALLOC_ENABLE=1.
CASES = [
    (case, variant)
    for case, variants in VARIANTS.items()
    for variant in variants
    if variant != "lce_chunked" and not variant.endswith(THP)
]


@pytest.mark.parametrize("case,variant", CASES)
def test_cpu_backend(benchmark, case, variant):
    from elbokto_kernels import usable_backends

    backend = backend_of(variant)
    if backend and backend not in usable_backends("cpu"):
        pytest.skip(f"backend {backend!r} does not work here")
    inputs = _inputs(SHAPES["quick"], case)
    benchmark.pedantic(_step, args=(case, variant, inputs), warmup_rounds=1, rounds=5)
