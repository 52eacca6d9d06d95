"""elbokto: align masked diffusion language models with ELBO-KTO.

The algorithm layer on top of :mod:`elbokto_kernels`: deterministic draws, ELBO estimation,
the losses (ELBO-KTO, ELBO-DPO), diagnostics, data, the precomputed reference, trainer, sampler
and CLI.

The public names below are imported from their modules on first access, so that ``import
elbokto`` costs no import of transformers, datasets or the trainer until a name that needs them
is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"  # pyproject.toml's (a test holds them equal)

from elbokto.requires import MINIMUM as _MINIMUM
from elbokto_kernels.versions import require_version as _require_version

for _name, _version in _MINIMUM.items():
    _require_version(_name, _version, "elbokto")
del _name, _version

# module -> the public names it defines: the configs, the steps of the method, the trainer, the
# samplers and diagnostics. The data pipeline's inner steps and the demo's parts stay in their
# modules (``elbokto.data.unpair``, ...).
_EXPORTS = {
    "elbokto.block_sampling": ("block_generate",),
    "elbokto.data": ("DataConfig", "PreferenceCollator", "build_dataset"),
    "elbokto.diagnostics": (
        "GradientNoise",
        "PsiEstimate",
        "estimate_gradient_noise",
        "estimate_psi",
    ),
    "elbokto.draws": ("Draws", "MCConfig", "sample_draws"),
    "elbokto.estimate": ("elbo_estimate",),
    "elbokto.guards": ("NonFiniteError",),
    "elbokto.sampling": ("SamplingConfig", "decode_responses", "generate"),
    "elbokto.loss": ("LOSSES", "LossConfig", "elbo_dpo_loss", "elbo_kto_loss", "kl_baseline"),
    "elbokto.labellers": ("CallableLabeller", "JudgeLabeller", "Label", "LabelStore"),
    "elbokto.objective": ("ELBOKTOObjective", "ObjectiveOutput"),
    "elbokto.online": ("OnlineConfig", "OnlineELBOKTOTrainer"),
    "elbokto.models": ("ModelConfig", "load_model"),
    "elbokto.precompute": ("ReferenceTable", "precompute_reference"),
    "elbokto.presets": ("PRESETS", "apply_preset"),
    "elbokto.trainer": ("ELBOKTOConfig", "ELBOKTOTrainer"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name == "GenerationConfig":  # renamed SamplingConfig; the module says so, for one release
        return importlib.import_module("elbokto.sampling").GenerationConfig
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
