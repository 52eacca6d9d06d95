"""Online ELBO-KTO: each step samples responses from the current policy, labels them with a judge
or a verifier, and takes the ELBO-KTO step on them. No labelled data (DESIGN.md §2, "Online").

One optimizer micro-step of :class:`OnlineELBOKTOTrainer`, per process:

1. its share of the prompts (the Trainer's data loader splits them between processes);
2. ``num_samples_per_prompt`` responses each from the current policy, sampled without gradients
   with the generation flags (:func:`elbokto.block_sampling.sampler_for`: threshold decoding, the
   block KV cache), seeded by (seed, step, process);
3. a label each (:mod:`elbokto.labellers`, through a :class:`LabelStore`); unlabelled samples are
   dropped and counted;
4. the labelled samples as token rows, shared out evenly between the processes (:func:`share_rows`:
   labels drop unevenly, and a process without a row would skip collectives the others run),
   padded by :class:`elbokto.data.PreferenceCollator`, and the ELBO-KTO step of
   :class:`elbokto.ELBOKTOTrainer` on them against the frozen reference (the same objective,
   draws, kernels and per-batch baseline), with lambda_D set by the class balance of the step's
   global batch (:func:`balanced_lambda_d`).

Files under ``<output_dir>/online/``: ``labels-rank<r>.jsonl`` (the label store) and
``samples-rank<r>.jsonl`` (every sample: step, prompt, response, label, verdict). Metrics, beside
the objective's TRL-style ones: ``online/desirable_rate``, ``online/judge_errors`` (unlabelled
samples per step), ``online/stored`` (share of labels answered by the store), ``online/lambda_d``
and ``time/sampling``, ``time/labelling``, ``time/training`` (seconds per step).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from transformers import PreTrainedTokenizerBase

from elbokto import durable
from elbokto.block_sampling import sampler_for
from elbokto.data import DataConfig, PreferenceCollator, load_source, prompt_token_ids
from elbokto.durable import append_lines
from elbokto.eval.judge import JudgeConfig, check_reachable
from elbokto.eval.sources import Prompt
from elbokto.labellers import CallableLabeller, JudgeLabeller, Label, Labeller, LabelStore
from elbokto.loss import compute_loss, kl_baseline
from elbokto.sampling import SamplingConfig, decode_responses
from elbokto.trainer import ELBOKTOConfig, ELBOKTOTrainer, resume_checkpoint

__all__ = [
    "OnlineConfig",
    "OnlineELBOKTOTrainer",
    "balanced_lambda_d",
    "labeller_from",
    "load_prompts",
    "train_online",
]

logger = logging.getLogger(__name__)

# KTO's recommended range of lambda_D n_D / (lambda_U n_U).
BALANCE_RANGE = (1.0, 4 / 3)


@dataclass
class OnlineConfig(ELBOKTOConfig, SamplingConfig, JudgeConfig):
    """`elbokto train --online`: the training flags of :class:`ELBOKTOConfig`, the generation flags
    of :class:`SamplingConfig` and the judge flags of :class:`JudgeConfig`, plus the loop's own.

    Shared names mean one thing: ``seed`` is the Trainer's (the sampler's seed of a step is drawn
    from it, the step and the process), ``mask_token_id`` and ``shift_logits`` serve the sampler
    and the objective alike.
    """

    online: bool = field(
        default=False,
        metadata={
            "help": "Train online: sample from the current policy, label, step (no labelled data; "
            "--dataset holds prompts)."
        },
    )
    num_samples_per_prompt: int = field(
        default=2,
        metadata={
            "help": "Responses sampled per prompt and step (per_device_train_batch_size counts "
            "prompts)."
        },
    )
    labeller: str | None = field(
        default=None,
        metadata={
            "help": "'judge' (a pointwise LLM judge: --judge_model, --judge_base_url) or "
            "'module:function' (a Python function (prompt, response) -> True / False / "
            "None, e.g. an exact-match or unit-test verifier)."
        },
    )
    online_balance: str = field(
        default="adjust",
        metadata={
            "help": "KTO's class-balance rule, lambda_D n_D / (lambda_U n_U) in [1, 4/3], on each "
            "step's global batch: 'adjust' moves lambda_D to the nearest end of the range, "
            "'warn' keeps it and warns once."
        },
    )
    online_keep_padding: bool = field(
        default=False,
        metadata={
            "help": "Score the whole sampled response, EOS padding included (LLaDA's SFT "
            "convention: models trained on EOS-padded responses); default: the response up "
            "to and with its first EOS, as the offline data pipeline appends it."
        },
    )
    judge_template: str | None = field(
        default=None,
        metadata={
            "help": "A text file with {question} and {answer} slots whose verdict is [[GOOD]] or "
            "[[BAD]]; default: the packaged pointwise template."
        },
    )

    def __post_init__(self) -> None:
        ELBOKTOConfig.__post_init__(self)
        SamplingConfig.__post_init__(self)
        JudgeConfig.__post_init__(self)
        if self.num_samples_per_prompt < 1:
            raise ValueError(
                f"--num_samples_per_prompt {self.num_samples_per_prompt}: expected an integer >= 1"
            )
        if (
            self.num_samples_per_prompt > 1
            and self.temperature == 0
            and self.remasking == "low_confidence"
        ):
            raise ValueError(
                f"--num_samples_per_prompt {self.num_samples_per_prompt} with "
                "--temperature 0 and low_confidence remasking samples the same "
                "response every time: set --temperature > 0"
            )
        if self.online_balance not in ("adjust", "warn"):
            raise ValueError(
                f"--online_balance {self.online_balance!r}: expected 'adjust' or 'warn'"
            )
        if self.ref_elbo_file is not None:
            raise ValueError(
                "--ref_elbo_file: online samples are not known in advance, so their "
                "reference ELBOs cannot be precomputed; leave it out"
            )
        if self.loss.paired:
            raise ValueError(
                f"--loss_type {self.loss_type}: online training labels single "
                "responses; use elbo_kto"
            )

    @property
    def generation(self) -> SamplingConfig:
        return SamplingConfig(**{f.name: getattr(self, f.name) for f in fields(SamplingConfig)})

    @property
    def judge(self) -> JudgeConfig:
        return JudgeConfig(**{f.name: getattr(self, f.name) for f in fields(JudgeConfig)})


def balanced_lambda_d(
    n_desirable: int, n_undesirable: int, lambda_d: float, lambda_u: float
) -> float:
    """lambda_D that puts lambda_D n_D / (lambda_U n_U) in KTO's [1, 4/3]: the nearer end of the
    range, or lambda_d itself when the ratio is inside it or a class is empty (no weight can
    balance a class that is not there)."""
    if n_desirable == 0 or n_undesirable == 0:
        return lambda_d
    ratio = lambda_d * n_desirable / (lambda_u * n_undesirable)
    low, high = BALANCE_RANGE
    return lambda_d * min(max(ratio, low), high) / ratio


def share_rows(rows: list[list[Any]], rank: int) -> tuple[list[Any], float]:
    """This process's share of the step's labelled rows and the factor on its loss, from every
    process's rows (``rows[k]``: process k's, in order).

    With N rows over W processes, N >= W: process k takes rows k, k + W, ... of the concatenation
    (floor or ceil of N / W each), and its local mean loss is scaled by m_k W / N, so that the
    data-parallel average of the gradients is that of the mean over the N rows. 0 < N < W: every
    process takes all N rows at factor 1 (W equal gradients; the batch-mean baseline over W
    copies of each row is the N rows' mean). N = 0: nothing, factor 1."""
    every = [row for process in rows for row in process]
    world = len(rows)
    if len(every) >= world:
        mine = every[rank::world]
        return mine, len(mine) * world / len(every)
    return every, 1.0


@dataclass
class Sample:
    """One sampled response: the prompt's text (what a labeller sees) and tokens, the response's
    tokens as they are scored and its text (cut at the first EOS)."""

    prompt: str
    prompt_ids: list[int]
    response_ids: list[int]
    response: str


def load_prompts(config: DataConfig, tokenizer) -> list[dict[str, Any]]:
    """The prompts of ``--dataset`` (a column ``prompt``: strings or chat messages) as rows
    ``{"prompt": text, "prompt_ids": tokens}``: the text is what a labeller sees (the user message
    of a single-turn prompt, else ``role: content`` paragraphs), the tokens the chat template with
    the generation prompt. Prompts over ``--max_prompt_length`` tokens are dropped (logged)."""
    raw = load_source(config.dataset, config.dataset_split)
    if "prompt" not in raw.column_names:
        raise ValueError(
            f"--dataset {config.dataset}: online training needs a 'prompt' column "
            f"(strings or chat messages); got columns {raw.column_names}"
        )
    prompts = [
        Prompt.from_value(value, f"{config.dataset} row {i}")
        for i, value in enumerate(raw["prompt"])
    ]
    ids = prompt_token_ids(tokenizer, [p.chat() for p in prompts])
    limit = config.max_prompt_length
    rows = [
        {"prompt": p.text, "prompt_ids": t}
        for p, t in zip(prompts, ids)
        if limit is None or len(t) <= limit
    ]
    if len(rows) < len(prompts):
        logger.warning(
            "dropped %d of %d prompts over --max_prompt_length %s",
            len(prompts) - len(rows),
            len(prompts),
            limit,
        )
    if not rows:
        raise ValueError(f"--dataset {config.dataset}: no prompts left")
    return rows


def collate_prompts(rows: list[dict[str, Any]]) -> dict[str, list]:
    """The Trainer's batches of prompts: ``{"prompt": [text], "prompt_ids": [tokens]}``."""
    return {"prompt": [r["prompt"] for r in rows], "prompt_ids": [r["prompt_ids"] for r in rows]}


def labeller_from(config: OnlineConfig, client=None) -> Labeller:
    """The labeller ``--labeller`` names; a judge is checked reachable before any sampling."""
    if config.labeller is None:
        raise ValueError(
            "no labeller: pass --labeller judge (with --judge_model and "
            "--judge_base_url) or --labeller module:function"
        )
    if config.labeller == "judge":
        check_reachable(config.judge, client)
        return JudgeLabeller(config.judge, client)
    return CallableLabeller(config.labeller)


class OnlineELBOKTOTrainer(ELBOKTOTrainer):
    """:class:`ELBOKTOTrainer` whose batches are prompts: every micro-step samples, labels and
    then takes the ELBO-KTO step on the labelled samples (module docstring).

    Args:
        model: the policy.
        args: OnlineConfig (its mask_token_id settled: the sampler needs it).
        labeller: what labels the samples (:mod:`elbokto.labellers`).
        ref_model: the frozen reference (None with a PEFT policy); a precomputed table cannot
            serve samples that do not exist yet.
        collator: pads the labelled samples (default: the tokenizer's pad token, attention mask).
        **kwargs: to the Trainer: train_dataset (rows of :func:`load_prompts`),
            processing_class (the tokenizer: required, responses are decoded for the labeller),
            callbacks, ...
    """

    # Narrower than ELBOKTOTrainer's: __init__ takes an OnlineConfig and requires the tokenizer.
    args: OnlineConfig
    processing_class: PreTrainedTokenizerBase

    def __init__(
        self,
        model: nn.Module,
        args: OnlineConfig,
        labeller: Labeller,
        ref_model: nn.Module | None = None,
        *,
        collator: PreferenceCollator | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(args, OnlineConfig):
            raise ValueError(f"args must be an OnlineConfig, got {type(args).__name__}")
        if kwargs.get("processing_class") is None:
            raise ValueError(
                "processing_class: pass the tokenizer (samples are decoded for the labeller)"
            )
        kwargs.setdefault("data_collator", collate_prompts)
        super().__init__(model, args, ref_model=ref_model, **kwargs)
        if self.is_fsdp_enabled and args.threshold is not None:
            raise ValueError(
                "--threshold with FSDP: every sampler forward gathers the sharded "
                "weights, so all processes must run the same number of them, and "
                "threshold decoding stops each early at its own step; sample with "
                "the fixed schedule (no --threshold) or use DDP"
            )
        tokenizer = self.processing_class
        self.collator = collator or PreferenceCollator(tokenizer.pad_token_id or 0)
        self.generation, self.sampler = sampler_for(model, args.generation, args.block_size)
        assert args.output_dir is not None  # TrainingArguments.__post_init__ sets it
        folder = Path(args.output_dir) / "online"
        rank = self.args.process_index
        self.labels = LabelStore(labeller, folder, rank)
        self.samples_file = folder / f"samples-rank{rank}.jsonl"
        self.base_objective = self.objective
        # The loop's own metrics are host numbers (counts, seconds): floats until logging, where
        # they cross to the device once. A device tensor made from each per micro-step would be
        # a host-to-device copy that waits for the queued backward (a host sync) per metric.
        self._online_metrics: defaultdict[str, list[float]] = defaultdict(list)
        self._warned_balance = False
        self._loss_factor = 1.0  # this process's share of the step's rows (share_rows)
        self._micro = (-1, 0)  # (optimizer step, micro-batch within it) of the last micro-step

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch=None
    ) -> torch.Tensor:
        """One micro-step on a batch of :func:`collate_prompts` (lists of prompts, not tensors):
        sample, label, then the ELBO-KTO step on the labelled samples."""
        start = time.perf_counter()
        step = self.state.global_step
        self._micro = (step, self._micro[1] + 1 if self._micro[0] == step else 0)
        samples = self.sample(model, inputs["prompt"], inputs["prompt_ids"])
        sampled = time.perf_counter()
        labels = self.labels([(s.prompt, s.response) for s in samples])
        labelled = time.perf_counter()
        kept = [(s, label) for s, (label, _) in zip(samples, labels) if label.desirable is not None]
        mine = (self._rows(kept), len(samples) - len(kept), sum(stored for _, stored in labels))
        # The loop's one exchange between processes: every process's labelled rows and counts,
        # whence the global class counts (lambda_D is a number of the loss config) and each
        # process's share of the rows.
        every = [mine] if self.args.world_size == 1 else gather_object([mine])
        n_d = sum(row["desirable"] for rows, _, _ in every for row in rows)
        n_u = sum(len(rows) for rows, _, _ in every) - n_d
        dropped = sum(d for _, d, _ in every)
        stored = sum(s for _, _, s in every)
        self.objective = replace(
            self.base_objective,
            loss=replace(self.base_objective.loss, lambda_d=self._lambda_d(n_d, n_u)),
        )
        if n_d + n_u == 0:
            logger.warning(
                "step %d: no sample got a label (%d dropped): nothing to learn from", step, dropped
            )
        by_process = [rows for rows, _, _ in every]
        rows, self._loss_factor = share_rows(by_process, self.args.process_index)
        loss = super().training_step(model, self._collate(rows), num_items_in_batch)
        trained = time.perf_counter()
        total = n_d + n_u + dropped
        for name, value in (
            ("online/desirable_rate", n_d / max(n_d + n_u, 1)),
            ("online/judge_errors", dropped),
            ("online/stored", stored / max(total, 1)),
            ("online/lambda_d", self.objective.loss.lambda_d),
            ("time/sampling", sampled - start),
            ("time/labelling", labelled - sampled),
            ("time/training", trained - labelled),
        ):
            self._online_metrics[name].append(value)
        self._log_samples(samples, labels)
        return loss

    @torch.no_grad()
    def sample(
        self, model: nn.Module, prompts: list[str], prompt_ids: list[list[int]]
    ) -> list[Sample]:
        """``num_samples_per_prompt`` responses to each prompt from the current policy, in eval
        mode. The sampler's seed is a function of (seed, micro-step, process), so a resumed run
        samples what the interrupted one did."""
        # A DDP wrapper would broadcast buffers at every forward, a collective that processes
        # sampling different numbers of steps (threshold decoding) would not all join. FSDP's
        # forwards gather the weights: there the wrapped model samples (see __init__).
        policy = model.module if isinstance(model, DistributedDataParallel) else model
        was_training = policy.training
        policy.eval()
        n = self.args.num_samples_per_prompt
        ids = [p for p in prompt_ids for _ in range(n)]
        step_seed = (
            (self.args.seed * 1_000_003 + self._micro_step()) * 4099 + self.args.process_index
        ) % 2**63
        tokens = self.sampler(
            policy,
            ids,
            replace(self.generation, seed=step_seed),
            pad_token_id=self.processing_class.pad_token_id or 0,
        )
        policy.train(was_training)
        eos = self.processing_class.eos_token_id
        texts = decode_responses(self.processing_class, tokens, eos)
        samples = []
        for i, (row, text) in enumerate(zip(tokens.tolist(), texts)):
            if not self.args.online_keep_padding and eos in row:
                row = row[: row.index(eos) + 1]
            samples.append(Sample(prompts[i // n], ids[i], row, text))
        return samples

    def _micro_step(self) -> int:
        """The micro-step's index over the run: optimizer step x accumulation + micro-batch. A
        resume starts at an optimizer step, so it counts as the interrupted run did."""
        step, micro = self._micro
        return step * self.args.gradient_accumulation_steps + micro

    def _lambda_d(self, n_desirable: int, n_undesirable: int) -> float:
        """lambda_D of this step under --online_balance (the counts are the global batch's)."""
        lambda_d, lambda_u = self.base_objective.loss.lambda_d, self.base_objective.loss.lambda_u
        balanced = balanced_lambda_d(n_desirable, n_undesirable, lambda_d, lambda_u)
        if self.args.online_balance == "adjust":
            return balanced
        if balanced != lambda_d and not self._warned_balance:
            self._warned_balance = True
            logger.warning(
                "step %d: lambda_D n_D / (lambda_U n_U) = %g * %d / (%g * %d) is "
                "outside KTO's [1, 4/3] (lambda_d %.4g would fit; --online_balance "
                "adjust does it every step); warned once",
                self.state.global_step,
                lambda_d,
                n_desirable,
                lambda_u,
                n_undesirable,
                balanced,
            )
        return lambda_d

    def _rows(self, kept: list[tuple[Sample, Label]]) -> list[dict[str, Any]]:
        """The collator's rows of the labelled samples; uid (the key of their draws) is unique per
        (micro-step, process, sample), so every sample gets fresh draws."""
        first = (
            (self._micro_step() * self.args.world_size + self.args.process_index)
            * self.args.per_device_train_batch_size
            * self.args.num_samples_per_prompt
        )
        return [
            {
                "input_ids": s.prompt_ids + s.response_ids,
                "prompt_length": len(s.prompt_ids),
                "response_length": len(s.response_ids),
                "desirable": label.desirable,
                "uid": first + i,
            }
            for i, (s, label) in enumerate(kept)
        ]

    def _collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The padded batch of the rows; without any, an empty batch (:meth:`compute_loss`)."""
        if rows:
            return self.collator(rows)
        empty = torch.zeros(0, dtype=torch.long)
        return {
            "input_ids": torch.zeros(0, 1, dtype=torch.long),
            "prompt_lengths": empty,
            "response_lengths": empty,
            "uid": empty,
            "desirable": torch.zeros(0, dtype=torch.bool),
        }

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if inputs["input_ids"].shape[0]:
            loss, out = super().compute_loss(model, inputs, True, num_items_in_batch)
            loss = loss * self._loss_factor  # share_rows: 1.0 with one process
            return (loss, out) if return_outputs else loss
        # No process has a labelled row (share_rows gives every process one when any has): all
        # take this path, the baseline's all-reduce included, and add nothing.
        empty = torch.zeros(0, device=self.args.device)
        config = self.objective.loss
        kl = kl_baseline(empty, empty) if config.baseline == "kl" else None
        loss, _ = compute_loss(config, empty, empty, empty.bool(), kl)
        loss = loss + sum((p * 0).sum() for p in model.parameters() if p.requires_grad)
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's logs with the loop's metrics of a training log: each the mean over the
        micro-steps since the last log (and the processes), every micro-step weighing the same,
        an empty one included."""
        if self._online_metrics and not any(k.startswith("eval_") for k in logs):
            names = sorted(self._online_metrics)
            values = self._online_metrics
            totals = torch.tensor(
                [[sum(values[name]), len(values[name])] for name in names],
                dtype=torch.float64,
                device=self.args.device,
            )
            totals = self.accelerator.reduce(totals, reduction="sum")
            logs.update({name: total / n for name, (total, n) in zip(names, totals.tolist())})
            self._online_metrics.clear()
        super().log(logs, start_time)

    def _log_samples(self, samples: list[Sample], labels: list[tuple[Label, bool]]) -> None:
        append_lines(
            self.samples_file,
            [
                json.dumps(
                    {
                        "step": self.state.global_step,
                        "rank": self.args.process_index,
                        "prompt": s.prompt,
                        "response": s.response,
                        "desirable": label.desirable,
                        "verdict": label.verdict,
                        "error": label.error,
                        "stored": stored,
                    },
                    ensure_ascii=False,
                )
                for s, (label, stored) in zip(samples, labels)
            ],
        )


def train_online(
    model_cfg,
    data_cfg: DataConfig,
    config: OnlineConfig,
    resume_from_checkpoint: str | bool | None = None,
    labeller: Labeller | None = None,
) -> OnlineELBOKTOTrainer:
    """`elbokto train --online`: prompts -> policy and frozen reference -> the online loop; saves
    the policy to output_dir. ``labeller`` replaces the one ``--labeller`` names."""
    from elbokto.models import load_model, prepare_policy
    from elbokto.run import _reference, _settle_model_fields, tokenizer_for

    assert config.output_dir is not None  # TrainingArguments.__post_init__ sets it
    if config.should_save:
        durable.recover(config.output_dir)
    resume_from_checkpoint = resume_checkpoint(config.output_dir, resume_from_checkpoint)
    labeller = labeller or labeller_from(config)
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    prompts = load_prompts(data_cfg, tokenizer)
    policy = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer)
    config = _settle_model_fields(config, policy, tokenizer)
    reference = _reference(policy, model_cfg, config, tokenizer)
    policy = prepare_policy(policy, model_cfg)
    trainer = OnlineELBOKTOTrainer(
        policy,
        config,
        labeller,
        ref_model=reference,
        collator=PreferenceCollator.from_config(data_cfg, tokenizer),
        train_dataset=prompts,
        processing_class=tokenizer,
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model()
    return trainer
