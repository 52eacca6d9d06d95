"""Triton kernels run on CPU tensors under the interpreter: the variable must be set before any
import of triton, so it is set here, before the test modules import anything.

``backend``: every concrete backend; one that does not work on this machine (``usable_backends``)
is skipped with the reason, not left out silently.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from elbokto_kernels import BACKENDS, usable_backends  # noqa: E402


@pytest.fixture(params=[name for name in BACKENDS if name != "auto"])
def backend(request):
    if request.param not in usable_backends(torch.device("cpu")):
        pytest.skip(f"backend {request.param!r} does not work on this machine (a C++ kernel that "
                    "did not build, no triton)")
    return request.param
