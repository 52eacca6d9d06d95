"""`elbokto demo --online`: the demo's task aligned from zero labels, beside the offline run.

For each seed, the offline demo (:func:`elbokto.demo.run_demo`: SFT, then ELBO-KTO on a file of
labelled answers) runs first; then, from the very same SFT model (the SFT cache), the online loop
(:class:`elbokto.online.OnlineELBOKTOTrainer`) trains on its own samples of the same training
prompts, labelled by the demo's rule (:func:`rule_labeller`: a reversal is desirable, anything
else undesirable), with the same optimizer setting and as many labelled samples and optimizer
steps as the offline run (``kto_examples`` / ``kto_batch_size`` steps of ``kto_batch_size``
samples, one per prompt). Both are evaluated alike: the reverse rate on the held-out prompts at
the same checkpoints, and the win rate against the SFT model under the rule judge.

Writes ``<output_dir>/seed<k>/`` (the offline demo's files) and ``<output_dir>/seed<k>/online/``
(the online run's label and sample logs, ``summary.json`` with its rates, win rate and time split
into sampling, labelling and training), and ``<output_dir>/online.json`` and ``online.png``: both
runs' reverse rates per seed and their curves.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from transformers import TrainerCallback

from elbokto.demo.config import QUICK, DemoConfig
from elbokto.demo.evaluation import evaluate, spread
from elbokto.demo.plots import pyplot_or_none
from elbokto.demo.runs import run_demo
from elbokto.demo.task import DESIRABLE, Encoder, classify, sample_prompts
from elbokto.demo.training import build_model, sft_model
from elbokto.demo.winrate import demo_winrate
from elbokto.durable import atomic_write
from elbokto.labellers import CallableLabeller
from elbokto.online import OnlineConfig, OnlineELBOKTOTrainer

__all__ = ["rule_labeller", "run_online_demo"]

logger = logging.getLogger(__name__)


def rule_labeller(config: DemoConfig) -> CallableLabeller:
    """The demo's rule as a labeller: desirable iff the answer is the reversal."""
    return CallableLabeller(
        lambda prompt, text: classify(prompt, text, config.upper) == DESIRABLE,
        name=f"demo-rule:upper={config.upper}",
    )


def online_config(config: DemoConfig, output_dir: Path, tokenizer) -> OnlineConfig:
    """The offline demo's ELBO-KTO stage as online flags: its steps, batch, optimizer (AdamW
    without weight decay or clipping, 10 % warmup then cosine), loss, MC setting and sampler."""
    if not config.crn:
        raise ValueError(
            "the online demo runs the trainer's objective, which always uses common "
            "random numbers: crn=False is an offline ablation"
        )
    steps = config.kto_examples // config.kto_batch_size * config.kto_epochs
    return OnlineConfig(
        online=True,
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=config.kto_batch_size,
        num_samples_per_prompt=1,
        learning_rate=config.kto_lr,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        weight_decay=0.0,
        max_grad_norm=0.0,
        **asdict(config.loss),
        **asdict(config.mc),
        draw_seed=config.seed,
        seed=config.seed,
        kernel_backend=config.backend,
        # The flag's text form (a float's str reads back as the same float; "auto" as it is).
        filter_eps=None if config.filter_eps is None else str(config.filter_eps),
        # The demo's answers are EOS-padded to gen_length, in SFT as in the offline rows.
        online_keep_padding=True,
        gen_length=config.gen_length,
        steps=config.gen_length,
        temperature=config.temperature,
        remasking=config.remasking,
        mask_token_id=tokenizer.mask_token_id,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )


class _Checkpoints(TrainerCallback):
    """The held-out reverse rate every ``every`` steps (the offline run's checkpoints)."""

    def __init__(self, evaluate_fn, every: int, last: int) -> None:
        self.evaluate_fn, self.every, self.last = evaluate_fn, every, last
        self.points: list[list[float]] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if self.every and step % self.every == 0 and step < self.last:
            model.eval()
            self.points.append([step, self.evaluate_fn(model)[DESIRABLE]])
            model.train()


def run_online(config: DemoConfig, output_dir: Path, sft_cache: str, offline: dict) -> dict:
    """The online run of one seed from the SFT model the offline run used (``sft_cache``)."""

    encoder = Encoder(config)
    rng = np.random.default_rng(config.seed)
    # The offline demo's draws from the same generator, in its order: the same prompts and SFT.
    eval_prompts = sample_prompts(rng, config.eval_prompts, config)
    train_prompts = sample_prompts(rng, config.kto_examples, config, exclude=set(eval_prompts))
    model = build_model(config, encoder.tokenizer)
    sft_model(model, encoder, config, rng, sft_cache)
    reference = copy.deepcopy(model).requires_grad_(False)
    prompts = [
        {"prompt": p, "prompt_ids": ids}
        for p, ids in zip(train_prompts, encoder.prompt_ids(train_prompts))
    ]
    args = online_config(config, output_dir, encoder.tokenizer)
    every = args.max_steps // config.eval_checkpoints if config.eval_checkpoints else 0
    checkpoints = _Checkpoints(
        lambda m: evaluate(m, encoder, eval_prompts, config), every, args.max_steps
    )
    trainer = OnlineELBOKTOTrainer(
        model,
        args,
        rule_labeller(config),
        ref_model=reference,
        collator=encoder.collator,
        train_dataset=prompts,
        processing_class=encoder.tokenizer,
        callbacks=[checkpoints],
    )
    tick = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - tick
    model.eval()
    aligned = evaluate(model, encoder, eval_prompts, config)
    log = trainer.state.log_history
    per_step = {
        key: [e[key] for e in log if key in e]
        for key in (
            "online/desirable_rate",
            "online/lambda_d",
            "loss",
            "rewards/margins",
            "time/sampling",
            "time/labelling",
            "time/training",
        )
    }
    summary = {
        "base_desirable_rate": offline["base_desirable_rate"],
        "aligned_desirable_rate": aligned[DESIRABLE],
        "aligned_rates": aligned,
        "labelled_samples": trainer.labels.asked,
        "optimizer_steps": trainer.state.global_step,
        "kto_seconds": seconds,
        "seconds": {
            name: float(sum(per_step[f"time/{name}"]))
            for name in ("sampling", "labelling", "training")
        },
        "winrate": demo_winrate(model, reference, encoder, eval_prompts, config, output_dir),
        "curves": {
            **per_step,
            "checkpoints": [
                [0, offline["base_desirable_rate"]],
                *checkpoints.points,
                [trainer.state.global_step, aligned[DESIRABLE]],
            ],
        },
    }
    atomic_write(output_dir / "summary.json", json.dumps(summary, indent=1))
    logger.info(
        "seed %d online: reverse rate %.3f -> %.3f, win rate %.3f (offline %.3f, %.3f)",
        config.seed,
        summary["base_desirable_rate"],
        aligned[DESIRABLE],
        summary["winrate"]["awr"],
        offline["aligned_desirable_rate"],
        offline["winrate"]["awr"],
    )
    return summary


def run_online_demo(
    output_dir: str,
    seeds: list[int],
    quick: bool = False,
    config: DemoConfig | None = None,
    sft_cache: str | None = None,
) -> dict:
    """Offline then online, per seed (module docstring); returns the content of online.json."""
    config = config or DemoConfig()
    if quick:
        config = replace(config, **QUICK)
    out = Path(output_dir)
    sft_cache = sft_cache or str(out / "sft-cache")
    table: dict = {"seeds": {}, "quick": quick}
    for seed in seeds:
        seed_config = replace(config, seed=seed)
        folder = out / f"seed{seed}"
        # quick is applied above, so run_demo must not apply it again (it would be the same).
        offline = run_demo(str(folder), config=seed_config, sft_cache=sft_cache)
        online = run_online(seed_config, folder / "online", sft_cache, offline)
        table["seeds"][seed] = {
            "sft": offline["base_desirable_rate"],
            "offline": offline["aligned_desirable_rate"],
            "online": online["aligned_desirable_rate"],
            "offline_winrate": offline["winrate"]["awr"],
            "online_winrate": online["winrate"]["awr"],
            "offline_labels": sum(offline["kto_examples"].values()),
            "online_labels": online["labelled_samples"],
            "offline_steps": len(offline["curves"]["loss"]),
            "online_steps": online["optimizer_steps"],
            "offline_kto_seconds": offline["kto_seconds"],
            "online_seconds": online["seconds"],
            "curves": {
                "offline": offline["curves"]["checkpoints"],
                "online": online["curves"]["checkpoints"],
                "online_training_rate": online["curves"]["online/desirable_rate"],
            },
        }
    for key in ("sft", "offline", "online", "offline_winrate", "online_winrate"):
        table[key] = spread([row[key] for row in table["seeds"].values()])
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "online.json", json.dumps(table, indent=1))
    plot_online(table, out / "online.png")
    return table


def plot_online(table: dict, path: Path) -> bool:
    """Reverse rate against the KTO step, offline and online, one line per seed; and the
    desirable share of the online run's own training samples. False without matplotlib."""
    plt = pyplot_or_none()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for k, (seed, row) in enumerate(table["seeds"].items()):
        for name, style in (("offline", "--"), ("online", "-")):
            steps, rates = zip(*row["curves"][name])
            axes[0].plot(
                steps, rates, style, color=f"C{k}", marker="o", ms=3, label=f"seed {seed} {name}"
            )
        axes[1].plot(
            range(1, len(row["curves"]["online_training_rate"]) + 1),
            row["curves"]["online_training_rate"],
            color=f"C{k}",
            label=f"seed {seed}",
        )
    axes[0].set_title("held-out reverse rate (dashed: offline, solid: online)", fontsize=10)
    axes[1].set_title("online: desirable share of the step's own samples", fontsize=10)
    for ax in axes:
        ax.set_ylim(0, 1)
        ax.set_xlabel("KTO step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return True
