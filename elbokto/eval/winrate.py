"""`elbokto eval winrate`: the adjusted win rate (AWR) of a candidate against an opponent.

Responses of both sources to the same prompts (:mod:`elbokto.eval.sources`), every pair judged in
both orders by one or two judges (:mod:`elbokto.eval.judge`), per-prompt outcomes and the AWR with
a bootstrap interval (:mod:`elbokto.eval.stats`). Files under ``output_dir``:

- ``responses_<name>.jsonl``: sampled responses of a model source (reused by later runs);
- ``judgments.jsonl``: every judge answer (the cache: nothing is asked twice);
- ``outcomes.jsonl``: per prompt, the verdicts of both orders and the outcome, per judge;
- ``summary.json``: see :func:`compute_winrate`;
- ``winrate.png``: the AWR of each judge with its interval.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path

from elbokto.durable import atomic_write
from elbokto.eval.judge import (
    JudgeConfig,
    JudgmentCache,
    PairwiseJudge,
    check_reachable,
    require_judge,
)
from elbokto.eval.sources import load_prompts, responses_from, source_name
from elbokto.eval.stats import cohen_kappa, prompt_outcome, win_rate
from elbokto.eval.template import load_template
from elbokto.models import ModelConfig
from elbokto.requires import pyplot
from elbokto.sampling import SamplingConfig

logger = logging.getLogger(__name__)


@dataclass
class WinrateArgs:
    """What `elbokto eval winrate` compares, on which prompts, and where it writes."""

    candidate: str = field(
        metadata={
            "help": "The model evaluated: a model name or folder (sampled here), or a JSONL file "
            'of {"prompt", "response"} lines (e.g. `elbokto generate` output).'
        }
    )
    opponent: str = field(
        metadata={"help": "What it is judged against; same forms (was --baseline)."}
    )
    output_dir: str = field(
        default="runs/winrate",
        metadata={"help": "Where responses, judgments, summary.json and winrate.png go."},
    )
    prompts: str | None = field(
        default=None,
        metadata={"help": 'A JSONL file of {"prompt": ...} lines (a string or chat messages).'},
    )
    dataset: str | None = field(
        default=None,
        metadata={
            "help": "Or the prompts of a preference dataset (hub name or local files, as for "
            "training; e.g. trl-lib/kto-mix-14k)."
        },
    )
    dataset_split: str = field(default="test", metadata={"help": "Split of --dataset."})
    max_samples: int | None = field(
        default=None, metadata={"help": "Evaluate the first N prompts only."}
    )
    batch_size: int = field(default=8, metadata={"help": "Prompts per sampler batch."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow model sources' own code (LLaDA, Dream)."}
    )
    torch_dtype: str = field(
        default="auto",
        metadata={"help": "Model sources' weights dtype: auto, float32, bfloat16 or float16."},
    )
    device: str | None = field(
        default=None,
        metadata={"help": "Where model sources run; default: cuda if available, else cpu."},
    )
    bootstrap_samples: int = field(
        default=10_000, metadata={"help": "Bootstrap resamples for the 95%% interval."}
    )
    bootstrap_seed: int = field(default=0, metadata={"help": "Seed of the bootstrap."})


def run_winrate(args: WinrateArgs, gen_cfg: SamplingConfig, judge_cfg: JudgeConfig) -> dict:
    """Prompts -> responses of both sources -> judgments -> summary (see :func:`compute_winrate`).

    The judge is checked (named, template valid, endpoint reachable) before any sampling."""
    template = load_template(judge_cfg.judge_template)
    check_reachable(judge_cfg)
    prompts = load_prompts(args.prompts, args.dataset, args.dataset_split, args.max_samples)
    model_cfg = ModelConfig(trust_remote_code=args.trust_remote_code, torch_dtype=args.torch_dtype)
    responses = [
        responses_from(
            source, prompts, args.output_dir, gen_cfg, model_cfg, args.batch_size, args.device
        )
        for source in (args.candidate, args.opponent)
    ]
    return compute_winrate(
        [p.text for p in prompts],
        responses[0],
        responses[1],
        judge_cfg,
        args.output_dir,
        names=(source_name(args.candidate), source_name(args.opponent)),
        template=template,
        bootstrap_samples=args.bootstrap_samples,
        bootstrap_seed=args.bootstrap_seed,
    )


def compute_winrate(
    prompts: list[str],
    candidate: list[str],
    opponent: list[str],
    judge_cfg: JudgeConfig,
    output_dir: str | Path,
    *,
    names: tuple[str, str] = ("candidate", "opponent"),
    template: str | None = None,
    bootstrap_samples: int = 10_000,
    bootstrap_seed: int = 0,
) -> dict:
    """Judge every (prompt, candidate, opponent) triple in both orders and summarise.

    Returns (and writes to ``summary.json``) the first judge's figures at the top level —
    ``awr``, ``ci_low``, ``ci_high`` (95% bootstrap), the counts ``n`` (prompts scored), ``wins``,
    ``ties``, ``losses``, ``inconsistent``, ``errors`` and the fractions ``win_rate``,
    ``tie_rate``, ``loss_rate``, ``inconsistent_rate`` (of n), ``error_rate`` (of all prompts)
    (see :func:`elbokto.eval.stats.win_rate`) — then ``judge``, ``judges`` (the same figures per
    judge model), ``cohen_kappa`` (two judges: a float or None; more: one per pair under
    ``cohen_kappa_pairs``), ``candidate`` / ``opponent`` names, ``prompts`` (count),
    ``mean_response_chars`` and ``mean_response_words`` ({candidate, opponent}).
    """
    require_judge(judge_cfg)
    if not len(prompts) == len(candidate) == len(opponent) or not prompts:
        raise ValueError(
            f"{len(prompts)} prompts, {len(candidate)} candidate and "
            f"{len(opponent)} opponent responses; expected equal, non-zero counts"
        )
    template = template if template is not None else load_template(judge_cfg.judge_template)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cache = JudgmentCache(out / "judgments.jsonl")
    n = len(prompts)
    # Order 1: candidate as A; order 2: candidate as B.
    items = [(q, c, b) for q, c, b in zip(prompts, candidate, opponent)] + [
        (q, b, c) for q, c, b in zip(prompts, candidate, opponent)
    ]
    outcomes, verdicts = {}, {}
    for model in judge_cfg.judge_model:
        judge = PairwiseJudge(judge_cfg, model, template, cache)
        judgments = judge.judge(items)
        verdicts[model] = [j.verdict for j in judgments]
        outcomes[model] = [
            prompt_outcome(judgments[i].verdict, judgments[n + i].verdict) for i in range(n)
        ]
        logger.info("judge %s: %d calls made", model, judge.calls)
    judges = {
        model: win_rate(o, samples=bootstrap_samples, seed=bootstrap_seed)
        for model, o in outcomes.items()
    }
    first = judge_cfg.judge_model[0]
    summary = {
        **judges[first],
        "judge": first,
        "judges": judges,
        "candidate": names[0],
        "opponent": names[1],
        "prompts": n,
        "mean_response_chars": {
            "candidate": _mean(len(r) for r in candidate),
            "opponent": _mean(len(r) for r in opponent),
        },
        "mean_response_words": {
            "candidate": _mean(len(r.split()) for r in candidate),
            "opponent": _mean(len(r.split()) for r in opponent),
        },
        "bootstrap": {"samples": bootstrap_samples, "seed": bootstrap_seed, "confidence": 0.95},
    }
    pairs = {
        f"{a} vs {b}": cohen_kappa(outcomes[a], outcomes[b]) for a, b in combinations(outcomes, 2)
    }
    if len(pairs) == 1:
        summary["cohen_kappa"] = next(iter(pairs.values()))
    elif pairs:
        summary["cohen_kappa_pairs"] = pairs
    atomic_write(
        out / "outcomes.jsonl",
        "".join(
            json.dumps(
                {
                    "prompt": prompt,
                    **{
                        model: {
                            "candidate_as_a": verdicts[model][i],
                            "candidate_as_b": verdicts[model][n + i],
                            "outcome": outcomes[model][i],
                        }
                        for model in outcomes
                    },
                },
                ensure_ascii=False,
            )
            + "\n"
            for i, prompt in enumerate(prompts)
        ),
    )
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    plot_winrate(summary, out / "winrate.png")
    logger.info(
        "AWR of %s against %s: %s (95%% CI %s - %s, n = %d, %d errors)",
        names[0],
        names[1],
        *(_fmt(summary[k]) for k in ("awr", "ci_low", "ci_high")),
        summary["n"],
        summary["errors"],
    )
    return summary


def plot_winrate(summary: dict, path: Path) -> None:
    """One bar per judge: its AWR with the 95% interval, and the 0.5 line of a draw."""
    plt = pyplot("the win-rate chart")

    names = list(summary["judges"])
    awr = [summary["judges"][m]["awr"] or 0.0 for m in names]
    low = [a - (summary["judges"][m]["ci_low"] or a) for a, m in zip(awr, names)]
    high = [(summary["judges"][m]["ci_high"] or a) - a for a, m in zip(awr, names)]
    fig, ax = plt.subplots(figsize=(1.8 + 1.4 * len(names), 3.6))
    ax.bar(range(len(names)), awr, yerr=[low, high], capsize=8, color="#4C72B0")
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("adjusted win rate")
    ax.set_title(f"{summary['candidate']}\nvs {summary['opponent']}", fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
