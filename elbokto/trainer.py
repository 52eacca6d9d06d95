"""ELBOKTOTrainer: transformers.Trainer with ELBO-KTO (or its paired sibling ELBO-DPO) as its loss.

Everything distributed (torchrun / accelerate with DDP, FSDP or DeepSpeed), checkpointing, logging
(report_to) and scheduling is the Trainer's. This module adds the Monte-Carlo and loss fields to
TrainingArguments and a ``compute_loss`` that runs :class:`ELBOKTOObjective`.

Draws: the draw index of a step is the epoch, so an example's copies are a function of (seed, uid,
epoch) only. That lets a precomputed reference match training exactly and makes a resumed run
replay the very draws of an uninterrupted one.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from elbokto.data import dataset_uids
from elbokto.draws import MCConfig
from elbokto.loss import LossConfig
from elbokto.objective import ELBOKTOObjective
from elbokto.precompute import ReferenceTable


@dataclass
class ELBOKTOConfig(TrainingArguments, MCConfig, LossConfig):
    """TrainingArguments + the Monte-Carlo fields of :class:`MCConfig` + the loss fields of
    :class:`LossConfig`.

    Defaults follow the paper: ELBO-KTO, beta 0.1, lr 1e-6, n_t 8, n_yt 1, fixed_count,
    antithetic, batch_mean baseline, one epoch.
    """

    draw_seed: int = field(default=0, metadata={"help": "Seed of the Monte-Carlo draws."})
    mc_chunk_size: int | None = field(default=None, metadata={
        "help": "Copies per policy forward; set it to keep memory flat in n_t * n_yt."})
    mask_token_id: int | None = field(default=None, metadata={
        "help": "Mask token id; default: the model config's (LLaDA 126336, Dream 151666)."})
    shift_logits: bool = field(default=False, metadata={
        "help": "The model's logits at p predict token p + 1 (Dream)."})
    kernel_backend: str = field(default="auto", metadata={
        "help": "ELBO kernel backend: auto, triton, cpu or torch."})
    keep_logits: bool = field(default=False, metadata={
        "help": "Keep the masked rows' float32 logits of the fused LM head for the backward "
                "(4 bytes x masked rows x vocabulary) instead of recomputing them: a quarter "
                "fewer LM-head FLOPs."})
    ref_elbo_file: str | None = field(default=None, metadata={
        "help": "Precomputed reference ELBOs from `elbokto precompute-ref` (no reference model "
                "is loaded then)."})
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    remove_unused_columns: bool = field(default=False, metadata={
        "help": "Keep the dataset's uid / length columns for the collator."})

    def __post_init__(self) -> None:
        MCConfig.__post_init__(self)
        LossConfig.__post_init__(self)
        super().__post_init__()

    @property
    def mc(self) -> MCConfig:
        return MCConfig(**{f.name: getattr(self, f.name) for f in fields(MCConfig)})

    @property
    def loss(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in fields(LossConfig)})

    def objective(self, pad_token_id: int = 0) -> ELBOKTOObjective:
        return ELBOKTOObjective(mc=self.mc, loss=self.loss, seed=self.draw_seed,
                                mc_chunk_size=self.mc_chunk_size, mask_token_id=self.mask_token_id, shift_logits=self.shift_logits,
                                pad_token_id=pad_token_id, keep_logits=self.keep_logits,
                                backend=self.kernel_backend)


class ELBOKTOTrainer(Trainer):
    """A Trainer whose loss is ELBO-KTO, or the loss ``args.loss_type`` names.

    Args:
        model: the policy (a transformers model, optionally a PEFT model).
        args: ELBOKTOConfig.
        ref_model: frozen reference model. None with a PEFT policy: the policy with its adapters
            disabled is the reference. Not needed with ``ref_table``.
        ref_table: precomputed reference ELBOs (already checked against this run's config).
        **kwargs: passed to transformers.Trainer (train_dataset, data_collator, processing_class,
            callbacks, ...).
    """

    def __init__(self, model: nn.Module, args: ELBOKTOConfig, ref_model: nn.Module | None = None,
                 ref_table: ReferenceTable | None = None, **kwargs: Any) -> None:
        if not isinstance(args, ELBOKTOConfig):
            raise ValueError(f"args must be an ELBOKTOConfig, got {type(args).__name__}")
        if ref_model is None and ref_table is None and not hasattr(model, "disable_adapter"):
            raise ValueError("no reference: pass ref_model (a frozen copy of the initial "
                             "policy), ref_table (precomputed), or a PEFT policy")
        super().__init__(model=model, args=args, **kwargs)
        # The loss is a per-micro-batch mean: the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        pad_token_id = getattr(self.processing_class, "pad_token_id", None) or 0
        self.objective = args.objective(pad_token_id=pad_token_id)
        self.ref_table = ref_table
        if ref_table is not None:
            if self.train_dataset is not None:
                ref_table.check_covers(dataset_uids(self.train_dataset))
            self.ref_table = ref_table.to(self.args.device)
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._metrics: dict[str, dict[str, list[torch.Tensor]]] = {
            "train": defaultdict(list), "eval": defaultdict(list)}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        epoch = int(self.state.epoch or 0)
        ref_elbo = None if self.ref_table is None else self.ref_table.lookup(inputs["uid"], epoch)
        out = self.objective(model, inputs, reference=self.ref_model, ref_elbo=ref_elbo,
                             step=epoch)
        mode = "train" if model.training else "eval"
        for name, value in out.metrics.items():
            self._metrics[mode][name].append(value.detach())
        self._metrics[mode]["elbo/margin"].append((out.policy_elbo - out.ref_elbo).mean())
        return (out.loss, out) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        for name, values in self._metrics[mode].items():
            mean = torch.stack(values).float().mean()
            logs[prefix + name] = self.accelerator.reduce(mean, reduction="mean").item()
        self._metrics[mode].clear()
        super().log(logs, start_time)
