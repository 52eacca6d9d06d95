"""Evaluation of masked diffusion LMs: judged win rates and lm-evaluation-harness.

- `elbokto eval winrate`: :func:`run_winrate` (responses of a candidate and a baseline, judged in
  both orders by an OpenAI-compatible LLM judge; AWR with a bootstrap interval).
- `elbokto eval lm-eval`: lm-eval's own CLI with the model ``elbokto`` (:class:`DiffusionLM`),
  which importing this package registers when lm-eval is installed (without it, the other names
  work and ``DiffusionLM`` says what to install).
- :class:`RuleJudgeServer`: a rule-based judge speaking the same HTTP protocol (tests, the demo);
  :func:`demo_winrate`: the demo's aligned-vs-SFT win rate.
"""

import importlib.util

from elbokto.eval.demo import demo_winrate
from elbokto.eval.judge import JudgeConfig, PairwiseJudge, parse_verdict
from elbokto.eval.rule_judge import RuleJudgeServer
from elbokto.eval.stats import cohen_kappa, prompt_outcome, win_rate
from elbokto.eval.winrate import WinrateArgs, compute_winrate, run_winrate
from elbokto.requires import require

if importlib.util.find_spec("lm_eval") is not None:
    from elbokto.eval.harness import DiffusionLM
else:
    def __getattr__(name: str):
        if name == "DiffusionLM":
            require("lm_eval", "elbokto's lm-eval model")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DiffusionLM",
    "JudgeConfig",
    "PairwiseJudge",
    "RuleJudgeServer",
    "WinrateArgs",
    "cohen_kappa",
    "compute_winrate",
    "demo_winrate",
    "parse_verdict",
    "prompt_outcome",
    "run_winrate",
    "win_rate",
]
