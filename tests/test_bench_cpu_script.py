"""benchmarks/bench_cpu.py --quick: the CPU benchmark runs end to end (fresh worker processes,
huge-page rows included) and records its table with the goal verdicts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from elbokto_kernels import usable_backends

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_cpu.py"


def test_bench_cpu_quick(tmp_path):
    if "cpu" not in usable_backends("cpu"):
        pytest.skip("the C++ kernel did not build here")
    readme = tmp_path / "README.md"
    result = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--rounds", "1",
                             "--repeats", "1", "--case", "fused_elbo", "--readme", str(readme)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    text = readme.read_text()
    assert f"## CPU ({os.cpu_count()}-core)" in text
    for row in ("fused, backend='cpu'", "fused, backend='torch'", "eager PyTorch",
                "eager PyTorch + THP for every tensor"):
        assert f"| {row} |" in text
    assert "Goal: >= 3.0x faster" in text and "`THP_MEM_ALLOC_ENABLE=1`):" in text
