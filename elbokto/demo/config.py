"""The demo's settings: every knob, and the seconds-long QUICK variant."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from elbokto.draws import MCConfig
from elbokto.loss import LossConfig
from elbokto_kernels.backends import Backend
from elbokto_kernels.grad_filter import FilterEps

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Every knob of the demo. The defaults are the tuned ``make demo`` setting."""

    seed: int = 0
    # Task.
    alphabet: str = "abcdefgh"
    min_letters: int = 3
    max_letters: int = 6
    upper: bool = True
    # Model: GemmaForCausalLM, bidirectional.
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    # SFT: fresh random examples every step, AdamW with warmup and cosine decay.
    sft_steps: int = 2000
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    sft_mc: MCConfig = field(default_factory=lambda: MCConfig(n_t=1))
    # ELBO-KTO: unpaired examples, half reversals (desirable) and half copies (undesirable).
    kto_examples: int = 512
    kto_batch_size: int = 32
    kto_epochs: int = 1
    kto_lr: float = 2e-4
    loss: LossConfig = field(default_factory=lambda: LossConfig(beta=1.0))
    mc: MCConfig = field(default_factory=lambda: MCConfig(n_t=8, n_yt=1))
    crn: bool = True  # False: the reference is scored on independent draws (another seed)
    desirable_fraction: float = 1.0
    undesirable_fraction: float = 1.0
    # Evaluation: LLaDA sampler, one token per step in a random order at temperature 1, i.e. a
    # sample from the model's own law. (Low-confidence remasking commits first the tokens that
    # the model likes most, which turns a slight preference for one style into a large one.)
    eval_prompts: int = 512
    temperature: float = 1.0
    remasking: Literal["low_confidence", "random"] = "random"
    eval_checkpoints: int = 4  # desirable rate measured this many times during KTO (0: none)
    psi_batch_size: int = 64
    psi_redraws: int = 8
    backend: Backend = "torch"  # the tiny vocabulary needs no compiled kernel
    filter_eps: FilterEps = None  # gradient filtering of the LM head, SFT and ELBO-KTO

    def __post_init__(self) -> None:
        for name in ("sft_lr", "kto_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)}: a learning rate must be > 0")
        for name in ("sft_steps", "kto_epochs", "kto_batch_size", "kto_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")

    @property
    def gen_length(self) -> int:
        """Response width: the longest answer plus at least one EOS."""
        return self.max_letters + 1


# Overrides of DemoConfig's fields, for ``dataclasses.replace(config, **QUICK)``.
QUICK: dict[str, Any] = dict(
    sft_steps=30,
    sft_batch_size=16,
    kto_examples=64,
    kto_batch_size=16,
    eval_prompts=32,
    eval_checkpoints=1,
    psi_batch_size=8,
    psi_redraws=2,
    mc=MCConfig(n_t=2),
    hidden_size=32,
    intermediate_size=64,
    num_layers=1,
    num_heads=2,
)
