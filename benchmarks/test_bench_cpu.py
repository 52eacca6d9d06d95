"""pytest-benchmark suite of the "cpu" backend and its baselines, at bench_cpu.py's quick shapes.

    pytest benchmarks/test_bench_cpu.py --benchmark-enable

Forward + backward, float32, one process for all variants: for the goal shapes, peak memory and
fresh-process figures, run ``python benchmarks/bench_cpu.py``.
"""

import pytest

from bench_cpu import SHAPES, VARIANTS, _inputs, _step

# The default chunked linear_cross_entropy takes seconds per pass on CPU (bench_cpu.py has it).
CASES = [(case, variant) for case, variants in VARIANTS.items() for variant in variants
         if variant != "lce_chunked"]


@pytest.mark.parametrize("case,variant", CASES)
def test_cpu_backend(benchmark, case, variant):
    if variant == "cpu":
        from elbokto_kernels import cpu
        if not cpu.available():
            pytest.skip("the C++ kernel did not build here")
    inputs = _inputs(SHAPES["quick"], case)
    benchmark.pedantic(_step, args=(case, variant, inputs), warmup_rounds=1, rounds=5)
