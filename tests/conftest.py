"""Triton kernels run on CPU tensors under the interpreter: the variable must be set before any
import of triton, so it is set here, before the test modules import elbokto_kernels."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
