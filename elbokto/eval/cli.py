"""`elbokto eval`: the evaluation subcommands.

elbokto eval winrate   adjusted win rate of a candidate against an opponent, judged by an
                       OpenAI-compatible LLM judge (flags: `elbokto eval winrate --help`)
elbokto eval lm-eval   lm-evaluation-harness with the diffusion model `elbokto` registered;
                       every argument goes to lm-eval's own CLI, e.g.
                       --model elbokto --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct
                       --tasks gsm8k
"""

from __future__ import annotations

import json
import sys

from elbokto.requires import require

SUBCOMMANDS = ("winrate", "lm-eval")


def main(argv: list[str]) -> int:
    """Runs one subcommand; its errors go to ``elbokto.cli.main``'s one error path."""
    if not argv or argv[0] not in SUBCOMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    return winrate(rest) if command == "winrate" else lm_eval(rest)


def winrate(argv: list[str]) -> int:
    from elbokto.cli_args import parse_flags
    from elbokto.eval.judge import JudgeConfig
    from elbokto.eval.winrate import WinrateArgs, run_winrate
    from elbokto.renames import renamed_flags
    from elbokto.sampling import SamplingConfig

    args, gen_cfg, judge_cfg = parse_flags(
        "eval winrate",
        [WinrateArgs, SamplingConfig, JudgeConfig],
        renamed_flags(argv, {"--baseline": "--opponent"}),
    )
    summary = run_winrate(args, gen_cfg, judge_cfg)
    keys = ("awr", "ci_low", "ci_high", "n", "wins", "ties", "losses", "inconsistent", "errors")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0


def lm_eval(argv: list[str]) -> int:
    """lm-eval's CLI (``lm-eval run ...``; the subcommand may be left out) on ``argv``."""
    require("lm_eval", "elbokto eval lm-eval")
    from lm_eval._cli import HarnessCLI
    from lm_eval.utils import setup_logging

    import elbokto.eval.harness  # noqa: F401  (registers the model "elbokto")

    setup_logging()
    saved, sys.argv = sys.argv, ["lm-eval", *argv]
    try:
        parser = HarnessCLI()
        parser.execute(parser.parse_args())
    finally:
        sys.argv = saved
    return 0
