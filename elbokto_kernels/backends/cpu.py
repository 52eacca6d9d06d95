"""The "cpu" backend: the row primitives of ``RowOps`` in C++ (``csrc/elbo_cpu.cpp``).

The extension is compiled on first use with ``torch.utils.cpp_extension.load`` for the SIMD level
ATen itself dispatches to on this machine (AVX512, AVX2, or portable code). The build is cached in
``$TORCH_EXTENSIONS_DIR/elbokto_cpu_<simd>_<key>/`` (default root ``~/.cache/torch_extensions``),
where ``key`` digests everything the binary depends on (source, flags, torch and Python versions,
machine, compiler): a cache shared by checkouts, versions or CPUs keeps one build per key instead
of rebuilding over each other. A build stamps its library with its sha256; a cached library that
no longer matches its stamp (truncated, overwritten: dlopen would die of SIGBUS on it) is rebuilt,
with a warning. If it does not build, ``available()`` says so (and warns once) and "auto" falls
back to the torch backend.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

_SOURCE = "elbo_cpu.cpp"

# Compiler flags that select at::vec's AVX512 / AVX2 Vectorized<float> (as ATen's own kernels do).
_SIMD_FLAGS = {
    "AVX512": [
        "-mavx512f",
        "-mavx512bw",
        "-mavx512vl",
        "-mavx512dq",
        "-mfma",
        "-DCPU_CAPABILITY=AVX512",
        "-DCPU_CAPABILITY_AVX512",
    ],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
}
# at::parallel_for is header code over OpenMP: without -fopenmp it runs serially.
_CFLAGS = ["-O3", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]


def _source() -> Path:
    # An installed wheel carries the source as package data (elbokto_kernels/csrc); a checkout
    # keeps it in the top-level csrc/.
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc" / _SOURCE, package.parent / "csrc" / _SOURCE):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{_SOURCE} is neither in {package / 'csrc'} nor in {package.parent / 'csrc'}"
    )


def build_key(source: bytes, cflags: list[str], ldflags: list[str]) -> str:
    """12 hex digits of sha256 over what the binary depends on: the C++ source, the compiler and
    linker flags, the torch and Python versions (headers and ABI), the machine and the compiler."""
    digest = hashlib.sha256(source)
    for part in (
        cflags,
        ldflags,
        torch.__version__,
        sys.version,
        platform.machine(),
        os.environ.get("CXX", "c++"),
    ):
        digest.update(repr(part).encode())
    return digest.hexdigest()[:12]


def extension_name(simd: str, key: str) -> str:
    """``elbokto_cpu_<simd>_<key>``: the module's name and its cache folder's."""
    return f"elbokto_cpu_{simd.lower() if simd in _SIMD_FLAGS else 'default'}_{key}"


def cache_root() -> Path:
    """Where builds are cached: ``$TORCH_EXTENSIONS_DIR``, else torch's default
    (``~/.cache/torch_extensions``)."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stamp(library: Path) -> Path:
    return library.with_suffix(".sha256")


def write_stamp(library: Path) -> None:
    """Records the sha256 of a library that built and imported (atomically: a reader sees the
    whole stamp or none)."""
    partial = _stamp(library).with_suffix(".partial")
    partial.write_text(_file_sha256(library))
    partial.replace(_stamp(library))


def library_problem(library: Path) -> str | None:
    """Why a cached library must not be loaded, or None when it is the file its build stamped.
    Reading it costs a few milliseconds; dlopen-ing a truncated one kills the process (SIGBUS)."""
    if not library.is_file():
        return "no library"
    if not _stamp(library).is_file():
        return "no stamp of a finished build"
    if _stamp(library).read_bytes().strip() != _file_sha256(library).encode():
        return "its content differs from the one its build stamped"
    return None


@contextlib.contextmanager
def _exclusive(lock: Path):
    """Holds an exclusive lock on ``lock`` (created if needed). The OS drops it when the process
    dies, so no lock outlives a killed build (unlike torch's own lock file, which would make the
    next process wait forever)."""
    import fcntl

    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info(
                "elbokto: waiting for another process that is building the C++ CPU kernel (%s)",
                lock,
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _import(name: str, library: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, library)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{library} cannot be loaded as a Python extension module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compile(name: str, directory: Path, cflags: list[str], ldflags: list[str]) -> ModuleType:
    """Builds the extension into an empty ``directory``, imports it and stamps it. That the
    one-time build runs, and how long it took, is logged at WARNING: shown on stderr by default
    (a minute or more of silence would look like a hang)."""
    from torch.utils import cpp_extension

    logger.warning(
        "elbokto: building the C++ CPU kernel %s (once per machine and version; a "
        "minute or more; `python -m elbokto_kernels.build` does it ahead) in %s",
        name,
        directory,
    )
    start = time.perf_counter()
    directory.mkdir(parents=True)
    module = cpp_extension.load(
        name=name,
        sources=[str(_source())],
        build_directory=str(directory),
        extra_cflags=cflags,
        extra_ldflags=ldflags,
        verbose=False,
    )
    write_stamp(Path(module.__file__))
    logger.warning("elbokto: built the C++ CPU kernel in %.0f s", time.perf_counter() - start)
    return module


def _load_or_build() -> ModuleType:
    """The extension from the cache when its library matches its stamp; else a fresh build, after
    removing whatever a damaged or interrupted build left."""
    simd = torch.backends.cpu.get_cpu_capability()
    cflags, ldflags = [*_CFLAGS, *_SIMD_FLAGS.get(simd, [])], _LDFLAGS
    name = extension_name(simd, build_key(_source().read_bytes(), cflags, ldflags))
    directory = cache_root() / name
    library = directory / f"{name}.so"
    with _exclusive(cache_root() / f"{name}.lock"):
        problem = library_problem(library)
        if problem is None:
            return _import(name, library)
        if library.exists():
            logger.warning(
                "elbokto: the cached C++ CPU kernel %s is unusable (%s); rebuilding it",
                library,
                problem,
            )
        # Removing (not overwriting) keeps a library mapped by a running process intact.
        shutil.rmtree(directory, ignore_errors=True)
        return _compile(name, directory, cflags, ldflags)


@functools.cache
def _build() -> tuple[ModuleType | None, str]:
    """(extension, "") once built or loaded from the cache, or (None, why it failed)."""
    try:
        module = _load_or_build()
    except Exception as err:  # no compiler, no ninja, missing headers: any failure means no kernel
        reason = f"{type(err).__name__}: {err}".strip()
        warnings.warn(
            f"elbokto: the C++ CPU kernel did not build ({reason.splitlines()[0]}); "
            "backend 'auto' falls back to the torch path on CPU",
            RuntimeWarning,
            stacklevel=3,
        )
        return None, reason
    return module, ""


def available() -> bool:
    """Whether the C++ kernel builds (or is cached) here. Tried once per process; a failure warns
    once."""
    return _build()[0] is not None


def library() -> Path:
    """The C++ kernel's shared library, built first if needed; RuntimeError with the reason when
    it does not build."""
    path = _kernel().__file__
    assert path is not None, "an extension module is loaded from a file"
    return Path(path)


def _kernel() -> ModuleType:
    module, reason = _build()
    if module is None:
        raise RuntimeError(f"backend 'cpu' is unavailable: the C++ kernel did not build: {reason}")
    return module


def row_lse(
    x: Tensor,
    rows: Tensor | None,
    targets: Tensor,
    softcap: float | None,
    row_max: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(lse, target_logit), float32 [M] each, of rows of x [N, V], and their largest logits into
    ``row_max`` when given; see ``RowOps.row_lse``."""
    return _kernel().row_lse(
        x, rows, targets.contiguous(), None if softcap is None else float(softcap), row_max
    )


def row_grad(
    x: Tensor,
    rows: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    scale: Tensor,
    softcap: float | None,
    out: Tensor,
) -> None:
    """Writes the logit gradient of rows of x into out [N, V]; see ``RowOps.row_grad``."""
    _kernel().row_grad(
        x,
        rows,
        targets.contiguous(),
        lse.contiguous(),
        scale.contiguous(),
        None if softcap is None else float(softcap),
        out,
    )
