"""What importing costs: ``import elbokto`` loads nothing heavy until a name is used, and the
optional packages (datasets, lm-eval, openai, matplotlib) are needed only by the functions that
use them, which then say in one line what to install."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = ("datasets", "lm_eval", "openai", "matplotlib")


def run_without(code: str, missing=OPTIONAL) -> str:
    """Runs ``code`` in a fresh interpreter where ``missing`` cannot be imported (as if not
    installed: ``importlib.util.find_spec`` gives None too); returns its stdout."""
    prelude = "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in missing)
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_elbokto_loads_nothing_heavy():
    out = run_without(
        """
        import elbokto, elbokto_kernels
        print(sorted(m for m in ("torch", "transformers", "triton", "accelerate", "peft")
                     if m in sys.modules))
    """,
        missing=(),
    )
    assert out.split("\n")[0] == "['torch']"  # elbokto_kernels' one dependency


@pytest.mark.slow
def test_the_library_works_without_the_optional_packages():
    out = run_without("""
        import elbokto, elbokto.models
        from elbokto import ELBOKTOObjective, elbo_estimate, sample_draws
        if elbokto.models.TRANSFORMERS_5:  # the trainer's floor
            from elbokto import ELBOKTOTrainer
        import elbokto.eval
        import elbokto.eval.cli
        from elbokto.eval import win_rate
        print("imported")
        import elbokto.data
        for call in (lambda: elbokto.data.load_source("rows.jsonl"),
                     lambda: elbokto.eval.DiffusionLM,
                     lambda: elbokto.eval.cli.lm_eval(["--help"])):
            try:
                call()
            except ModuleNotFoundError as error:
                print(error)
    """)
    lines = out.strip().split("\n")
    assert lines[0] == "imported"
    assert lines[1] == "elbokto's data loading needs the 'datasets' package: pip install datasets"
    assert lines[2] == "elbokto's lm-eval model needs the 'lm-eval' package: pip install lm-eval"
    assert lines[3] == "elbokto eval lm-eval needs the 'lm-eval' package: pip install lm-eval"


@pytest.mark.parametrize(
    "module, purpose",
    [("openai", "the pairwise judge"), ("matplotlib.pyplot", "the win-rate chart")],
)
def test_require_names_the_package(module, purpose):
    out = run_without(f"""
        from elbokto.requires import require
        try:
            require({module!r}, {purpose!r})
        except ModuleNotFoundError as error:
            print(error)
    """)
    package = module.partition(".")[0]
    assert out.strip() == f"{purpose} needs the {package!r} package: pip install {package}"


def test_an_error_inside_an_installed_package_is_not_renamed():
    """Only a missing top-level package becomes the install hint; any other import error of an
    installed package propagates as it is."""
    from elbokto.requires import require

    with pytest.raises(ModuleNotFoundError, match="No module named 'json.nope'"):
        require("json.nope", "a test")


@pytest.mark.slow
def test_public_names_are_what_they_say_after_any_import():
    """A public name that were also a submodule's would turn into that module once anything
    imported the submodule (``from elbokto import generate`` would give a module)."""
    out = run_without(
        """
        import importlib, pkgutil, types
        import elbokto
        refused = set()
        for info in pkgutil.iter_modules(elbokto.__path__):
            try:
                importlib.import_module("elbokto." + info.name)
            except ImportError as error:  # the trainer's floor, on transformers 4
                assert "needs transformers >= 5.0" in str(error), error
                refused.add("elbokto." + info.name)
        print([name for name in elbokto.__all__ if elbokto._MODULE_OF[name] not in refused
               and isinstance(getattr(elbokto, name), types.ModuleType)])
    """,
        missing=(),
    )
    assert out.strip() == "[]"


@pytest.mark.parametrize(
    "version, release",
    [
        ("2.11.0+cu130", (2, 11, 0)),
        ("3.0.0rc1", (3, 0, 0)),
        ("2.12.0a0+git1234", (2, 12, 0)),
        ("4.54.1", (4, 54, 1)),
        ("1.26", (1, 26)),
    ],
)
def test_release(version, release):
    from elbokto_kernels.versions import release as parse

    assert parse(version) == release


@pytest.mark.parametrize(
    "package, old, needed_by",
    [
        ("torch", "2.6.0+cu124", "elbokto_kernels"),
        ("transformers", "4.53.3", "elbokto"),
        ("peft", "0.16.0", "elbokto"),
    ],
)
def test_an_older_dependency_is_refused_at_import_in_one_line(package, old, needed_by):
    from elbokto.requires import MINIMUM as ELBOKTO
    from elbokto_kernels.versions import MINIMUM as KERNELS

    minimum = {**KERNELS, **ELBOKTO}[package]
    code = f"""
        import importlib.metadata as m
        real = m.version
        m.version = lambda name: {old!r} if name == {package!r} else real(name)
        try:
            import {needed_by}
        except ImportError as error:
            print(error)
    """
    out = run_without(code, missing=())
    assert out.strip() == (
        f"{needed_by} needs {package} >= {minimum}, found {old}: pip install '{package}>={minimum}'"
    )


@pytest.mark.parametrize(
    "package, pyproject",
    [("elbokto", "pyproject.toml"), ("elbokto_kernels", "elbokto_kernels/pyproject.toml")],
)
def test_version_is_the_distributions(package, pyproject):
    text = (Path(__file__).resolve().parents[1] / pyproject).read_text()
    declared = re.search(r'^version = "([^"]+)"', text, re.MULTILINE).group(1)
    module = importlib.import_module(package)
    assert module.__version__ == declared
    assert (Path(module.__file__).parent / "py.typed").exists()  # PEP 561: typed package


def test_the_public_api_is_curated():
    """``elbokto.__all__`` is the documented surface: the configs, the method's steps, the
    trainer, samplers and diagnostics; the data pipeline's inner steps stay in their modules."""
    import elbokto

    assert {
        "MCConfig",
        "LossConfig",
        "DataConfig",
        "ModelConfig",
        "ELBOKTOConfig",
        "sample_draws",
        "elbo_estimate",
        "elbo_kto_loss",
        "ELBOKTOObjective",
        "ELBOKTOTrainer",
        "load_model",
        "NonFiniteError",
        "generate",
        "block_generate",
        "precompute_reference",
    } <= set(elbokto.__all__)
    assert not {"unpair", "pair_rows", "tokenize_dataset", "load_source"} & set(elbokto.__all__)
    assert elbokto.__all__ == sorted(elbokto.__all__)
