"""Block-by-block sampling of block-diffusion LMs (SDAR, LLaDA2.0, BD3-LM) with an exact KV cache.

A block-diffusion model attends block-causally: a position sees its own block and every block
before it, blocks being ``[k b, (k + 1) b)`` counted from position 0 of the sequence, as in
training (:mod:`elbokto.block`). So once a block is final its keys and values never change, and
the sampler keeps them in a transformers ``DynamicCache``:

1. prefill: one forward over the prompts' whole blocks (block-causal mask) fills the cache;
2. each response block is denoised over its steps as in :func:`elbokto.sampling.generate` (the
   same proposals, schedule, remasking, threshold and random draws), every step one forward of
   the block alone, attending to the cache and to itself; the cache is cropped back after each
   of these calls, since the block's keys and values are not final yet;
3. once the block is full, one forward of it appends its keys and values to the cache.

Without the cache (``use_cache=False``) each step runs the whole prefix with the block-causal
mask instead: the same logits up to rounding, so the same tokens (``tests/test_block_sampling.py``
checks it), at the cost of attending over the whole canvas every step. :func:`check_block_cache`
tells whether a model's cache behaves (remote code may keep a cache of its own); `elbokto
generate` falls back to the cache-free computation when it does not.

**Layout.** Each row's prompt starts at position 0 of its own sequence, so its blocks are those
of training. A prompt that ends inside a block shares that block with the start of its response,
as in SDAR's and LLaDA2.0's samplers: the prompt's tail stays fixed and the block's masks are
denoised around it. Rows are LEFT-padded by whole blocks, which keeps every row's blocks on the
same canvas columns and puts every row's first response block in the same column block F (the
last block of the longest prompts); padding keys are never attended. With prompt lengths
``n_i`` and block size b, row i gets ``(F - n_i // b) b`` padding columns and its response starts
at column ``F b + n_i % b``. Whole blocks are generated: when some prompt ends inside a block, the
batch runs one block more than ``gen_length / b`` and each row keeps its ``gen_length`` tokens.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from typing import cast

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PretrainedConfig

from elbokto.block import (
    check_block_attention,
    check_block_model,
    format_mask,
    input_embeddings,
    resolve_block_size,
)
from elbokto.sampling import (
    SamplingConfig,
    build_canvas,
    device_of,
    fill_block,
    generate,
    prompt_rows,
    sampler_mask_id,
    schedules,
)

__all__ = ["block_generate", "check_block_cache", "sampler_for"]

logger = logging.getLogger(__name__)


@torch.no_grad()
def block_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig,
    *,
    pad_token_id: int,
    use_cache: bool = True,
) -> Tensor:
    """Generate ``config.gen_length`` tokens after each prompt with a block-diffusion model:
    int64 [B, gen_length], all unmasked.

    Args:
        model: a transformers block-diffusion LM with eager or sdpa attention that applies a
            custom 4D attention mask (:func:`elbokto.block.check_block_attention`), in the mode
            the caller wants (``model.eval()``). It is called with ``input_ids``, absolute
            ``position_ids``, a 4D block-causal ``attention_mask``, ``use_cache`` and the cache
            (as ``cache``, else ``past_key_values``; ``logits_to_keep`` when its forward takes
            it).
        prompts: B >= 1 non-empty token-id sequences, of any lengths.
        config: as for :func:`elbokto.sampling.generate`, with ``block_length`` the model's block
            size b: each block of b positions gets ``steps / (gen_length / b)`` steps (a block
            shared with a prompt splits its fewer masks over as many steps, skipping the steps
            where no row has anything to commit). ``shift_logits`` is refused.
        pad_token_id: fills the left padding (never attended).
        use_cache: keep the finished blocks in a ``DynamicCache`` (module docstring); False runs
            the whole prefix every step (same tokens, more compute).

    Raises ValueError when the model does not append to the cache it is passed (use
    ``use_cache=False``). Randomness: one ``torch.Generator`` seeded with ``config.seed``, drawn
    in the same order with or without the cache.
    """
    if config.shift_logits:
        raise ValueError(
            "shift_logits=True: block-diffusion models score each position at its "
            "own output; a shifted head is not supported by the block sampler"
        )
    mask_id = sampler_mask_id(model, config)
    size = config.resolved_block_length
    rows = prompt_rows(prompts)
    first = max(row.numel() // size for row in rows)  # F, the first response block
    tails = [row.numel() % size for row in rows]
    num_blocks = -(-(first * size + max(tails) + config.gen_length) // size)
    canvas, real = build_canvas(
        rows,
        [(first - row.numel() // size) * size for row in rows],
        num_blocks * size,
        mask_id,
        pad_token_id,
        device_of(model),
    )
    generator = torch.Generator(device=canvas.device).manual_seed(config.seed)
    prefix = _Prefix(model, canvas, real, size, use_cache)
    prefix.extend(first * size)
    steps = config.steps_per_block
    for block in range(first, num_blocks):
        start, end = block * size, (block + 1) * size
        masks = [size - tail for tail in tails] if block == first else [size] * len(rows)
        fill_block(
            canvas[:, start:end],
            partial(prefix.logits, start, end),
            schedules(masks, steps),
            mask_id,
            config,
            generator,
        )
        if block + 1 < num_blocks:
            prefix.extend(end)
    columns = torch.tensor([first * size + tail for tail in tails])[:, None] + torch.arange(
        config.gen_length
    )
    return canvas.gather(1, columns.to(canvas.device))


@torch.no_grad()
def check_block_cache(model: nn.Module, block_size: int) -> None:
    """ValueError unless sampling ``model`` with the KV cache gives the logits of the cache-free
    computation: a random batch of three blocks (one row left-padded by a block) is scored block
    by block both ways, in the model's current mode. A model whose code keeps its own cache, or
    that builds its own mask when a cache is passed, fails with the reason."""
    embeddings = input_embeddings(model)
    device, dtype = embeddings.weight.device, embeddings.weight.dtype
    generator = torch.Generator().manual_seed(0)
    canvas = torch.randint(
        0, embeddings.num_embeddings, (2, 3 * block_size), generator=generator
    ).to(device)
    real = torch.ones_like(canvas, dtype=torch.bool)
    real[1, :block_size] = False
    cached = _Prefix(model, canvas, real, block_size, use_cache=True)
    full = _Prefix(model, canvas, real, block_size, use_cache=False)
    cached.extend(block_size)
    error = scale = 0.0
    for start in (block_size, 2 * block_size):
        got = cached.logits(start, start + block_size).float()
        want = full.logits(start, start + block_size).float()
        error = max(error, float((got - want).abs().max()))
        scale = max(scale, float(want.abs().max()))
        cached.extend(start + block_size)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    if not error <= tolerance * max(1.0, scale):
        raise ValueError(
            f"{type(model).__name__} scores a block differently with a KV cache of "
            f"the blocks before it than without (logits differ by {error:.3g}): "
            "its code does not apply the 4D mask with a transformers DynamicCache"
        )


class _Prefix:
    """What the block being denoised attends to: the canvas columns before it.

    With ``use_cache`` the finished columns' keys and values sit in a ``DynamicCache`` and a
    block is scored by one forward of its own columns; without, by a forward over every column
    up to the block's end. Both use the block-causal mask over real (non-padding) keys and
    absolute positions (0 at each row's first prompt token)."""

    def __init__(
        self, model: nn.Module, canvas: Tensor, real: Tensor, block_size: int, use_cache: bool
    ) -> None:
        self.model, self.canvas, self.real, self.block_size = model, canvas, real, block_size
        self.positions = (real.long().cumsum(1) - 1).clamp(min=0)  # padding is on the left
        self.implementation = check_block_model(model)
        self.dtype = input_embeddings(model).weight.dtype
        # nn.Module types attributes as Tensor | Module: model.config is a transformers config.
        self.cache = (
            DynamicCache(config=cast(PretrainedConfig, model.config)) if use_cache else None
        )
        parameters = inspect.signature(model.forward).parameters
        # Logits are needed for the block's b columns only: V x (prefix length) would be waste.
        self.takes_logits_to_keep = "logits_to_keep" in parameters
        # transformers >= 5.24 names the cache argument `cache`; older and remote code do not.
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"

    def logits(self, start: int, end: int) -> Tensor:
        """Logits [B, end - start, V] of the columns [start, end) on the current canvas."""
        if self.cache is None:
            return self._forward(0, end, end - start)
        logits = self._forward(start, end, end - start)
        self._check_cached(end)
        self.cache.crop(-(end - start))  # the block is not final: its keys must not stay
        return logits

    def extend(self, end: int) -> None:
        """The columns before ``end`` are final: append those not cached yet to the cache."""
        if self.cache is None or end == self.cache.get_seq_length():
            return
        self._forward(self.cache.get_seq_length(), end, 1)
        self._check_cached(end)

    def _forward(self, start: int, end: int, keep: int) -> Tensor:
        """The model on columns [start, end) (the cache holds those before ``start``); logits
        [B, keep, V] of the last ``keep`` of them."""
        device = self.canvas.device
        block = torch.arange(end, device=device) // self.block_size
        key = torch.arange(end, device=device)
        query = key[start:end, None]
        allowed = (block[None, :] <= block[start:end, None]) & self.real[:, None, :end]
        allowed |= key[None, :] == query  # a padding query sees itself: no empty attention row
        extra: dict[str, int | DynamicCache] = (
            {"logits_to_keep": keep} if self.takes_logits_to_keep else {}
        )
        if self.cache is not None:
            extra[self.cache_argument] = self.cache
        out = self.model(
            input_ids=self.canvas[:, start:end],
            position_ids=self.positions[:, start:end],
            attention_mask=format_mask(allowed, self.implementation, self.dtype),
            use_cache=self.cache is not None,
            **extra,
        )
        return out.logits[:, -keep:]

    def _check_cached(self, end: int) -> None:
        assert self.cache is not None, "called after a forward with the cache only"
        if self.cache.get_seq_length() != end:
            raise ValueError(
                f"{type(self.model).__name__} holds {self.cache.get_seq_length()} "
                f"positions in the DynamicCache it was passed, expected {end}: its "
                "code does not append to a transformers cache (it may keep its "
                "own); sample it with use_cache=False"
            )


def sampler_for(model: nn.Module, config: SamplingConfig, block_size: int | None = None):
    """(config, sampler) for ``model``: :func:`elbokto.sampling.generate` as it is, or for a
    block-diffusion model (``block_size``, else its config's; :func:`resolve_block_size`)
    :func:`block_generate` over the model's own blocks, its mask handling checked as for
    training and its KV cache used when :func:`check_block_cache` finds it exact (else the
    cache-free computation, with a warning). The sampler is called as ``generate``."""
    block_size = resolve_block_size(model.config, block_size)
    if block_size is None:
        return config, generate
    if config.block_length not in (config.gen_length, block_size):
        raise ValueError(
            f"--block_length {config.block_length} differs from the model's block "
            f"size {block_size}: a block-diffusion model is sampled over its own "
            "blocks (leave --block_length out)"
        )
    config = replace(config, block_length=block_size)
    check_block_attention(model, block_size)
    try:
        check_block_cache(model, block_size)
    except ValueError as err:
        logger.warning("%s; sampling without a KV cache (same tokens, slower)", err)
        return config, partial(block_generate, use_cache=False)
    return config, block_generate
