"""Backend choice, in one place.

A backend is a module with the two row primitives ``row_lse`` and ``row_grad`` (contract in
``reference``). "auto" resolves to "triton" for CUDA tensors and, on CPU, to the C++ kernel when
it builds, else to the torch reference path.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("auto", "triton", "torch", "cpu")

_MODULES = {"triton": "elbokto_kernels.row_kernels", "torch": "elbokto_kernels.reference",
            "cpu": "elbokto_kernels.cpu"}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Turns a user's ``backend=`` into a concrete backend name for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpu" if device.type == "cpu" and _cpu_kernel_available() else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend 'triton' needs CUDA tensors (got {device}), or CPU tensors "
                         "with TRITON_INTERPRET=1 set before triton is imported")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"backend 'cpu' needs CPU tensors, got {device}")
    return backend


def row_ops(backend: str) -> ModuleType:
    """The module implementing ``row_lse`` / ``row_grad`` for a concrete backend name."""
    return importlib.import_module(_MODULES[backend])


def _cpu_kernel_available() -> bool:
    try:
        return importlib.import_module(_MODULES["cpu"]).available()
    except ImportError:
        return False
