"""The test device (conftest.py's ``--device``), for the tests that run where the kernels run:
inputs are made on the CPU with seeded generators (the same numbers on every device) and moved
with :func:`on_device`.

``MODEL_BACKEND``: the kernel backend of the model-level tests (estimate, objective): the
compiled Triton kernels on CUDA; on CPU the torch path (the interpreter is too slow for models;
the kernel tests run it on every backend)."""

from __future__ import annotations

import os

import torch

DEVICE = torch.device(os.environ.get("ELBOKTO_TEST_DEVICE", "cpu"))
MODEL_BACKEND = "triton" if DEVICE.type == "cuda" else "torch"


def on_device(*items):
    """Each item moved to DEVICE: a tensor, a module (in place), a dict of them (a batch), or
    None, kept. One item alone is returned as is, several as a tuple."""
    moved = tuple(_move(item) for item in items)
    return moved[0] if len(moved) == 1 else moved


def _move(item):
    if item is None:
        return None
    if isinstance(item, dict):
        return {key: _move(value) for key, value in item.items()}
    return item.to(DEVICE)
