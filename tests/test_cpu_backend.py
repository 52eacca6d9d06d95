"""What is specific to the "cpu" backend's C++ build: argument checks of the extension, the SIMD
level and build key in its name, the build cache (one build per key, a damaged library rebuilt,
not loaded), "auto" picking it, and the fallback when it does not build. Its row primitives and
the ops on it are tested with every backend (test_row_ops.py, test_kernels.py).

The first test that needs the kernel builds it, once per machine and version (cached); the cache
tests fake the compiler, so they add no build of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from elbokto_kernels.backends import cpu, resolve_backend, usable_backends


@pytest.fixture(scope="module")
def kernel():
    if not cpu.available():
        pytest.skip("the C++ CPU kernel did not build here (see the RuntimeWarning)")
    return cpu._build()[0]


def test_bad_arguments(kernel):
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="rows"):
        cpu.row_lse(x, torch.tensor([0, 4]), torch.tensor([1, 2]), None)
    with pytest.raises(RuntimeError, match="targets"):
        cpu.row_lse(x, None, torch.tensor([1, 2]), None)
    with pytest.raises(RuntimeError, match="out"):
        cpu.row_grad(
            x,
            None,
            torch.zeros(4, dtype=torch.long),
            torch.zeros(4),
            torch.ones(4),
            None,
            torch.empty(10, 4).t(),
        )


def test_simd_level_and_build_key_in_the_extension_name(kernel):
    """A cache shared by machines with different CPUs keeps one binary per SIMD level."""
    simd = torch.backends.cpu.get_cpu_capability()
    expected = simd.lower() if simd in ("AVX512", "AVX2") else "default"
    assert re.fullmatch(rf"elbokto_cpu_{expected}_[0-9a-f]{{12}}", kernel.__name__)


def test_build_key_follows_source_and_flags():
    key = cpu.build_key(b"int f();", ["-O3"], ["-fopenmp"])
    assert key == cpu.build_key(b"int f();", ["-O3"], ["-fopenmp"])
    others = {
        cpu.build_key(b"int g();", ["-O3"], ["-fopenmp"]),
        cpu.build_key(b"int f();", ["-O2"], ["-fopenmp"]),
        cpu.build_key(b"int f();", ["-O3"], []),
    }
    assert key not in others and len(others) == 3


def test_two_sources_do_not_share_a_build(tmp_path, monkeypatch):
    """Two checkouts (or versions) with different C++ sources build into different folders."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    built = []
    monkeypatch.setattr(cpu, "_compile", lambda name, directory, *_: built.append(directory))
    edited = tmp_path / "elbo_cpu.cpp"
    edited.write_bytes(cpu._source().read_bytes() + b"\n// another version\n")
    cpu._load_or_build()
    monkeypatch.setattr(cpu, "_source", lambda: edited)
    cpu._load_or_build()
    assert len(built) == 2 and built[0] != built[1]
    assert all(d.parent == tmp_path / "ext" for d in built)


def test_a_library_is_usable_only_as_its_build_stamped_it(tmp_path):
    library = tmp_path / "elbokto_cpu_x.so"
    library.write_bytes(b"\x7fELF" + bytes(range(256)) * 64)
    assert "no stamp" in cpu.library_problem(library)  # a build that did not finish
    cpu.write_stamp(library)
    assert cpu.library_problem(library) is None
    whole = library.read_bytes()
    library.write_bytes(whole[:1000])  # truncated
    assert "differs" in cpu.library_problem(library)
    library.write_bytes(whole[::-1])  # same size, other bytes
    assert "differs" in cpu.library_problem(library)
    assert cpu.library_problem(tmp_path / "absent.so") == "no library"


# Builds the kernel in the cache named by TORCH_EXTENSIONS_DIR with a stand-in compiler (a copy
# of the library argv[1]), then prints whether the backend is available.
_FAKE_BUILD = """
import logging, shutil, sys
from pathlib import Path
from types import SimpleNamespace
from torch.utils import cpp_extension
from elbokto_kernels.backends import cpu

def compile_in_a_second(name, build_directory, **_):
    library = Path(build_directory) / f"{name}.so"
    shutil.copyfile(sys.argv[1], library)
    return cpu._import(name, library)

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
cpp_extension.load = compile_in_a_second
print(cpu.available())
"""


def test_a_damaged_cached_library_is_rebuilt_not_loaded(kernel, tmp_path):
    """A truncated library in the cache (a full disk, a killed copy) is rebuilt: dlopen-ing it
    would kill the process with SIGBUS. Run in a subprocess, so that a crash fails the test
    instead of ending pytest."""
    good = Path(kernel.__file__)
    library = tmp_path / kernel.__name__ / good.name
    library.parent.mkdir()
    library.write_bytes(good.read_bytes())
    cpu.write_stamp(library)
    library.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", _FAKE_BUILD, str(good)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True"]
    assert re.search(r"WARNING .*unusable \(its content differs.*rebuilding", result.stderr)
    assert re.search(r"WARNING .*building the C\+\+ CPU kernel .*once", result.stderr)
    assert re.search(r"WARNING .*built the C\+\+ CPU kernel in \d+ s", result.stderr)
    assert cpu.library_problem(library) is None and library.read_bytes() == good.read_bytes()


def test_auto_resolves_to_cpu(kernel):
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_build_failure_falls_back_to_torch(kernel, monkeypatch):
    def no_ninja():
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpu, "_load_or_build", no_ninja)
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
        monkeypatch.setattr(cpu, "_load_or_build", lambda: kernel)
        assert cpu.available()


def test_the_build_says_what_it_does_and_how_long_it_took(tmp_path, monkeypatch, caplog):
    """At WARNING, which Python shows on stderr without any logging set up: a minute of silence
    on a first call would look like a hang."""
    from torch.utils import cpp_extension

    library = tmp_path / "built.so"
    library.write_bytes(b"\x7fELF")
    monkeypatch.setattr(cpp_extension, "load", lambda **_: SimpleNamespace(__file__=str(library)))
    with caplog.at_level("WARNING", logger=cpu.__name__):
        cpu._compile("elbokto_cpu_test", tmp_path / "build", [], [])
    messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(messages) == 2
    assert messages[0].startswith("elbokto: building the C++ CPU kernel elbokto_cpu_test")
    assert "python -m elbokto_kernels.build" in messages[0]
    assert re.fullmatch(r"elbokto: built the C\+\+ CPU kernel in \d+ s", messages[1])


def test_build_ahead(kernel):
    result = subprocess.run(
        [sys.executable, "-m", "elbokto_kernels.build"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("elbokto: the C++ CPU kernel is ready: ")
    assert Path(result.stdout.split(": ", 2)[2].strip()).is_file()


def test_the_backend_names_are_the_registrys():
    """``Backend`` (the Literal users type) and the registry name the same backends."""
    from elbokto_kernels import backends

    assert backends.BACKENDS == ("auto", *backends._REGISTRY)
