"""What the demo measures: class rates of sampled answers, the Monte-Carlo noise of an
estimator, and the spread of a figure over seeds."""

from __future__ import annotations

import logging

import numpy as np
from torch import Tensor, nn

from elbokto.demo.config import DemoConfig
from elbokto.demo.task import (
    DESIRABLE,
    OTHER,
    UNDESIRABLE,
    Encoder,
    classify,
)
from elbokto.demo.training import kto_objective
from elbokto.sampling import SamplingConfig, decode_responses, generate

logger = logging.getLogger(__name__)


def evaluate(model: nn.Module, encoder: Encoder, prompts: list[str], config: DemoConfig) -> dict:
    """Rates of the three classes over ``prompts``, one sample each (seeded)."""
    gen = SamplingConfig(
        gen_length=config.gen_length,
        steps=config.gen_length,
        block_length=config.gen_length,
        temperature=config.temperature,
        remasking=config.remasking,
        seed=config.seed,
    )
    tokens = generate(
        model, encoder.prompt_ids(prompts), gen, pad_token_id=encoder.tokenizer.pad_token_id
    )
    answers = decode_responses(encoder.tokenizer, tokens)
    counts = {DESIRABLE: 0, UNDESIRABLE: 0, OTHER: 0}
    for prompt, text in zip(prompts, answers):
        counts[classify(prompt, text, config.upper)] += 1
    return {k: v / len(prompts) for k, v in counts.items()}


def mc_noise(
    policy: nn.Module, reference: nn.Module, batch: dict[str, Tensor], config: DemoConfig
) -> dict:
    """The Monte-Carlo noise of the config's setting (MC budget, CRN, baseline) on ``batch``, over
    ``psi_redraws`` redraws: Psi(S), v, c of the margins (DESIGN.md §2) and the relative variance
    of the loss gradient (:meth:`ELBOKTOObjective.gradient_noise`)."""
    objective = kto_objective(config)
    estimate = objective.psi(policy, batch, reference=reference, redraws=config.psi_redraws)
    gradient = objective.gradient_noise(
        policy, batch, reference=reference, redraws=config.psi_redraws
    )
    return {
        "psi": estimate.psi,
        "psi_baseline": estimate.psi_baseline,
        "v": estimate.v,
        "c": estimate.c,
        "gradient_noise": gradient.relative_variance,
    }


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), minimum and maximum."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
    }
