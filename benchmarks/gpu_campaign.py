"""`make gpu-check`: everything the GPU campaign needs, in one command for one device call.

    python benchmarks/gpu_campaign.py             # on a CUDA machine; results in $OUT, else
                                                  # benchmarks/results/
    python benchmarks/gpu_campaign.py --dry-run   # the same steps on CPU at toy sizes (Triton's
                                                  # interpreter): part of `make test-compat`

Steps, in this order, each under a time limit taken from one budget (``--budget``, default 540 s,
so that a 600 s call keeps a margin), so that a slow step cannot starve the ones after it:

0. wheels: ``.whl/*.whl`` (``benchmarks/fetch_wheels.py`` downloads them here: Liger, Cut
   Cross-Entropy) installed with ``pip install --no-index --no-deps --target .whl/site``, which
   goes on PYTHONPATH for the steps (the GPU machines have no network);
1. tests: the kernel, row-op, estimate and objective tests with ``--device cuda``, i.e. the
   compiled Triton kernels against the float64 oracle, bf16 included;
2. step: ``bench_step.py --suite llada8b`` at L = 1024 and 2048 (the LLaDA-8B-sized ELBO-KTO step);
3. kernels: ``gpu_check.py`` (correctness at LLaDA shapes, then every variant timed), with the rest
   of the budget.

Each step's output goes to ``<out>/<step>.log`` as it runs, and ``<out>/summary.md`` gets the
card, the versions and each step's status and time. A failed or timed-out step does not stop the
others; the exit status is 1 if any failed.
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = (
    "tests/test_row_ops.py",
    "tests/test_kernels.py",
    "tests/test_call_forms.py",
    "tests/test_linear_elbo_filter.py",
    "tests/test_memory.py",
    "tests/test_lm_head.py",
    "tests/test_estimate.py",
    "tests/test_objective.py",
    "tests/test_loss.py",
    "tests/test_draws.py",
)
# The dry run rehearses the test step on a slice of the kernel tests (the compat lane runs them
# all on CPU anyway).
DRY_TESTS = ("tests/test_kernels.py", "-k", "random or one_row")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, the interpreter")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: $OUT, else benchmarks/results)",
    )
    p.add_argument("--budget", type=float, default=540.0, help="seconds for all steps together")
    p.add_argument(
        "--lengths",
        type=int,
        nargs="*",
        default=[1024, 2048],
        help="tokens per example of the LLaDA-8B-sized step",
    )
    p.add_argument(
        "--gpu-check-args",
        default="",
        help="extra arguments for gpu_check.py, e.g. '--rows 2048 8192'",
    )
    return p.parse_args()


def install_wheels(out: Path, env: dict) -> str:
    """Installs the carried wheels into .whl/site and puts it on the steps' PYTHONPATH."""
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return "no .whl/*.whl carried: Liger and Cut Cross-Entropy rows will be missing"
    site = ROOT / ".whl" / "site"
    log = out / "wheels.log"
    with log.open("w") as f:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--upgrade",
                "--target",
                str(site),
                *wheels,
            ],
            stdout=f,
            stderr=f,
            check=True,
        )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    # The modules benchmarks/comparators.py imports, checked here rather than skipped in silence.
    probe = subprocess.run(
        [sys.executable, "-c", "import liger_kernel.transformers.functional, cut_cross_entropy"],
        capture_output=True,
        text=True,
        env=env,
    )
    state = (
        "importable"
        if probe.returncode == 0
        else f"NOT importable: {(probe.stderr.strip().splitlines() or ['?'])[-1]}"
    )
    return f"installed {', '.join(Path(w).name for w in wheels)}; {state}"


def steps(args) -> list[tuple[str, list[str], float]]:
    """(name, command, the most seconds it may take) of each step, in order."""
    python = sys.executable
    if args.dry_run:
        return [
            (
                "tests",
                [
                    python,
                    "-m",
                    "pytest",
                    "-q",
                    "-p",
                    "no:cacheprovider",
                    "--device",
                    "cpu",
                    *DRY_TESTS,
                ],
                300,
            ),
            (
                "step",
                [
                    python,
                    "benchmarks/bench_step.py",
                    "--suite",
                    "llada8b",
                    "--quick",
                    "--repeats",
                    "1",
                ],
                120,
            ),
            ("kernels", [python, "benchmarks/gpu_check.py", "--dry-run"], 120),
        ]
    step = [
        (
            "step" if len(args.lengths) == 1 else f"step L={length}",
            [
                python,
                "benchmarks/bench_step.py",
                "--suite",
                "llada8b",
                "--device",
                "cuda",
                "--repeats",
                "2",
                "--length",
                str(length),
            ],
            90,
        )
        for length in args.lengths
    ]
    return [
        (
            "tests",
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--device", "cuda", *TESTS],
            150,
        ),
        *step,
        ("kernels", [python, "benchmarks/gpu_check.py", *args.gpu_check_args.split()], args.budget),
    ]


def versions(env: dict) -> str:
    code = (
        "import sys, torch, triton, transformers, numpy\n"
        "card = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'\n"
        "print(f'{card}; Python {sys.version.split()[0]}, torch {torch.__version__}, triton "
        "{triton.__version__}, transformers {transformers.__version__}, numpy "
        "{numpy.__version__}')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT
    )
    return result.stdout.strip() or result.stderr.strip().splitlines()[-1]


def main() -> int:
    args = parse_args()
    out = args.out or Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    lines = [
        f"# GPU campaign{' (dry run)' if args.dry_run else ''}",
        "",
        f"- wheels: {install_wheels(out, env)}",
        f"- machine: {versions(env)}",
    ]
    failed = False
    for name, command, limit in steps(args):
        left = args.budget - (time.perf_counter() - start)
        limit = min(limit, left)
        if limit < 10:
            lines.append(f"- {name}: not run (budget spent)")
            failed = True
            continue
        began = time.perf_counter()
        log = out / f"{name.replace(' ', '_').replace('=', '')}.log"
        print(f"gpu-campaign: {name} (at most {limit:.0f} s) -> {log}", flush=True)
        with log.open("w") as f:
            try:
                code = subprocess.run(
                    command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit
                ).returncode
                status = "passed" if code == 0 else f"failed (exit {code})"
            except subprocess.TimeoutExpired:
                code, status = -1, f"timed out after {limit:.0f} s"
        failed |= code != 0
        lines.append(
            f"- {name}: {status} in {time.perf_counter() - began:.0f} s "
            f"({' '.join(Path(c).name if '/' in c else c for c in command[1:])})"
        )
    summary = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(summary)
    print(summary, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
