"""benchmarks/bench_cpu.py --quick: the CPU benchmark runs end to end (fresh worker processes,
huge-page rows included) and records its table with the goal verdicts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from elbokto_kernels import usable_backends

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"


@pytest.mark.slow
def test_bench_cpu_quick(tmp_path):
    if "cpu" not in usable_backends("cpu"):
        pytest.skip("the C++ kernel did not build here")
    readme = tmp_path / "README.md"
    result = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--rounds",
            "1",
            "--repeats",
            "1",
            "--case",
            "fused_elbo",
            "--readme",
            str(readme),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = readme.read_text()
    assert f"## CPU ({os.cpu_count()}-core)" in text
    for row in (
        "fused, backend='cpu'",
        "fused, backend='torch'",
        "eager PyTorch",
        "eager PyTorch + THP for every tensor",
    ):
        assert f"| {row} |" in text
    assert "Goal: >= 3.0x faster" in text and "`THP_MEM_ALLOC_ENABLE=1`):" in text


def test_filter_distributions_and_table():
    """The filtered case's logit distributions go from sparse to dense as documented, its
    sparsity figures follow, and its table states the goals (quick shapes, in process)."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import bench_cpu
    finally:
        sys.path.remove(str(SCRIPT.parent))
    shape = bench_cpu.SHAPES["quick"]
    figures = {d: bench_cpu.sparsity(shape, d) for d in ("very sparse", "half", "uniform")}
    assert (
        figures["very sparse"]["density"]
        < figures["half"]["density"]
        < figures["uniform"]["density"]
    )
    assert figures["very sparse"]["live"] < 0.5 and figures["uniform"]["live"] == 1.0
    assert figures["half"]["tiles_sorted"] <= figures["half"]["tiles_unsorted"]
    rows = {
        v: {"time_s": 1.0, "peak_extra_mib": 100.0}
        for v in bench_cpu.VARIANTS["fused_linear_elbo_filter"]
    }
    rows["cpu_filter@half"].update(time_s=0.5, peak_extra_mib=20.0)
    for variant, r in rows.items():
        r["sparsity"] = figures.get(variant.split("@")[1], figures["half"])
    text = "\n".join(bench_cpu.filter_table(rows, shape))
    assert ": 2.00x, met; peak memory <= 0.3x eager's: 0.20x, met." in text
    assert "no slower than the exact op: 1.00x its speed, met." in text


@pytest.mark.slow
def test_bench_integration_quick(tmp_path):
    """benchmarks/bench_integration.py --quick: the three MDLM steps agree on the loss (the script
    refuses otherwise) and the table is recorded."""
    readme = tmp_path / "README.md"
    script = SCRIPT.parent / "bench_integration.py"
    result = subprocess.run(
        [sys.executable, str(script), "--quick", "--repeats", "1", "--readme", str(readme)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = readme.read_text()
    assert "## The kernels in an adopter's MDLM step (cpu)" in text
    for row in ("adopter", "masked rows", "fused_lm_head"):
        assert f"| {row} |" in text
