"""Multi-process tests: a script run on two gloo ranks under torchrun, as users launch training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def torchrun(script: Path, *args: str, nproc: int = 2,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc script *args`` with one thread per
    rank and tests/ importable; fails the test with the ranks' stderr unless every rank exits 0."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), str(script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_every_rank_matched(result: subprocess.CompletedProcess, nproc: int = 2) -> None:
    """The workers print ``rank r: match`` or ``rank r: MISMATCH``."""
    assert result.stdout.count("match") == nproc and "MISMATCH" not in result.stdout, (
        result.stdout + result.stderr[-3000:])
