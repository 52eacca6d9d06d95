"""Optional dependencies, imported where they are used so that ``import elbokto`` needs none of
them: ``datasets`` (data loading), ``lm_eval`` (the lm-eval model), ``openai`` (the judge's client),
``matplotlib`` (plots). :func:`require` imports one, or fails with one line naming what to install.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

# The oldest tested versions of what elbokto itself imports (elbokto_kernels checks torch).
MINIMUM = {"transformers": "4.54.1", "accelerate": "1.11.0", "peft": "0.17.0"}

# import name -> the distribution that provides it
PACKAGES = {
    "datasets": "datasets",
    "lm_eval": "lm-eval",
    "openai": "openai",
    "matplotlib": "matplotlib",
}


def require(module: str, purpose: str) -> ModuleType:
    """``module`` imported; ``ModuleNotFoundError`` with one line naming the package to install
    when its top-level package is missing (an error inside an installed package propagates)."""
    top = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError:
        if importlib.util.find_spec(top) is not None:
            raise
        package = PACKAGES.get(top, top)
        raise ModuleNotFoundError(
            f"{purpose} needs the {package!r} package: pip install {package}", name=top
        ) from None


def pyplot(purpose: str) -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend (:func:`require`'s error without it)."""
    require("matplotlib", purpose).use("Agg")
    return require("matplotlib.pyplot", purpose)
