"""LLaDA-style reverse-process sampler: fill a fully masked response, a few tokens per step.

Each prompt gets a *canvas*: the prompt, then ``gen_length`` mask tokens. Prompts of different
lengths are LEFT-padded, so every canvas ends at the same column and the response is the last
``gen_length`` columns of all of them. The response is split into ``gen_length / block_length``
blocks filled left to right (semi-autoregressive); each block gets ``steps / num_blocks`` steps.
At each step the model scores the whole canvas, every still-masked position of the current block
proposes a token (argmax, or a Gumbel-max sample at ``temperature > 0``), and the ``n`` proposals
with the highest confidence are committed, ``n`` following LLaDA's schedule (the block's masks
split evenly over its steps, the remainder to the first steps). Committed tokens are never
revisited; prompt tokens and later blocks are never touched. The output length is fixed: decode
up to the first EOS with :func:`decode_responses`.

With ``threshold`` set (Fast-dLLM's confidence-aware parallel decoding), a step also commits every
masked position of the block whose confidence exceeds the threshold, so a block can finish in fewer
steps than its share; the sampler moves on as soon as the block is full in every row. A step still
commits at least the schedule's count (one per step when ``steps == gen_length``, which is
Fast-dLLM's rule: the most confident token plus all those above the threshold).

Block-diffusion models (LLaDA2.0, SDAR) are sampled by :mod:`elbokto.block_sampling`, which runs
the same steps over the model's own blocks with a KV cache.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from elbokto.renames import warn_renamed

__all__ = ["SamplingConfig", "decode_responses", "generate"]


@dataclass
class SamplingConfig:
    """How :func:`generate` runs the reverse process. Defaults: the response as one block, one
    token per step, greedy, LLaDA's low-confidence remasking."""

    gen_length: int = field(default=64, metadata={"help": "Response tokens generated per prompt."})
    steps: int | None = field(
        default=None,
        metadata={
            "help": "Model calls in total (at most, with threshold); a multiple of "
            "gen_length / block_length and at most gen_length. Default: gen_length "
            "(one token per step)."
        },
    )
    block_length: int | None = field(
        default=None,
        metadata={
            "help": "Semi-autoregressive block size: the response is filled block by block, "
            "left to right. Must divide gen_length. Default: gen_length (one "
            "block)."
        },
    )
    temperature: float = field(
        default=0.0,
        metadata={
            "help": "0 = greedy (argmax); > 0 = sample from softmax(logits / temperature) "
            "with the Gumbel-max trick in float64."
        },
    )
    remasking: Literal["low_confidence", "random"] = field(
        default="low_confidence",
        metadata={
            "help": "Which proposals a step commits: 'low_confidence' keeps those with the "
            "highest probability of the proposed token (the rest are remasked); "
            "'random' keeps a uniformly random subset."
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Confidence-threshold parallel decoding (Fast-dLLM): each step also "
            "commits every masked position of the current block whose confidence "
            "exceeds this value, in (0, 1]; low_confidence remasking only. "
            "None: the fixed schedule."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampler's torch.Generator."})
    mask_token_id: int | None = field(
        default=None,
        metadata={
            "help": "Mask token id (LLaDA 126336, Dream 151666); default: the model's "
            "config.mask_token_id."
        },
    )
    shift_logits: bool = field(
        default=False,
        metadata={"help": "The model's output at position p predicts token p + 1 (Dream)."},
    )

    def __post_init__(self) -> None:
        if self.block_length is None:
            self.block_length = self.gen_length
        if self.steps is None:
            self.steps = self.gen_length
        for name in ("gen_length", "steps", "block_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an integer >= 1")
        if self.gen_length % self.block_length:
            raise ValueError(
                f"gen_length={self.gen_length} is not a multiple of "
                f"block_length={self.block_length}"
            )
        if self.steps % self.num_blocks:
            raise ValueError(
                f"steps={self.steps} is not a multiple of the number of blocks "
                f"{self.num_blocks} (gen_length={self.gen_length} / "
                f"block_length={self.block_length})"
            )
        if self.steps > self.gen_length:
            raise ValueError(
                f"steps={self.steps} > gen_length={self.gen_length}: some steps would "
                f"unmask nothing; expected steps <= gen_length"
            )
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not self.temperature >= 0
        ):
            raise ValueError(f"temperature={self.temperature!r}; expected a float >= 0")
        if self.remasking not in ("low_confidence", "random"):
            raise ValueError(f"remasking={self.remasking!r}; expected 'low_confidence' or 'random'")
        if self.threshold is not None:
            if (
                isinstance(self.threshold, bool)
                or not isinstance(self.threshold, (int, float))
                or not 0 < self.threshold <= 1
            ):
                raise ValueError(
                    f"threshold={self.threshold!r}; expected None or a float in (0, 1]"
                )
            if self.remasking != "low_confidence":
                raise ValueError(
                    f"threshold={self.threshold} needs remasking='low_confidence' "
                    f"(the confidence it compares is the model's probability), got "
                    f"remasking={self.remasking!r}"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed={self.seed!r}; expected an integer")
        if self.mask_token_id is not None and (
            isinstance(self.mask_token_id, bool)
            or not isinstance(self.mask_token_id, int)
            or self.mask_token_id < 0
        ):
            raise ValueError(
                f"mask_token_id={self.mask_token_id!r}; expected None or an integer >= 0"
            )
        if not isinstance(self.shift_logits, bool):
            raise ValueError(f"shift_logits={self.shift_logits!r}; expected a bool")

    # steps and block_length are None only until __post_init__ fills them in: these properties
    # read them as the ints they then are.
    @property
    def resolved_block_length(self) -> int:
        """``block_length`` after ``__post_init__`` (``gen_length`` when it was None)."""
        if self.block_length is None:
            raise ValueError(
                "block_length=None set after construction; None means gen_length only "
                "when a SamplingConfig is built"
            )
        return self.block_length

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.resolved_block_length

    @property
    def steps_per_block(self) -> int:
        """The steps of each block of ``resolved_block_length``: ``steps / num_blocks``."""
        if self.steps is None:
            raise ValueError(
                "steps=None set after construction; None means gen_length only when a "
                "SamplingConfig is built"
            )
        return self.steps // self.num_blocks


@torch.no_grad()
def generate(
    model: nn.Module, prompts: Sequence[Sequence[int]], config: SamplingConfig, *, pad_token_id: int
) -> Tensor:
    """Generate ``config.gen_length`` tokens after each prompt: int64 [B, gen_length], all unmasked.

    Args:
        model: a transformers-style masked diffusion LM (LLaDA, Dream, ...) in the mode the caller
            wants (``model.eval()`` is the caller's job). Called as ``model(input_ids=canvas)`` when
            all prompts have the same length, else ``model(input_ids=canvas,
            attention_mask=mask)`` with ``canvas`` int64 [B, P + gen_length] and ``mask`` int64
            [B, P + gen_length] (0 on the left padding). Its output is logits [B, T, V] or has
            ``.logits``. A model that ignores ``attention_mask`` lets the response attend to the
            padding: call it with equal-length prompts (e.g. one prompt at a time). A transformers
            decoder made bidirectional with ``use_bidirectional_attention`` also needs
            ``config.is_causal = False``, or its padded calls get a causal mask.
        prompts: B >= 1 token-id sequences (lists or 1-D tensors), each non-empty (at least BOS),
            of any lengths; P is the longest.
        config: steps, blocks, temperature, remasking, threshold, seed, mask token, logit shift.
        pad_token_id: fills the left padding (masked out, so its value does not matter to a model
            that honours ``attention_mask``).

    Positions are left to the model (``position_ids`` are not passed): with rotary embeddings the
    attention scores depend only on relative positions, so left padding changes nothing.

    Sampling at ``temperature`` T > 0 takes ``argmax(logits / T + G)`` with G standard Gumbel noise,
    in float64 (the same law as LLaDA's ``argmax(exp(logits) / (-log u)^T)``, not the same draws).
    Confidences are float64 ``softmax(logits)`` at the proposed token (as in LLaDA, logits not
    divided by T), or uniform numbers for ``remasking='random'``. All randomness comes from one
    ``torch.Generator`` seeded with ``config.seed`` on the model's device: the same call gives the
    same tokens, but a prompt's sample depends on its batch companions when T > 0 or the remasking
    is random.
    """
    mask_id = sampler_mask_id(model, config)
    rows = prompt_rows(prompts)
    width = max(row.numel() for row in rows)
    canvas, real = build_canvas(
        rows,
        [width - row.numel() for row in rows],
        width + config.gen_length,
        mask_id,
        pad_token_id,
        device_of(model),
    )
    generator = torch.Generator(device=canvas.device).manual_seed(config.seed)
    model_kwargs: dict[str, Tensor | bool] = (
        {} if bool(real.all()) else {"attention_mask": real.long()}
    )
    if isinstance(model, PreTrainedModel):
        model_kwargs["use_cache"] = False  # every step is a fresh full pass: a cache is waste
    block_length = config.resolved_block_length
    schedule = schedules([block_length] * len(rows), config.steps_per_block)
    # With a shift, position p reads the output at p - 1 (start >= 1: prompts are non-empty).
    offset = int(config.shift_logits)
    for block in range(config.num_blocks):
        start = canvas.shape[1] - config.gen_length + block * block_length
        end = start + block_length
        fill_block(
            canvas[:, start:end],
            partial(_canvas_logits, model, canvas, model_kwargs, start - offset, end - offset),
            schedule,
            mask_id,
            config,
            generator,
        )
    return canvas[:, -config.gen_length :]


def decode_responses(tokenizer, tokens: Tensor, eos_token_id: int | None = None) -> list[str]:
    """Text of each generated row, cut before its first EOS; special tokens are skipped.

    Args:
        tokenizer: anything with ``decode(ids, skip_special_tokens=True)`` (a transformers
            tokenizer).
        tokens: int [B, L], e.g. the output of :func:`generate`.
        eos_token_id: where to cut; default ``tokenizer.eos_token_id``; None there too: no cut.
    """
    if eos_token_id is None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    texts = []
    for row in tokens.tolist():
        if eos_token_id is not None and eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
    return texts


def sampler_mask_id(model: nn.Module, config: SamplingConfig) -> int:
    """The config's mask token id, else the model config's; ValueError when neither has one."""
    mask_id = config.mask_token_id
    if mask_id is None:
        mask_id = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mask_id is None:
        raise ValueError(
            f"no mask token id: set SamplingConfig.mask_token_id, or "
            f"{type(model).__name__}.config.mask_token_id"
        )
    return mask_id


def prompt_rows(prompts: Sequence[Sequence[int]]) -> list[Tensor]:
    """The prompts as int64 1-D CPU tensors; ValueError for no prompt or an empty one."""
    if len(prompts) == 0:
        raise ValueError("prompts is empty; expected at least one prompt")
    rows = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in prompts]
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token (BOS)")
    return rows


def build_canvas(
    rows: list[Tensor],
    pads: Sequence[int],
    width: int,
    mask_id: int,
    pad_id: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """int64 [B, width] canvases: ``pads[i]`` padding tokens, prompt i, then mask tokens; and
    bool [B, width], True on the prompt and the masks (False on the left padding)."""
    canvas = torch.full((len(rows), width), mask_id, dtype=torch.int64)
    for i, (row, pad) in enumerate(zip(rows, pads)):
        canvas[i, :pad] = pad_id
        canvas[i, pad : pad + row.numel()] = row
    real = torch.arange(width) >= torch.tensor(pads)[:, None]
    return canvas.to(device), real.to(device)


def _canvas_logits(
    model: nn.Module, canvas: Tensor, model_kwargs: dict, start: int, end: int
) -> Tensor:
    """The model's logits [B, end - start, V] on the whole canvas, columns [start, end)."""
    out = model(input_ids=canvas, **model_kwargs)
    return (out if isinstance(out, Tensor) else out.logits)[:, start:end]


def _transfer_schedule(num_masks: int, steps: int) -> list[int]:
    """LLaDA's get_num_transfer_tokens: ``num_masks`` split over ``steps``, remainder first."""
    base, remainder = divmod(num_masks, steps)
    return [base + 1] * remainder + [base] * (steps - remainder)


def schedules(num_masks: Sequence[int], steps: int) -> Tensor:
    """int64 [B, steps] on the CPU: row i's ``num_masks[i]`` split over ``steps``."""
    return torch.tensor([_transfer_schedule(n, steps) for n in num_masks], dtype=torch.int64)


def fill_block(
    block_tokens: Tensor,
    block_logits: Callable[[], Tensor],
    schedule: Tensor,
    mask_id: int,
    config: SamplingConfig,
    generator: torch.Generator,
) -> None:
    """Runs one block's steps: commits proposals into its mask positions, in place.

    Args:
        block_tokens: int64 [B, N], the block's columns of the canvas (a view: commits land in
            the canvas). Positions that are not ``mask_id`` are never changed.
        block_logits: returns the model's logits [B, N, V] for the block on the current canvas.
        schedule: int64 [B, S] on the CPU: row i commits ``schedule[i, s]`` of its masks at step
            s (the most confident ones), and with ``config.threshold`` also every mask above it.
        mask_id, config, generator: as in :func:`generate`.
    """
    for counts in schedule.unbind(1):
        if config.threshold is not None:
            # Threshold decoding can fill a block early: then its remaining steps are skipped.
            if not bool((block_tokens == mask_id).any()):
                break
        elif not bool(counts.any()):
            continue  # no row commits at this step (its masks were fewer than the steps)
        proposal, confidence = _propose(block_logits().to(block_tokens.device), config, generator)
        masked = block_tokens == mask_id
        confidence = confidence.masked_fill(~masked, float("-inf"))
        # Row i keeps the first counts[i] of a top-k sorted by confidence. A top-k that reaches
        # committed (-inf) positions, as it can with a threshold, must not rewrite them.
        chosen = confidence.topk(int(counts.max()), dim=1).indices
        keep = (torch.arange(chosen.shape[1]) < counts[:, None]).to(chosen.device)
        commit = torch.zeros_like(masked).scatter_(1, chosen, keep) & masked
        if config.threshold is not None:
            commit |= confidence > config.threshold
        block_tokens.copy_(torch.where(commit, proposal, block_tokens))


def _propose(
    logits: Tensor, config: SamplingConfig, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """From logits [B, N, V]: proposed tokens int64 [B, N] and their float64 confidences [B, N]."""
    logits = logits.double()
    if config.temperature == 0:
        proposal = logits.argmax(-1)
    else:
        uniform = torch.rand(
            logits.shape, dtype=torch.float64, device=logits.device, generator=generator
        )
        gumbel = -torch.log(-torch.log(uniform))
        proposal = (logits / config.temperature + gumbel).argmax(-1)
    if config.remasking == "random":
        confidence = torch.rand(
            proposal.shape, dtype=torch.float64, device=logits.device, generator=generator
        )
    else:
        confidence = logits.softmax(-1).gather(-1, proposal.unsqueeze(-1)).squeeze(-1)
    return proposal, confidence


def device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def __getattr__(name: str):
    # The old name, for one release: it shadowed transformers' GenerationConfig (DESIGN §8).
    if name == "GenerationConfig":
        warn_renamed("elbokto.sampling.GenerationConfig", "SamplingConfig")
        return SamplingConfig
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
