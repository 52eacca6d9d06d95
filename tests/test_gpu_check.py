"""benchmarks/gpu_check.py --dry-run: the prepared GPU script runs end to end at tiny CPU shapes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_dry_run():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--vocab", "300", "--rows", "16"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout
    for variant in (
        "triton",
        "torch path",
        "eager",
        "GEMM floor",
        "filter_eps=auto",
        "filter_eps=auto (zipf)",
    ):
        assert variant in table
    assert "linear triton vs float64 oracle" in table
    assert "linear triton filter_eps=auto vs float64 oracle" in table
