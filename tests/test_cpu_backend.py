"""What is specific to the "cpu" backend's C++ build: argument checks of the extension, the SIMD
level in its name, "auto" picking it, and the fallback when it does not build. Its row primitives
and the ops on it are tested with every backend (test_row_ops.py, test_kernels.py).

The first test to run builds the extension, once per machine (cached).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from elbokto_kernels.backends import cpu, resolve_backend, usable_backends


@pytest.fixture(scope="module", autouse=True)
def kernel():
    if not cpu.available():
        pytest.skip("the C++ CPU kernel did not build here (see the RuntimeWarning)")


def test_bad_arguments():
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="rows"):
        cpu.row_lse(x, torch.tensor([0, 4]), torch.tensor([1, 2]), None)
    with pytest.raises(RuntimeError, match="targets"):
        cpu.row_lse(x, None, torch.tensor([1, 2]), None)
    with pytest.raises(RuntimeError, match="out"):
        cpu.row_grad(x, None, torch.zeros(4, dtype=torch.long), torch.zeros(4), torch.ones(4),
                     None, torch.empty(10, 4).t())


def test_simd_level_in_the_extension_name():
    """A cache shared by machines with different CPUs keeps one binary per SIMD level, and one
    per version of the source."""
    import hashlib

    simd = torch.backends.cpu.get_cpu_capability()
    expected = simd.lower() if simd in ("AVX512", "AVX2") else "default"
    version = hashlib.sha256(cpu._source().read_bytes()).hexdigest()[:12]
    assert cpu._build()[0].__name__ == f"elbokto_cpu_{expected}_{version}"


def test_auto_resolves_to_cpu():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_build_failure_falls_back_to_torch(monkeypatch):
    from torch.utils import cpp_extension

    built = cpu._build()
    monkeypatch.setattr(cpp_extension, "load", lambda **_: (_ for _ in ()).throw(
        RuntimeError("Ninja is required to load C++ extensions")))
    cpu._build.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falls back to the torch path"):
            assert not cpu.available()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the warning comes once per process
            assert not cpu.available()
            assert resolve_backend("auto", torch.device("cpu")) == "torch"
            assert "cpu" not in usable_backends("cpu")
        with pytest.raises(RuntimeError, match="Ninja"):
            cpu.row_lse(torch.zeros(1, 2), None, torch.zeros(1, dtype=torch.long), None)
    finally:
        # Put the built extension back without loading the shared library a second time.
        cpu._build.cache_clear()
        monkeypatch.setattr(cpp_extension, "load", lambda **_: built[0])
        assert cpu.available()
