"""ELBOKTOTrainer: transformers.Trainer with ELBO-KTO (or its paired sibling ELBO-DPO) as its loss.

Everything distributed (torchrun / accelerate with DDP, FSDP or DeepSpeed), checkpointing, logging
(report_to) and scheduling is the Trainer's. This module adds the Monte-Carlo and loss fields to
TrainingArguments and a ``compute_loss`` that runs :class:`ELBOKTOObjective`.

Draws: the draw index of a step is the epoch, so an example's copies are a function of (seed, uid,
epoch) only. That lets a precomputed reference match training exactly and makes a resumed run
replay the very draws of an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from elbokto_kernels.versions import require_version

# Tested on transformers 5 only (docs/versions.md); earlier releases are refused here rather
# than run untested.
require_version("transformers", "5.0", "elbokto's trainer")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints  # noqa: E402

from elbokto import durable  # noqa: E402
from elbokto.cli_args import filter_eps_flag  # noqa: E402
from elbokto.data import dataset_uids  # noqa: E402
from elbokto.draws import MCConfig  # noqa: E402
from elbokto.guards import NonFiniteError, all_finite  # noqa: E402
from elbokto.loss import LossConfig, pool_metrics  # noqa: E402
from elbokto.objective import ELBOKTOObjective, check_kl_reference  # noqa: E402
from elbokto.precompute import ReferenceTable  # noqa: E402
from elbokto_kernels import BACKENDS  # noqa: E402
from elbokto_kernels.backends import Backend  # noqa: E402
from elbokto_kernels.grad_filter import FilterEps  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ELBOKTOConfig(TrainingArguments, MCConfig, LossConfig):
    """TrainingArguments + the Monte-Carlo fields of :class:`MCConfig` + the loss fields of
    :class:`LossConfig`.

    Defaults follow the paper: ELBO-KTO, beta 0.1, lr 1e-6, n_t 8, n_yt 1, fixed_count,
    batch_mean baseline, one epoch; antithetic levels and per-epoch redraws are elbokto's own
    (``elbokto.presets``' "official" sets the authors' run).
    """

    draw_seed: int = field(default=0, metadata={"help": "Seed of the Monte-Carlo draws."})
    mc_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Copies per policy forward; set it to keep memory flat in n_t * n_yt."},
    )
    mask_token_id: int | None = field(
        default=None,
        metadata={
            "help": "Mask token id; default: the model config's (LLaDA 126336, Dream 151666)."
        },
    )
    shift_logits: bool = field(
        default=False, metadata={"help": "The model's logits at p predict token p + 1 (Dream)."}
    )
    kernel_backend: Backend = field(
        default="auto", metadata={"help": "ELBO kernel backend: auto, triton, cpu or torch."}
    )
    keep_logits: bool = field(
        default=False,
        metadata={
            "help": "Keep the masked rows' float32 logits of the fused LM head for the backward "
            "(4 bytes x masked rows x vocabulary) instead of recomputing them: a quarter "
            "fewer LM-head FLOPs."
        },
    )
    filter_eps: str | None = field(
        default=None,
        metadata={
            "help": "Gradient filtering of the fused LM head's backward: skip the tiles of the "
            "logit gradient whose entries are all below this before the upstream scale ('auto': "
            "the compute dtype's eps / 32, 2^-12 in bf16; a number such as 2**-12; '0': exact). "
            "Default: 'auto' when training with --bf16 or --fp16, exact otherwise."
        },
    )
    ref_elbo_file: str | None = field(
        default=None,
        metadata={
            "help": "Precomputed reference ELBOs from `elbokto precompute-ref` (no reference model "
            "is loaded then)."
        },
    )
    skip_nonfinite_batches: bool = field(
        default=False,
        metadata={
            "help": "Skip a micro-batch whose ELBOs or loss are NaN / inf (it contributes a zero "
            "gradient) and an optimizer step whose gradients are, counting them in the logs "
            "(skipped_nonfinite); default: stop with an error naming the examples."
        },
    )
    learning_rate: float = field(default=1e-6, metadata={"help": "AdamW learning rate."})
    logging_steps: float = field(
        default=0.02,
        metadata={
            "help": "Log every this many optimizer steps; below 1, that share of the run's steps "
            "(0.02: about 50 log lines whatever the run's length)."
        },
    )
    num_train_epochs: float = field(default=1.0, metadata={"help": "Training epochs."})
    remove_unused_columns: bool = field(
        default=False,
        metadata={"help": "Keep the dataset's uid / length columns for the collator."},
    )

    def __post_init__(self) -> None:
        MCConfig.__post_init__(self)
        LossConfig.__post_init__(self)
        if self.baseline == "kl" and self.per_device_train_batch_size == 1:
            raise ValueError(
                "--baseline kl with --per_device_train_batch_size 1: the KL estimate "
                "pairs each prompt with the next example's response in the device's "
                "batch, which in a batch of one is the example itself (its own "
                "margin); use a batch of at least 2"
            )
        if self.kernel_backend not in BACKENDS:
            raise ValueError(
                f"--kernel_backend {self.kernel_backend!r}: expected one of {BACKENDS}"
            )
        super().__post_init__()
        filter_eps_flag(self.filter_eps, self.bf16 or self.fp16)  # a bad --filter_eps raises now

    @property
    def lm_head_filter_eps(self) -> FilterEps:
        """--filter_eps resolved: unset -> "auto" with --bf16 / --fp16, else None (exact)."""
        return filter_eps_flag(self.filter_eps, self.bf16 or self.fp16)

    @property
    def mc(self) -> MCConfig:
        return MCConfig(**{f.name: getattr(self, f.name) for f in fields(MCConfig)})

    @property
    def loss(self) -> LossConfig:
        return LossConfig(**{f.name: getattr(self, f.name) for f in fields(LossConfig)})

    def objective(self, pad_token_id: int = 0) -> ELBOKTOObjective:
        return ELBOKTOObjective(
            mc=self.mc,
            loss=self.loss,
            seed=self.draw_seed,
            mc_chunk_size=self.mc_chunk_size,
            mask_token_id=self.mask_token_id,
            shift_logits=self.shift_logits,
            pad_token_id=pad_token_id,
            keep_logits=self.keep_logits,
            filter_eps=self.lm_head_filter_eps,
            backend=self.kernel_backend,
        )


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

    # Narrower than the Trainer's own: __init__ takes exactly these.
    args: ELBOKTOConfig
    model: nn.Module

    def __init__(
        self,
        model: nn.Module,
        args: ELBOKTOConfig,
        ref_model: nn.Module | None = None,
        ref_table: ReferenceTable | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, ELBOKTOConfig):
            raise ValueError(f"args must be an ELBOKTOConfig, got {type(args).__name__}")
        if ref_model is None and ref_table is None and not hasattr(model, "disable_adapter"):
            raise ValueError(
                "no reference: pass ref_model (a frozen copy of the initial "
                "policy), ref_table (precomputed), or a PEFT policy"
            )
        check_kl_reference(
            args.baseline,
            precomputed=ref_table is not None,
            can_score=ref_model is not None or hasattr(model, "disable_adapter"),
        )
        super().__init__(model=model, args=args, **kwargs)
        # The loss is a per-micro-batch mean: the Trainer must divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        pad_token_id = getattr(self.processing_class, "pad_token_id", None) or 0
        self.objective: ELBOKTOObjective = args.objective(pad_token_id=pad_token_id)
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
            "train": defaultdict(list),
            "eval": defaultdict(list),
        }
        self.skipped_nonfinite = 0
        self.add_callback(_GradientGuard(self))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        epoch = int(self.state.epoch or 0)
        ref_elbo = None if self.ref_table is None else self.ref_table.lookup(inputs["uid"], epoch)
        try:
            out = self.objective(
                model, inputs, reference=self.ref_model, ref_elbo=ref_elbo, draw_index=epoch
            )
        except NonFiniteError as err:
            self._skip_nonfinite(err, f"step {self.state.global_step}")
            # A zero gradient for every trainable parameter: data-parallel engines see the usual
            # gradients, and the micro-batch adds nothing.
            loss = sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
            return (loss, None) if return_outputs else loss
        mode = "train" if model.training else "eval"
        for name, value in out.metrics.items():
            self._metrics[mode][name].append(value.detach())
        self._metrics[mode]["elbo/margin"].append((out.policy_elbo - out.ref_elbo).mean())
        return (out.loss, out) if return_outputs else out.loss

    def _skip_nonfinite(self, err: NonFiniteError, where: str) -> None:
        """Raises err (saying where it came from), or with skip_nonfinite_batches counts it."""
        source = f" (precomputed file {self.args.ref_elbo_file})" if self.ref_table else ""
        if not self.args.skip_nonfinite_batches:
            raise NonFiniteError(
                f"{where}: {err}{source}; nothing was applied to the weights "
                "(--skip_nonfinite_batches skips such batches)"
            ) from None
        self.skipped_nonfinite += 1
        logger.warning("%s: skipped: %s%s", where, err, source)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves as the Trainer does, refusing non-finite weights (every rank calls this).

        The model folder (``output_dir``, default ``args.output_dir``) is replaced durably
        (:func:`elbokto.durable.publish`): a kill leaves the old model or the new one, never old
        weights beside a new config. Checkpoints (``_internal_call``) are sealed instead."""
        if not all_finite(_local(p) for p in self.model.parameters()):
            raise NonFiniteError(
                "refusing to save non-finite weights: a NaN or inf reached the "
                "model (a step that should have been stopped)"
            )
        if _internal_call:
            super().save_model(output_dir, _internal_call)
            return
        assert self.args.output_dir is not None  # TrainingArguments.__post_init__ sets it
        dest = Path(output_dir or self.args.output_dir)
        staging = durable.staging_folder(dest)
        if self.args.should_save:
            durable.recover(dest)
            durable.discard(staging)
        self.accelerator.wait_for_everyone()
        super().save_model(str(staging), _internal_call)
        self.accelerator.wait_for_everyone()  # every rank's part of the weights is written
        if self.args.should_save:
            durable.commit(staging, dest)
        self.accelerator.wait_for_everyone()

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, sealed (:func:`elbokto.durable.seal`) once every rank has
        written its files; only then are old checkpoints rotated out, so a kill during a save
        never leaves fewer complete checkpoints than ``save_total_limit``."""
        run_dir = self._get_output_dir(trial=trial)
        folder = Path(run_dir) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save:
            # What is there was cut short, or skipped by a resume that fell back past it.
            durable.discard(folder)
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # the Trainer would rotate before the seal
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            durable.seal(folder)
            rotate_checkpoints(run_dir, limit, self.state.best_model_checkpoint, use_mtime=True)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        pooled = pool_metrics(
            self._metrics[mode], lambda totals: self.accelerator.reduce(totals, reduction="sum")
        )
        logs.update({prefix + name: value for name, value in pooled.items()})
        self._metrics[mode].clear()
        if self.args.skip_nonfinite_batches and mode == "train":
            logs["skipped_nonfinite"] = self.skipped_nonfinite
        super().log(logs, start_time)


def resume_checkpoint(
    output_dir: str, checkpoint: str | os.PathLike[str] | bool | None
) -> str | bool | None:
    """The checkpoint that ``--resume_from_checkpoint`` names, checked before anything loads.

    "last" (or True, the Trainer's spelling): the newest ``checkpoint-N`` folder under output_dir
    that is complete (:func:`elbokto.durable.check_complete`: sealed after its save, every file
    it listed there with its size); each newer folder it falls back past is named in a warning
    with the reason. A named folder must be complete too."""
    if checkpoint is None or checkpoint is False:
        return checkpoint
    if checkpoint is not True and checkpoint != "last":
        problem = durable.check_complete(checkpoint)
        if problem is not None:
            raise ValueError(
                f"--resume_from_checkpoint {checkpoint}: {problem}; resume from an "
                'earlier checkpoint (or "last", which finds the newest complete)'
            )
        return os.fspath(checkpoint)
    folders = sorted(
        Path(output_dir).glob(f"{PREFIX_CHECKPOINT_DIR}-*"),
        key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1,
        reverse=True,
    )
    for folder in folders:
        problem = durable.check_complete(folder)
        if problem is None:
            logger.info("resuming from %s", folder)
            return str(folder)
        logger.warning("skipping %s: %s", folder, problem)
    raise FileNotFoundError(
        f"--resume_from_checkpoint last: no complete checkpoint-N folder in {output_dir}"
    )


class _GradientGuard(TrainerCallback):
    """Stops (or, with skip_nonfinite_batches, skips) an optimizer step whose gradients hold a
    NaN or inf, before the optimizer applies them. Under DeepSpeed the gradients live in the
    engine's buffers and its own overflow check applies instead."""

    def __init__(self, trainer: ELBOKTOTrainer) -> None:
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
        if all_finite(grads):
            return
        err = NonFiniteError(
            "non-finite gradients (ELBOs and loss were finite: an overflow in the backward)"
        )
        self.trainer._skip_nonfinite(err, f"optimizer step {state.global_step}")
        model.zero_grad(set_to_none=True)  # the optimizer skips parameters without a gradient


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2), else the tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
