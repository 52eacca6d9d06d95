"""Registers, spills and shared memory of every Triton kernel configuration the ops launch on GPU,
compiled for sm_80 (A100) and sm_90 (H100) on a machine without a GPU.

    python benchmarks/kernel_report.py            # the table
    python benchmarks/kernel_report.py --check    # and exit 1 on a spill or on shared memory
                                                  # over the target's limit (part of make test)

Each configuration of ``elbokto_kernels.backends.triton.GPU_LAUNCHES`` goes through the backend's
own ``row_lse`` / ``row_grad`` on CPU tensors (contiguous, LLaDA's vocabulary) with the kernels
replaced by a recorder, so arguments, block size and warps are those of a GPU launch. The recorded
launch is specialised as Triton's JIT does it (the NVIDIA backend's binder: 16-byte alignment,
integers equal to 1 become constants), compiled with ``triton.compile`` for each target, and
``ptxas -v`` (the one Triton uses, shipped in the triton wheel) reports registers and spill bytes
of the PTX; shared memory is Triton's launch metadata. Triton caches compiled kernels
(~/.triton/cache): a second run takes seconds.

TRITON_INTERPRET must be unset for triton's kernels to be compilable: the script unsets it before
importing triton.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported, by anything

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import (
    create_function_from_signature,
    find_paths_if,
    get_iterable_path,
)

from elbokto_kernels.backends import triton as kernels

# (name, target, shared memory a block may use in bytes)
TARGETS = (
    ("A100 sm_80", GPUTarget("cuda", 80, 32), 164 << 10),
    ("H100 sm_90", GPUTarget("cuda", 90, 32), 228 << 10),
)
ROWS, VOCAB = 8, 126464


@dataclass(frozen=True)
class Usage:
    registers: int
    spill_bytes: int  # spill stores + spill loads, bytes per thread
    shared_bytes: int


def recorded_launch(launch: kernels.Launch):
    """(kernel, args, kwargs) of the GPU launch of ``launch``, recorded from the backend's
    wrapper."""
    recorded = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: recorded.append((self.kernel, args, kwargs))

    x = torch.zeros(ROWS, VOCAB, dtype=launch.x_dtype)
    rows = torch.arange(ROWS) if launch.rows else None
    targets = torch.zeros(ROWS, dtype=torch.int64)
    softcap = 30.0 if launch.softcap else None
    name = "_row_lse_kernel" if launch.kernel == "row_lse" else "_row_grad_kernel"
    kernel = getattr(kernels, name)
    setattr(kernels, name, Recorder(kernel))
    try:
        if launch.kernel == "row_lse":
            kernels.row_lse(x, rows, targets, softcap)
        else:
            vector = torch.zeros(ROWS)
            kernels.row_grad(
                x,
                rows,
                targets,
                vector,
                vector,
                softcap,
                torch.zeros(ROWS, VOCAB, dtype=launch.out_dtype),
            )
    finally:
        setattr(kernels, name, kernel)
    (call,) = recorded
    return call


def compile_for(kernel, args, kwargs, target: GPUTarget):
    """``triton.compile`` of one launch for ``target``, specialised as the JIT would."""
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    if hasattr(kernel, "_pack_args"):
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, specialization, options
        )
    else:  # triton < 3.5 does the same inside JITFunction.run
        options = backend.parse_options(kwargs)
        values = [x[0] for x in specialization]
        signature = {p.name: v for p, v in zip(kernel.params, values)}
        constexprs = {
            path: get_iterable_path(list(bound.values()), path)
            for path in find_paths_if(values, lambda _, v: v == "constexpr")
        }
        attrs = [x[1] for x in specialization]
        attrs = {
            path: backend.parse_attr(get_iterable_path(attrs, path))
            for path in find_paths_if(attrs, lambda _, x: isinstance(x, str))
        }
    return triton.compile(
        ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__
    )


def usage(compiled, target: GPUTarget) -> Usage:
    """Registers and spills from ``ptxas -v`` on the compiled PTX (the ptxas Triton itself uses
    for the target); shared memory from Triton."""
    arch = f"sm_{target.arch}{'a' if target.arch >= 90 else ''}"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(compiled.asm["ptx"])
        ptx.flush()
        ptxas = get_ptxas(target.arch)
        ptxas = ptxas[0] if isinstance(ptxas, tuple) else ptxas.path  # (path, version) < 3.5
        report = subprocess.run(
            [ptxas, f"--gpu-name={arch}", "-v", ptx.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return parse_ptxas(report, compiled.metadata.shared)


def parse_ptxas(report: str, shared_bytes: int) -> Usage:
    """Usage from the text of ``ptxas -v`` (one kernel)."""
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    if not registers or not spills:
        raise ValueError(f"no register / spill figures in ptxas output:\n{report}")
    return Usage(int(registers[1]), int(spills[1]) + int(spills[2]), shared_bytes)


def problems(launch: kernels.Launch, target_name: str, use: Usage, shared_limit: int) -> list[str]:
    """What is wrong with a compiled configuration: spills, or shared memory over the limit."""
    where = f"{launch} on {target_name}"
    found = []
    if use.spill_bytes:
        found.append(f"{where}: {use.spill_bytes} bytes of register spills")
    if use.shared_bytes > shared_limit:
        found.append(f"{where}: {use.shared_bytes} bytes of shared memory, over {shared_limit}")
    return found


def _dtype(dtype) -> str:
    return "-" if dtype is None else str(dtype).removeprefix("torch.")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 on a spill or on shared memory over the limit"
    )
    args = parser.parse_args()
    jobs = [
        (launch, recorded_launch(launch), target)
        for launch in kernels.GPU_LAUNCHES
        for target in TARGETS
    ]

    def run(job):
        launch, (kernel, call_args, call_kwargs), (_, target, _) = job
        return usage(compile_for(kernel, call_args, call_kwargs, target), target)

    # Triton reads sysconfig in each compile; its lazy first read is not thread-safe on Python
    # 3.10 (a thread can see None), so it happens here, before the threads.
    sysconfig.get_config_vars()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = list(pool.map(run, jobs))
    print(
        f"{'kernel':<10}{'logits':<10}{'gradient':<10}{'rows':<6}{'softcap':<9}"
        f"{'target':<12}{'registers':>10}{'spill B':>9}{'shared B':>10}"
    )
    found = []
    for (launch, _, (name, _, limit)), use in zip(jobs, results):
        print(
            f"{launch.kernel:<10}{_dtype(launch.x_dtype):<10}{_dtype(launch.out_dtype):<10}"
            f"{'yes' if launch.rows else 'no':<6}{'yes' if launch.softcap else 'no':<9}"
            f"{name:<12}{use.registers:>10}{use.spill_bytes:>9}{use.shared_bytes:>10}"
        )
        found += problems(launch, name, use, limit)
    warps = sorted({call_kwargs["num_warps"] for _, (_, _, call_kwargs), _ in jobs})
    print(
        f"BLOCK_V {kernels.GPU_BLOCK_V}, {'/'.join(map(str, warps))} warps; triton "
        f"{triton.__version__}"
    )
    for problem in found:
        print("PROBLEM:", problem)
    return 1 if args.check and found else 0


if __name__ == "__main__":
    sys.exit(main())
