"""The device the kernel tests run on, and the backends they run.

``--device cuda|cpu`` (or ``ELBOKTO_TEST_DEVICE``; default: cuda when there is one, else cpu)
chooses where the kernel, row-op, estimate and objective tests put their tensors (the ``device``
fixture, ``devices.DEVICE``). On cuda the "triton" backend runs the compiled kernels; on cpu it
runs in Triton's interpreter, for which TRITON_INTERPRET=1 must be set before anything imports
triton: it is set here, before the test modules are imported.

``backend``: every concrete backend; one that does not work on the test device here
(``usable_backends``) is skipped with the reason, not left out silently.
"""

import os

import pytest
import torch

from elbokto_kernels import BACKENDS, usable_backends


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        choices=("cpu", "cuda"),
        default=os.environ.get("ELBOKTO_TEST_DEVICE") or None,
        help="where the kernel tests run (default: cuda when available, else cpu; "
        "or ELBOKTO_TEST_DEVICE)",
    )


def pytest_configure(config):
    device = config.getoption("--device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--device cuda: torch sees no CUDA device here")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Read by tests/devices.py, in this process and in the subprocesses tests start.
    os.environ["ELBOKTO_TEST_DEVICE"] = device


def pytest_report_header(config):
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (
        f"elbokto test device: {os.environ['ELBOKTO_TEST_DEVICE']} (triton "
        f"{'interpreted' if interpreted else 'compiled'})"
    )


@pytest.fixture
def device():
    from devices import DEVICE

    return DEVICE


@pytest.fixture(params=[name for name in BACKENDS if name != "auto"])
def backend(request):
    from devices import DEVICE

    if request.param not in usable_backends(DEVICE):
        pytest.skip(
            f"backend {request.param!r} does not work on {DEVICE} here (a C++ kernel "
            "that did not build, no triton, CPU-only)"
        )
    return request.param
