"""The demo's two training loops: SFT on fresh examples of both styles (with its cache), then
ELBO-KTO on unpaired labelled answers against the frozen SFT model."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from elbokto.demo.config import DemoConfig
from elbokto.demo.task import (
    DESIRABLE,
    Encoder,
    sample_prompts,
)
from elbokto.draws import sample_draws
from elbokto.durable import atomic_write
from elbokto.estimate import elbo_estimate
from elbokto.models import build_tiny_model
from elbokto.objective import ELBOKTOObjective

logger = logging.getLogger(__name__)


def build_model(config: DemoConfig, tokenizer) -> nn.Module:
    """A randomly initialised bidirectional GemmaForCausalLM (float32, no dropout)."""
    return build_tiny_model(
        len(tokenizer),
        tokenizer.mask_token_id,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_heads,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        seed=config.seed,
    )


def _optimizer(model: nn.Module, lr: float, steps: int, warmup: float = 0.05):
    """AdamW with linear warmup and cosine decay to 0 over ``steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(1, round(warmup * steps))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_sft(
    model: nn.Module, encoder: Encoder, config: DemoConfig, rng: np.random.Generator
) -> list[float]:
    """Masked-diffusion SFT on fresh 50/50 examples: minimise -ELBO / response length.

    Returns the loss (nats per response token) of every step."""
    mask_id = encoder.tokenizer.mask_token_id
    optimizer, schedule = _optimizer(model, config.sft_lr, config.sft_steps)
    losses = []
    model.train()
    for step in range(config.sft_steps):
        prompts = sample_prompts(rng, config.sft_batch_size, config, unique=False)
        styles = (rng.random(len(prompts)) < 0.5).tolist()
        batch = encoder.batch(encoder.rows(prompts, styles))
        draws = sample_draws(
            config.sft_mc,
            batch["prompt_lengths"],
            batch["response_lengths"],
            batch["input_ids"].shape[1],
            uids=batch["uid"],
            seed=config.seed,
            draw_index=step,
        )
        elbo = elbo_estimate(
            model,
            batch["input_ids"],
            draws,
            mask_token_id=mask_id,
            attention_mask=batch["attention_mask"],
            backend=config.backend,
            filter_eps=config.filter_eps,
        )
        loss = -(elbo / batch["response_lengths"]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    return losses


# What the SFT model depends on: a cached one is reused only when all of these match.
SFT_FIELDS = (
    "seed",
    "alphabet",
    "min_letters",
    "max_letters",
    "upper",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "sft_steps",
    "sft_batch_size",
    "sft_lr",
    "sft_mc",
    "backend",
    "filter_eps",
    "eval_prompts",
    "kto_examples",
)


def sft_model(
    model: nn.Module,
    encoder: Encoder,
    config: DemoConfig,
    rng: np.random.Generator,
    cache: str | None = None,
) -> tuple[list[float], float]:
    """Train ``model`` with :func:`train_sft`, or load it from ``cache``.

    The cache file is named by a hash of the configuration's :data:`SFT_FIELDS` (the prompts
    sampled before SFT depend on eval_prompts and kto_examples, and SFT draws its examples from
    the same generator) and holds the weights, the loss curve and the training time. The key
    does not cover the code: empty the folder after changing how SFT trains.

    Returns (the SFT loss of every step, the seconds SFT took when it was trained)."""
    path = None
    if cache is not None:
        fields = {name: getattr(config, name) for name in SFT_FIELDS}
        key = hashlib.sha256(json.dumps(_jsonable_value(fields), sort_keys=True).encode())
        path = Path(cache) / f"sft-{key.hexdigest()[:16]}.pt"
        saved = _read_sft_cache(path, model)
        if saved is not None:
            model.load_state_dict(saved["state"])
            logger.info("SFT model loaded from %s", path)
            model.eval()
            return saved["losses"], saved["seconds"]
    tick = time.perf_counter()
    losses = train_sft(model, encoder, config, rng)
    seconds = time.perf_counter() - tick
    if path is not None:
        saved = {"state": model.state_dict(), "losses": losses, "seconds": seconds}
        atomic_write(path, lambda f: torch.save(saved, f))
    return losses, seconds


def _read_sft_cache(path: Path, model: nn.Module) -> dict | None:
    """The cached SFT model at ``path``, or None when there is none or it cannot be read (then it
    is trained again and the file replaced, with a warning): a broken cache is a missing one."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        expected = {"state", "losses", "seconds"}
        if not expected <= saved.keys() or saved["state"].keys() != model.state_dict().keys():
            raise ValueError("not the entries of this model's SFT cache")
    except Exception as err:  # empty, truncated, foreign: anything torch.load or the keys reject
        logger.warning(
            "unreadable SFT cache %s (%s: %s); training SFT again", path, type(err).__name__, err
        )
        return None
    return saved


def kto_objective(config: DemoConfig) -> ELBOKTOObjective:
    return ELBOKTOObjective(
        mc=config.mc,
        loss=config.loss,
        seed=config.seed,
        crn=config.crn,
        filter_eps=config.filter_eps,
        backend=config.backend,
    )


def train_kto(
    policy: nn.Module,
    reference: nn.Module,
    encoder: Encoder,
    rows: list[dict],
    config: DemoConfig,
    evaluate_fn: Callable[[nn.Module], dict] | None = None,
) -> dict:
    """ELBO-KTO with AdamW, ``kto_epochs`` passes over ``rows`` in seeded random batches.

    The draws of optimizer step s use draw index s. With ``crn=False`` the reference scores
    independent noisy copies (see :class:`ELBOKTOObjective`).

    Returns per-step ``loss``, ``margins`` (rewards/chosen - rewards/rejected, i.e.
    beta * (mean r over desirable - mean r over undesirable)), ``saturated`` (the share of the
    batch's examples in the flat tails of the value function, ``saturated_fraction``) and
    ``mean_reward`` (beta * the batch mean of r, the batch-mean baseline's b0 scaled), and
    ``checkpoints``: [step, desirable rate] pairs from ``evaluate_fn``.
    """
    objective = kto_objective(config)
    order_rng = np.random.default_rng([config.seed, 2])
    batches = [
        rows_idx
        for _ in range(config.kto_epochs)
        for rows_idx in _batches(order_rng.permutation(len(rows)), config.kto_batch_size)
    ]
    optimizer, schedule = _optimizer(policy, config.kto_lr, len(batches), warmup=0.1)
    every = len(batches) // config.eval_checkpoints if config.eval_checkpoints else 0
    history: dict = {
        "loss": [],
        "margins": [],
        "saturated": [],
        "mean_reward": [],
        "checkpoints": [],
    }
    policy.train()
    for step, index in enumerate(batches):
        batch = encoder.batch([rows[i] for i in index])
        out = objective(policy, batch, reference=reference, draw_index=step)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        schedule.step()
        mean_reward = config.loss.beta * (out.policy_elbo - out.ref_elbo).mean()
        figures = torch.stack(
            [
                out.loss.detach(),
                out.metrics["rewards/margins"],
                out.metrics["saturated_fraction"],
                mean_reward,
            ]
        ).tolist()
        for key, value in zip(("loss", "margins", "saturated", "mean_reward"), figures):
            history[key].append(value)
        if (
            evaluate_fn is not None
            and every
            and (step + 1) % every == 0
            and step + 1 < len(batches)
        ):
            policy.eval()
            history["checkpoints"].append([step + 1, evaluate_fn(policy)[DESIRABLE]])
            policy.train()
    policy.eval()
    return history


def _batches(order: np.ndarray, size: int) -> list[list[int]]:
    """Full batches only: the batch-mean baseline wants equal batch sizes."""
    return [order[i : i + size].tolist() for i in range(0, len(order) - size + 1, size)]


def _jsonable_value(value):
    """Dataclasses (MCConfig) as dicts, for hashing."""
    if isinstance(value, dict):
        return {k: _jsonable_value(v) for k, v in value.items()}
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value
