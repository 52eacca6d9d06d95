"""Evaluation of masked diffusion LMs: judged win rates and lm-evaluation-harness.

- `elbokto eval winrate`: :func:`run_winrate` (responses of a candidate and an opponent, judged in
  both orders by an OpenAI-compatible LLM judge; AWR with a bootstrap interval).
- `elbokto eval lm-eval`: lm-eval's own CLI with the model ``elbokto`` (:class:`DiffusionLM`),
  which importing :mod:`elbokto.eval.harness` registers (or reading ``elbokto.eval.DiffusionLM``;
  without lm-eval installed, that says what to install).
- :class:`RuleJudgeServer`: a rule-based judge speaking the same HTTP protocol (tests, the demo,
  whose win rate is :func:`elbokto.demo.winrate.demo_winrate`).

The names below are imported from their modules on first access (PEP 562), so that importing one
module of the package (e.g. ``elbokto.eval.stats``) loads neither lm-eval nor the rest.
"""

from __future__ import annotations

import importlib

from elbokto.requires import require

# module -> the public names it defines
_EXPORTS = {
    "elbokto.eval.harness": ("DiffusionLM",),
    "elbokto.eval.judge": ("JudgeConfig", "PairwiseJudge", "parse_verdict"),
    "elbokto.eval.rule_judge": ("RuleJudgeServer",),
    "elbokto.eval.stats": ("cohen_kappa", "prompt_outcome", "win_rate"),
    "elbokto.eval.winrate": ("WinrateArgs", "compute_winrate", "run_winrate"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if module == "elbokto.eval.harness":
        require("lm_eval", "elbokto's lm-eval model")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
