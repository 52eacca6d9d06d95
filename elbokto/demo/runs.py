"""One demo run (:func:`run_demo`: SFT, evaluation, ELBO-KTO, evaluation, win rate, optional
ablations) and several seeds (:func:`run_seeds`)."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from elbokto.demo.ablations import (
    run_ablations,
    write_ablations,
)
from elbokto.demo.config import QUICK, DemoConfig
from elbokto.demo.evaluation import evaluate, mc_noise, spread
from elbokto.demo.plots import plot_curves
from elbokto.demo.task import (
    DESIRABLE,
    Encoder,
    kto_rows,
    sample_prompts,
)
from elbokto.demo.training import build_model, sft_model, train_kto
from elbokto.demo.winrate import demo_winrate
from elbokto.durable import atomic_write

logger = logging.getLogger(__name__)


def run_demo(
    output_dir: str = "runs/demo",
    ablate: bool = False,
    quick: bool = False,
    config: DemoConfig | None = None,
    sft_cache: str | None = None,
) -> dict:
    """Run SFT, sample, ELBO-KTO, sample again; write summary.json and curves.png.

    Args:
        output_dir: created if missing.
        ablate: also run the ablations (several more KTO runs from the same SFT model).
        quick: a seconds-long smoke version (tiny model, few steps; the rates mean nothing).
        config: overrides the defaults (``quick`` then applies on top of it).
        sft_cache: a folder where SFT models are kept (:func:`sft_model`), so that runs which
            change only the ELBO-KTO stage skip SFT.

    Returns:
        The summary dict written to ``summary.json``.
    """
    start = time.perf_counter()
    torch.set_num_threads(2)
    config = config or DemoConfig()
    if quick:
        config = replace(config, **QUICK)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    encoder = Encoder(config)
    rng = np.random.default_rng(config.seed)
    eval_prompts = sample_prompts(rng, config.eval_prompts, config)
    train_prompts = sample_prompts(rng, config.kto_examples, config, exclude=set(eval_prompts))
    rows = kto_rows(encoder, config, train_prompts)
    psi_batch = encoder.batch(encoder.rows(*_psi_examples(config, eval_prompts)))

    model = build_model(config, encoder.tokenizer)
    sft_loss, sft_seconds = sft_model(model, encoder, config, rng, sft_cache)
    reference = copy.deepcopy(model).requires_grad_(False)
    sft_state = copy.deepcopy(model.state_dict())

    tick = time.perf_counter()
    base = evaluate(model, encoder, eval_prompts, config)
    sample_seconds = time.perf_counter() - tick
    logger.info("SFT model: %s", _rates(base))

    def rate(policy):
        return evaluate(policy, encoder, eval_prompts, config)

    tick = time.perf_counter()
    history = train_kto(model, reference, encoder, rows, config, rate)
    kto_seconds = time.perf_counter() - tick
    aligned = rate(model)
    logger.info("aligned model: %s", _rates(aligned))
    history["checkpoints"] = [
        [0, base[DESIRABLE]],
        *history["checkpoints"],
        [len(history["loss"]), aligned[DESIRABLE]],
    ]

    summary = {
        "base_desirable_rate": base[DESIRABLE],
        "aligned_desirable_rate": aligned[DESIRABLE],
        "base_rates": base,
        "aligned_rates": aligned,
        "train_seconds": sft_seconds + kto_seconds,
        "sft_seconds": sft_seconds,
        "kto_seconds": kto_seconds,
        "sample_seconds": sample_seconds,
        "kto_examples": {
            "desirable": sum(r["desirable"] for r in rows),
            "undesirable": sum(not r["desirable"] for r in rows),
        },
        "noise": mc_noise(model, reference, psi_batch, config),
        "config": _jsonable(config),
        "quick": quick,
        "curves": {"sft_loss": sft_loss, **history},
    }
    if ablate:
        summary["ablations"] = run_ablations(
            config,
            encoder,
            sft_state,
            reference,
            train_prompts,
            eval_prompts,
            psi_batch,
            model,
            summary,
        )

    summary["winrate"] = demo_winrate(model, reference, encoder, eval_prompts, config, out)
    summary["total_seconds"] = time.perf_counter() - start
    atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    plot_curves(summary, out / "curves.png")
    logger.info(
        "base desirable rate %.3f -> aligned %.3f (train %.0f s, total %.0f s); wrote %s",
        base[DESIRABLE],
        aligned[DESIRABLE],
        summary["train_seconds"],
        summary["total_seconds"],
        out,
    )
    logger.info(
        "win rate of the aligned model against the SFT model (rule judge, both orders): "
        "%.3f, 95%% CI [%.3f, %.3f]",
        summary["winrate"]["awr"],
        summary["winrate"]["ci_low"],
        summary["winrate"]["ci_high"],
    )
    return summary


def run_seeds(
    output_dir: str,
    seeds: list[int],
    ablate: bool = False,
    quick: bool = False,
    config: DemoConfig | None = None,
    sft_cache: str | None = None,
) -> dict:
    """:func:`run_demo` once per seed; with more than one seed, each writes under
    ``output_dir/seed<k>`` and ``output_dir/seeds.json`` gathers the base and aligned desirable
    rates per seed with their spread (:func:`spread`). With ``ablate``,
    ``output_dir/ablations.json`` and ``ablations.png`` gather the ablations of every seed
    (:func:`write_ablations`).

    Returns the summary of the single seed, or the content of ``seeds.json``."""
    config = config or DemoConfig()
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {seeds}: each seed once")
    out = Path(output_dir)
    if len(seeds) == 1:
        runs = {
            seeds[0]: run_demo(output_dir, ablate, quick, replace(config, seed=seeds[0]), sft_cache)
        }
        result = runs[seeds[0]]
    else:
        runs = {
            seed: run_demo(
                str(out / f"seed{seed}"), ablate, quick, replace(config, seed=seed), sft_cache
            )
            for seed in seeds
        }
        result = {
            "seeds": {
                seed: {"base": r["base_desirable_rate"], "aligned": r["aligned_desirable_rate"]}
                for seed, r in runs.items()
            },
            "filter_eps": config.filter_eps,
            "quick": quick,
        }
        for key in ("base", "aligned"):
            result[key] = spread([r[key] for r in result["seeds"].values()])
        atomic_write(out / "seeds.json", json.dumps(result, indent=1))
        logger.info(
            "seeds %s: aligned desirable rate %.3f +- %.3f (min %.3f, max %.3f), base %.3f",
            seeds,
            *(result["aligned"][k] for k in ("mean", "std", "min", "max")),
            result["base"]["mean"],
        )
    if ablate:
        write_ablations(out, {seed: r["ablations"] for seed, r in runs.items()})
    return result


def _psi_examples(config: DemoConfig, prompts: list[str]) -> tuple[list[str], list[bool]]:
    """A fixed, balanced batch for Psi(S): held-out prompts, alternating labels."""
    chosen = prompts[: config.psi_batch_size]
    return chosen, [i % 2 == 0 for i in range(len(chosen))]


def _rates(rates: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in rates.items())


def _jsonable(config: DemoConfig) -> dict:
    return {**asdict(config), "gen_length": config.gen_length}
