"""The "cpu" backend: the row primitives of ``RowOps`` in C++ (``csrc/elbo_cpu.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` and cached under
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). It is built for the SIMD level
ATen itself dispatches to on this machine (AVX512, AVX2, or portable code), and that level is part
of the extension's name, so a cache shared by machines with different CPUs never hands one of them
a binary it cannot run; so is a hash of the source, so that checkouts of different versions
sharing a cache never load each other's build. If it does not build, ``available()`` says so (and warns once) and "auto"
falls back to the torch backend.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

_SOURCE = "elbo_cpu.cpp"

# Compiler flags that select at::vec's AVX512 / AVX2 Vectorized<float> (as ATen's own kernels do).
_SIMD_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}


def _source() -> Path:
    # An installed wheel carries the source as package data (elbokto_kernels/csrc); a checkout
    # keeps it in the top-level csrc/.
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc" / _SOURCE, package.parent / "csrc" / _SOURCE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_SOURCE} is neither in {package / 'csrc'} nor in "
                            f"{package.parent / 'csrc'}")


@functools.cache
def _build() -> tuple[ModuleType | None, str]:
    """(extension, "") once built or loaded from the cache, or (None, why it failed)."""
    from torch.utils import cpp_extension

    simd = torch.backends.cpu.get_cpu_capability()
    flags = _SIMD_FLAGS.get(simd, [])
    source = _source()
    version = hashlib.sha256(source.read_bytes()).hexdigest()[:12]
    try:
        module = cpp_extension.load(
            name=f"elbokto_cpu_{simd.lower() if flags else 'default'}_{version}",
            sources=[str(source)],
            # at::parallel_for is header code over OpenMP: without -fopenmp it runs serially.
            extra_cflags=["-O3", "-fopenmp", *flags],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as err:  # no compiler, no ninja, missing headers: any failure means no kernel
        reason = f"{type(err).__name__}: {err}".strip()
        warnings.warn(f"elbokto: the C++ CPU kernel did not build ({reason.splitlines()[0]}); "
                      "backend 'auto' falls back to the torch path on CPU", RuntimeWarning,
                      stacklevel=3)
        return None, reason
    return module, ""


def available() -> bool:
    """Whether the C++ kernel builds (or is cached) here. Tried once per process; a failure warns
    once."""
    return _build()[0] is not None


def _kernel() -> ModuleType:
    module, reason = _build()
    if module is None:
        raise RuntimeError(f"backend 'cpu' is unavailable: the C++ kernel did not build: {reason}")
    return module


def row_lse(x: Tensor, rows: Tensor | None, targets: Tensor, softcap: float | None,
            row_max: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(lse, target_logit), float32 [M] each, of rows of x [N, V], and their largest logits into
    ``row_max`` when given; see ``RowOps.row_lse``."""
    return _kernel().row_lse(x, rows, targets.contiguous(),
                             None if softcap is None else float(softcap), row_max)


def row_grad(x: Tensor, rows: Tensor | None, targets: Tensor, lse: Tensor, scale: Tensor,
             softcap: float | None, out: Tensor) -> None:
    """Writes the logit gradient of rows of x into out [N, V]; see ``RowOps.row_grad``."""
    _kernel().row_grad(x, rows, targets.contiguous(), lse.contiguous(), scale.contiguous(),
                       None if softcap is None else float(softcap), out)
