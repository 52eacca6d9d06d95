"""Large CPU buffers of the ops, backed by transparent huge pages where Linux offers them.

On CPU a fresh tensor of hundreds of MiB costs more in first-touch page faults than in arithmetic:
faulting in ``fused_elbo``'s dense [C * L, V] gradient (500 MiB at 4096 x 32000 float32) with
4 KiB pages takes longer than the whole ELBO arithmetic, and 2 MiB pages cut that cost to a
fraction (figures in benchmarks/README.md, "CPU: where the time goes"). So the ops' large outputs
and workspaces ask the kernel for huge pages (``madvise(MADV_HUGEPAGE)`` over the 2 MiB-aligned
interior of the buffer), as PyTorch's own CPU allocator does for every tensor under
``THP_MEM_ALLOC_ENABLE=1``. Only these buffers are advised, so the rest of the process keeps the
system's policy.

Plain ``torch.empty`` on other devices, on other systems, below ``MIN_BYTES``, where THP is off,
and when ``ELBOKTO_CPU_HUGE_PAGES=0`` (for machines where huge-page allocation stalls on memory
compaction).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys

import torch
from torch import Tensor

ENV_VAR = "ELBOKTO_CPU_HUGE_PAGES"
MIN_BYTES = 8 << 20  # below this, page faults are a negligible part of any op that fills it
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    """libc's madvise, or None where huge pages are not to be asked for."""
    setting = os.environ.get(ENV_VAR, "1")
    if setting not in ("0", "1"):
        raise ValueError(f"{ENV_VAR} must be 0 or 1, got {setting!r}")
    if setting == "0" or not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def advise_huge_pages(t: Tensor) -> bool:
    """Asks for huge pages behind the not yet touched CPU tensor ``t``; True when advised.

    Advice only: the kernel may still use small pages (THP "never", no free huge page), and a
    failing madvise (EINVAL where THP is compiled out) changes nothing, so it is not an error.
    """
    madvise = _madvise()
    if madvise is None or t.device.type != "cpu" or t.untyped_storage().nbytes() < MIN_BYTES:
        return False
    address = t.untyped_storage().data_ptr()
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + t.untyped_storage().nbytes()) // _HUGE_PAGE * _HUGE_PAGE
    return end > start and madvise(start, end - start, _MADV_HUGEPAGE) == 0


def empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape)``; on CPU, huge-page backed when large (see the module docstring)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t
