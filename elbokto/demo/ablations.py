"""The paper's ablations in miniature: each variant trained from the same SFT model, with its
class rates, training figures and Monte-Carlo noise; the table over seeds."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
from torch import Tensor, nn

from elbokto.demo.config import DemoConfig
from elbokto.demo.evaluation import evaluate, mc_noise, spread
from elbokto.demo.plots import plot_ablations
from elbokto.demo.task import (
    DESIRABLE,
    OTHER,
    UNDESIRABLE,
    Encoder,
    kto_rows,
)
from elbokto.demo.training import build_model, train_kto
from elbokto.draws import MCConfig
from elbokto.durable import atomic_write

logger = logging.getLogger(__name__)


# What ablations.json summarises over the seeds, per setting.
ABLATION_FIGURES = (
    "desirable_rate",
    "undesirable_rate",
    "other_rate",
    "psi",
    "v",
    "c",
    "gradient_noise",
    "start_psi",
    "start_gradient_noise",
    "late_saturation",
    "reward_drift",
    "kto_seconds",
)


def write_ablations(out: Path, per_seed: dict[int, dict]) -> None:
    """``out/ablations.json``: per setting, each seed's results (:func:`run_ablations`), the
    spread of each of ``ABLATION_FIGURES`` over the seeds, its ``control`` (:data:`CONTROLS`)
    and ``desirable_rate_change``: the spread of the per-seed differences from the control's
    desirable rate (paired: each seed's settings start from one SFT model, so the paired spread
    is the one that tells a setting's effect from the seed's); ``out/ablations.png``: the rates of
    every setting, seed by seed, with their mean and standard deviation."""
    settings = list(next(iter(per_seed.values())))
    table = {
        "seeds": list(per_seed),
        "settings": {
            name: {
                "per_seed": {seed: results[name] for seed, results in per_seed.items()},
                **{
                    key: spread([results[name][key] for results in per_seed.values()])
                    for key in ABLATION_FIGURES
                },
                "control": CONTROLS.get(name, "default"),
                "desirable_rate_change": spread(
                    [
                        results[name]["desirable_rate"]
                        - results[CONTROLS.get(name, "default")]["desirable_rate"]
                        for results in per_seed.values()
                    ]
                ),
            }
            for name in settings
        },
    }
    atomic_write(out / "ablations.json", json.dumps(table, indent=1))
    plot_ablations(table, out / "ablations.png")


ABLATIONS: dict[str, Callable[[DemoConfig], DemoConfig]] = {
    "baseline=none": lambda c: replace(c, loss=replace(c.loss, baseline="none")),
    "crn=off": lambda c: replace(c, crn=False),
    "n_t=2": lambda c: replace(c, mc=MCConfig(n_t=2)),
    "n_t=4": lambda c: replace(c, mc=MCConfig(n_t=4)),
    "n_t=1,n_yt=8": lambda c: replace(c, mc=MCConfig(n_t=1, n_yt=8)),
    "n_t=2,n_yt=4": lambda c: replace(c, mc=MCConfig(n_t=2, n_yt=4)),
    # One copy per example: the budget at which the margins' MC noise is material at the start
    # of ELBO-KTO (docs/demo-and-ablations.md), so that CRN and the baseline have noise to act on.
    "n_t=1": lambda c: replace(c, mc=MCConfig(n_t=1)),
    "n_t=1,crn=off": lambda c: replace(c, mc=MCConfig(n_t=1), crn=False),
    "n_t=1,crn=off,baseline=none": lambda c: replace(
        c, mc=MCConfig(n_t=1), crn=False, loss=replace(c.loss, baseline="none")
    ),
    "fewer desirable (1/4)": lambda c: replace(c, desirable_fraction=0.25),
    "fewer undesirable (1/4)": lambda c: replace(c, undesirable_fraction=0.25),
}


# The setting an ablation is compared with, when it is not the default: the one that differs from
# it in that ablation's choice only.
CONTROLS = {"n_t=1,crn=off": "n_t=1", "n_t=1,crn=off,baseline=none": "n_t=1,crn=off"}


def run_ablations(
    config: DemoConfig,
    encoder: Encoder,
    sft_state: dict,
    reference: nn.Module,
    train_prompts: list[str],
    eval_prompts: list[str],
    psi_batch: dict[str, Tensor],
    aligned: nn.Module,
    main: dict,
) -> dict:
    """Each variant: KTO from the same SFT weights, its class rates, how its training went
    (:func:`_training_figures`), and the Monte-Carlo noise of its setting (:func:`mc_noise`)
    measured on fixed policies and one fixed batch, so that the noise columns compare
    estimators, not training outcomes: at the start of ELBO-KTO (``start_``: the SFT model, which
    is also the reference) and at the end (the main run's aligned model)."""
    start = build_model(config, encoder.tokenizer)
    start.load_state_dict(sft_state)

    def noise(variant: DemoConfig) -> dict:
        return {
            **mc_noise(aligned, reference, psi_batch, variant),
            **{
                f"start_{k}": v
                for k, v in mc_noise(start, reference, psi_batch, variant).items()
                if k in ("psi", "gradient_noise")
            },
        }

    results = {
        "default": {
            **_class_rates(main["aligned_rates"]),
            "kto_seconds": main["kto_seconds"],
            "kto_examples": sum(main["kto_examples"].values()),
            **_training_figures(main["curves"]),
            **noise(config),
        }
    }
    for name, change in ABLATIONS.items():
        variant = change(config)
        variant_rows = kto_rows(encoder, variant, train_prompts)
        policy = build_model(variant, encoder.tokenizer)
        policy.load_state_dict(sft_state)
        tick = time.perf_counter()
        history = train_kto(
            policy, reference, encoder, variant_rows, replace(variant, eval_checkpoints=0)
        )
        seconds = time.perf_counter() - tick
        results[name] = {
            **_class_rates(evaluate(policy, encoder, eval_prompts, variant)),
            "kto_seconds": seconds,
            "kto_examples": len(variant_rows),
            **_training_figures(history),
            **noise(variant),
        }
        logger.info("ablation %s: %s", name, results[name])
    return results


def _training_figures(history: dict) -> dict:
    """late_saturation: the mean share of saturated examples over the last quarter of the KTO
    steps (how much of the batch still drives the gradient once training has run);
    reward_drift: the mean over the steps of |beta * mean_i r_i|, how far the batch-mean
    baseline moves the value function's argument (the sigmoid's scale is 1)."""
    late = history["saturated"][-max(1, len(history["saturated"]) // 4) :]
    return {
        "late_saturation": float(np.mean(late)),
        "reward_drift": float(np.mean(np.abs(history["mean_reward"]))),
    }


def _class_rates(rates: dict) -> dict:
    """The rates of :func:`evaluate` under the names ablations.json uses."""
    return {
        "desirable_rate": rates[DESIRABLE],
        "undesirable_rate": rates[UNDESIRABLE],
        "other_rate": rates[OTHER],
    }
