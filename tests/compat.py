"""`make test-compat`: the compat lane, on every stack of the supported matrix but the default one.

    python tests/compat.py                 # every stack: build (or reuse) its venv, run its lane
    python tests/compat.py --stack oldest  # one of them
    python tests/compat.py --list          # the stacks and their pins

`make test` covers the default stack (the newest the registry serves, torch 2.13 on CPU). Each
stack here is a set of exact pins in a venv of its own, cached under ``$ELBOKTO_COMPAT_CACHE``
(default ``~/.cache/elbokto/compat``) and keyed by the pins, so a changed pin builds a new one. The
lane on each: the kernel, row-op, estimate and objective tests, ``make gpu-check``'s rehearsal
(``benchmarks/gpu_campaign.py --dry-run``: gpu_check.py --dry-run and the LLaDA-8B-sized step at
toy size), ``benchmarks/kernel_report.py --check``, ``benchmarks/bench_step.py --quick``, and
the tests of what else the stack supports (the published models' loading; the trainer and a tiny
``elbokto train`` where the stack carries it).

How a stack gets the project (``Stack.install``):

* "clone": a plain clone on PYTHONPATH, as the GPU machines run it;
* "resolve": pip installs both distributions (``elbokto_kernels/`` and the root) under the pins as
  constraints, so that the declared bounds must admit them (pip refuses otherwise) and the
  dependencies are what they resolve to; then the two are uninstalled and the clone is used on
  PYTHONPATH;
* "kernels": only ``elbokto-kernels`` is installed, into a venv of torch and triton alone, and
  the kernel tests run against the installed package (no transformers anywhere).

Standard library only: runs under any python3.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("ELBOKTO_COMPAT_CACHE", "~/.cache/elbokto/compat")).expanduser()

KERNEL_TESTS = (
    "tests/test_row_ops.py",
    "tests/test_kernels.py",
    "tests/test_call_forms.py",
    "tests/test_cpu_backend.py",
    "tests/test_linear_elbo_filter.py",
    "tests/test_memory.py",
    "tests/test_lm_head.py",
    "tests/test_triton_compile.py",
    "tests/test_gpu_check.py",
)
ALGORITHM_TESTS = (
    "tests/test_estimate.py",
    "tests/test_objective.py",
    "tests/test_loss.py",
    "tests/test_draws.py",
    "tests/test_imports.py",
)


@dataclass(frozen=True)
class Stack:
    """One row of the supported matrix: a Python version and exact pins."""

    name: str
    python: str
    pins: tuple[str, ...]
    why: str
    install: str  # "clone", "resolve" or "kernels" (the module docstring)
    tests: tuple[str, ...]  # "kernels": the tests; else run besides the kernel and algorithm tests

    def key(self) -> str:
        """Changes with the pins and, where pip installs the project, with its pyproject files
        (new bounds must be checked against the pins again; an installed package rebuilt)."""
        text = "\n".join((self.python, self.install, *self.pins))
        if self.install != "clone":
            text += (ROOT / "pyproject.toml").read_text()
            text += (ROOT / "elbokto_kernels" / "pyproject.toml").read_text()
        digest = hashlib.sha256(text.encode())
        if self.install == "kernels":  # the tests import the installed copy of the code
            for path in sorted([*ROOT.glob("elbokto_kernels/**/*.py"), *ROOT.glob("csrc/*")]):
                digest.update(path.read_bytes())
        return digest.hexdigest()[:12]


TEST_PINS = ("pytest>=8", "pytest-benchmark>=4")

STACKS = (
    Stack(
        "gpu-machines",
        "3.12",
        (
            "torch==2.11.0",
            "triton==3.6.0",
            "transformers==5.17.0",
            "numpy==2.4.*",
            "accelerate==1.15.0",
            "peft",
            "einops",
            "tqdm",
            "ninja",
            "matplotlib",
            *TEST_PINS,
        ),
        "the lent GPU machines' image (numpy 2.5 there; 2.4 is the registry's newest): no "
        "datasets, lm-eval or openai, no network, the project run from a plain clone",
        install="clone",
        tests=("tests/test_models.py",),
    ),
    Stack(
        "oldest",
        "3.10",
        (
            "torch==2.7.1",
            "triton==3.3.1",
            "transformers==4.54.1",
            "numpy==1.26.4",
            "accelerate==1.11.0",
            "peft==0.17.0",
            "datasets==4.0.0",
            "tokenizers==0.21.4",
            *TEST_PINS,
        ),
        "the dLLM codebases' pins: the authors' ELBO-KTO code (torch 2.7.1, transformers "
        "4.54.1) and dllm (accelerate 1.11, peft 0.17); the declared lower bounds. The "
        "trainer and the native bidirectional models need transformers 5: here their refusal "
        "is tested, and the published LLaDA / Dream / LLaDA-MoE code loading natively",
        install="resolve",
        tests=(
            "tests/test_models.py::test_published_code_loads_through_load_model",
            "tests/test_models.py::test_native_bidirectional_models_need_transformers5",
        ),
    ),
    Stack(
        "kernels-only",
        "3.10",
        ("torch==2.7.1", "triton==3.3.1", "numpy==1.26.4", *TEST_PINS),
        "what a dLLM codebase gets from `pip install elbokto-kernels` next to the oldest torch: "
        "torch and triton alone (numpy for Triton's interpreter), no transformers",
        install="kernels",
        tests=KERNEL_TESTS,
    ),
    Stack(
        "dllm",
        "3.11",
        (
            "torch==2.7.1",
            "triton==3.3.1",
            "transformers==4.57.1",
            "accelerate==1.11.0",
            "peft==0.17.0",
            "numpy==1.26.4",
            *TEST_PINS,
        ),
        "a dLLM codebase's stack (dllm's pins: transformers 4.57, whose 4.57.0 is yanked; "
        "accelerate 1.11, peft 0.17) with elbokto-kernels installed beside it: the drop-in "
        "examples and fused_lm_head",
        install="kernels",
        tests=("tests/test_examples.py", "tests/test_lm_head.py"),
    ),
)


def find_python(version: str) -> str:
    """An interpreter of ``version`` (``python3.12`` on PATH, else a pyenv install)."""
    candidates = [shutil.which(f"python{version}")]
    candidates += sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python")))
    for candidate in filter(None, candidates):
        probe = subprocess.run(
            [candidate, "-c", "import sys; print(sys.version_info[:2])"],
            capture_output=True,
            text=True,
        )
        if probe.returncode == 0 and probe.stdout.strip() == str(
            tuple(map(int, version.split(".")))
        ):
            return candidate
    raise SystemExit(
        f"compat: no Python {version} here (install python{version}, e.g. with "
        "pyenv or your distribution's package)"
    )


def build(stack: Stack) -> Path:
    """The stack's venv, built on first use: the pins, then the project's dependencies
    resolved under them (where the stack installs the project)."""
    venv = CACHE / f"{stack.name}-{stack.key()}"
    python = venv / "bin" / "python"
    if (venv / "ready").exists():
        return python
    for stale in CACHE.glob(f"{stack.name}-*"):  # this stack's venvs of other pins (GBs each)
        shutil.rmtree(stale, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"compat: building {venv} ...", flush=True)
    run([find_python(stack.python), "-m", "venv", str(venv)])
    pip = [str(python), "-m", "pip", "install", "-q"]
    run([*pip, *stack.pins])
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("\n".join(stack.pins))
        constraints.flush()
        if stack.install == "resolve":
            run([*pip, "-c", constraints.name, str(ROOT / "elbokto_kernels"), f"{ROOT}[test]"])
            run([str(python), "-m", "pip", "uninstall", "-q", "-y", "elbokto", "elbokto-kernels"])
        elif stack.install == "kernels":
            run([*pip, "-c", constraints.name, str(ROOT / "elbokto_kernels")])
    (venv / "ready").write_text("\n".join(stack.pins) + "\n")
    return python


def lane(stack: Stack, python: Path) -> list[tuple[str, list[str]]]:
    """(name, command) of each step of the stack's lane."""
    if stack.install == "kernels":
        # pytest's own script, not `python -m pytest`, which would put the clone (cwd) first on
        # sys.path: the installed package is the one under test.
        # -I: the clone is not on sys.path. Without transformers among the pins, pip must not
        # have brought it either.
        alone = not any(pin.startswith("transformers") for pin in stack.pins)
        where = (
            "import elbokto_kernels, importlib.util as u; "
            "assert 'site-packages' in elbokto_kernels.__file__, elbokto_kernels.__file__; "
            f"assert {alone} <= (u.find_spec('transformers') is None); "
            "print(elbokto_kernels.__file__)"
        )
        steps = [
            ("installed", [str(python), "-I", "-c", where]),
            (
                "tests",
                [str(python.parent / "pytest"), "-q", "-p", "no:cacheprovider", *stack.tests],
            ),
        ]
        if stack.tests == KERNEL_TESTS:
            steps.append(
                ("kernel_report --check", [str(python), "benchmarks/kernel_report.py", "--check"])
            )
        return steps
    tests = [*KERNEL_TESTS, *ALGORITHM_TESTS, *stack.tests]
    return [
        ("tests", [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]),
        (
            "gpu_campaign --dry-run",
            [
                str(python),
                "benchmarks/gpu_campaign.py",
                "--dry-run",
                "--out",
                tempfile.mkdtemp(prefix="gpu-campaign-"),
            ],
        ),
        ("kernel_report --check", [str(python), "benchmarks/kernel_report.py", "--check"]),
        (
            "bench_step --quick",
            [str(python), "benchmarks/bench_step.py", "--quick", "--repeats", "1"],
        ),
    ]


def run(command: list[str], env: dict | None = None) -> None:
    result = subprocess.run(command, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"compat: failed ({result.returncode}): {' '.join(command)}")


def versions(python: Path, env: dict) -> str:
    code = (
        "import sys, importlib.metadata as m\n"
        "names = ('torch', 'triton', 'transformers', 'numpy', 'accelerate', 'peft', "
        "'datasets')\n"
        "found = []\n"
        "for n in names:\n"
        "    try: found.append(f'{n} {m.version(n)}')\n"
        "    except m.PackageNotFoundError: found.append(f'{n} -')\n"
        "print(f'Python {sys.version.split()[0]}, ' + ', '.join(found))"
    )
    return subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, env=env, check=True
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stack", choices=[s.name for s in STACKS], action="append")
    parser.add_argument("--list", action="store_true", help="print the stacks and exit")
    args = parser.parse_args()
    stacks = [s for s in STACKS if args.stack is None or s.name in args.stack]
    if args.list:
        for stack in stacks:
            print(f"{stack.name}: Python {stack.python}, {' '.join(stack.pins)}\n  {stack.why}")
        return 0
    summary = []
    for stack in stacks:
        python = build(stack)
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
        if stack.install != "kernels":
            env["PYTHONPATH"] = str(ROOT)
        print(f"compat [{stack.name}]: {versions(python, env)}", flush=True)
        for name, command in lane(stack, python):
            start = time.perf_counter()
            print(f"compat [{stack.name}]: {name}", flush=True)
            run(command, env)
            summary.append(f"{stack.name}: {name} passed in {time.perf_counter() - start:.0f} s")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
