"""The Triton kernels compiled for GPUs on this machine without one: every configuration the ops
launch (``GPU_LAUNCHES``, checked here against what they do launch) compiles for sm_80 and sm_90
with no register spills and shared memory within each target's limit
(``benchmarks/kernel_report.py``, in a process without the interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elbokto_kernels import fused_elbo, fused_linear_elbo
from elbokto_kernels.backends import triton as kernels

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "kernel_report.py"


def test_gpu_launches_are_all_the_ops_launch(monkeypatch):
    """Every launch of fused_elbo and fused_linear_elbo (every dtype, soft-capped or not, kept
    logits, filtered) is one of GPU_LAUNCHES, so the compile check covers it."""
    seen = set()

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                out = args[7].dtype if self.name == "row_grad" else None
                seen.add(
                    kernels.Launch(
                        self.name, args[0].dtype, out, kwargs["HAS_ROWS"], kwargs["HAS_SOFTCAP"]
                    )
                )
                return self.kernel[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(kernels, "_row_lse_kernel", Recorder("row_lse", kernels._row_lse_kernel))
    monkeypatch.setattr(kernels, "_row_grad_kernel", Recorder("row_grad", kernels._row_grad_kernel))
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[True, False, True]])
    targets, weights, sample_index = (
        torch.tensor([[1, -100, 4]]),
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
    )
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.randn(1, 3, 9, generator=g).to(dtype).requires_grad_()
        fused_elbo(logits, targets, mask, weights, sample_index, 1, backend="triton").backward()
        for softcap in (None, 5.0):
            for options in ({}, {"keep_logits": True}, {"filter_eps": 1e-3}):
                hidden = torch.randn(1, 3, 4, generator=g).to(dtype).requires_grad_()
                weight = torch.randn(9, 4, generator=g).to(dtype).requires_grad_()
                fused_linear_elbo(
                    hidden,
                    weight,
                    targets,
                    mask,
                    weights,
                    sample_index,
                    1,
                    softcap=softcap,
                    backend="triton",
                    **options,
                ).backward()
    assert seen <= set(kernels.GPU_LAUNCHES), seen - set(kernels.GPU_LAUNCHES)


def test_kernels_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("row_")]
    assert len(rows) == 2 * len(kernels.GPU_LAUNCHES)
    assert "PROBLEM" not in result.stdout


def test_report_flags_spills_and_shared_memory(monkeypatch):
    """The check of kernel_report.py fails a spilling kernel and one over the shared memory
    limit, from ptxas's own words."""
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "1"))
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import kernel_report
    finally:
        sys.path.remove(str(SCRIPT.parent))
    launch = kernels.GPU_LAUNCHES[0]
    clean = (
        "ptxas info    : Function properties for _row_lse_kernel\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 80 registers, used 1 barriers, 32 bytes smem"
    )
    use = kernel_report.parse_ptxas(clean, 32)
    assert use == kernel_report.Usage(80, 0, 32)
    assert kernel_report.problems(launch, "A100", use, 164 << 10) == []
    spilling = kernel_report.parse_ptxas(
        clean.replace(
            "0 bytes spill stores, 0 bytes spill loads", "8 bytes spill stores, 8 bytes spill loads"
        ),
        32,
    )
    assert (
        "16 bytes of register spills"
        in kernel_report.problems(launch, "A100", spilling, 164 << 10)[0]
    )
    assert (
        "over"
        in kernel_report.problems(launch, "A100", kernel_report.Usage(80, 0, 200 << 10), 164 << 10)[
            0
        ]
    )
    with pytest.raises(ValueError, match="no register"):
        kernel_report.parse_ptxas("ptxas fatal", 0)
