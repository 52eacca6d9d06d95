"""Block-diffusion models (LLaDA2.0, SDAR, BD3LM-style): every block scored in ONE forward.

A block-diffusion LM generates block by block: block k (positions [k b, (k + 1) b), counted from
position 0 of the sequence) is denoised bidirectionally while it attends to the clean blocks
before it. Its ELBO is the block ELBO (draws: :mod:`elbokto.draws`, ``MCConfig.block_size``)

    B = sum_k E[ (1/t_k) sum_{masked response positions i of block k}
                 log p(y_i | noisy block k, clean blocks < k) ].

Scoring it block by block would take one forward per block and copy on [clean prefix ; noisy
block]. As in BD3-LM and LLaDA2.0's training (dFactory), one forward per copy does all blocks at
once: the input is the 2T tokens ``[x_t ; x_0]`` (noisy copy, then the clean sequence) with
position ids ``[0..T-1, 0..T-1]`` and the attention mask (query -> key)

    noisy position of block k -> noisy positions of block k     (bidirectional within the block)
                              -> clean positions of blocks < k  (the clean prefix)
    clean position of block k -> clean positions of blocks <= k (block-causal)

so the noisy position i of block k sees exactly what it sees in the per-block forward: the hidden
states of the clean half are those of the prefix, computed block-causally, and the noisy block
attends to them and to itself. Padded keys (``attention_mask`` 0) are never attended; a padded
query attends to itself only (so no attention row is empty). Only the noisy half's masked rows
are scored: the clean half is context, its rows never reach the LM head.

A model qualifies when it takes ``position_ids`` and a custom 4D mask, which native transformers
models do with ``eager`` (additive float mask) and ``sdpa`` (boolean mask) attention: a 4D mask
goes through ``transformers.masking_utils`` untouched. Not supported here: flash attention (no
arbitrary masks), ``flex_attention`` (it would need a ``BlockMask``; flex has no backward on CPU,
so that path could not be tested on CPU here: load the model with ``attn_implementation='sdpa'``,
as dFactory trains LLaDA2.0), and sliding-window layers (a 4D mask replaces their window).
:func:`check_block_attention` checks a model end to end before training.

Sampling block by block, with a KV cache of the finished blocks: :mod:`elbokto.block_sampling`
(its mask is the clean-clean quadrant's, block-causal).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import cast

import torch
from torch import Tensor, nn

from elbokto.families import family_of

__all__ = [
    "block_diffusion_mask",
    "block_model_inputs",
    "check_block_attention",
    "check_block_model",
    "resolve_block_size",
]

logger = logging.getLogger(__name__)

MASK_ATTENTION = ("eager", "sdpa")


def resolve_block_size(model_config, block_size: int | None) -> int | None:
    """The block size to score with: the flag, else the config's (SDAR), else None (whole response).

    Raises ValueError for a block-diffusion family (:class:`elbokto.families.ModelFamily`'s
    ``block_diffusion``) without either: scoring it with the whole-response ELBO would score a
    model it is not.
    """
    family = family_of(model_config)
    field = family.block_size_field if family else None
    from_config = getattr(model_config, field, None) if field else None
    if block_size is not None:
        if from_config is not None and from_config != block_size:
            logger.warning(
                "block_size %d differs from the model config's %s = %d",
                block_size,
                field,
                from_config,
            )
        return block_size
    if from_config is not None:
        return int(from_config)
    if family is not None and family.block_diffusion:
        trained = (
            f" ({family.name} was trained with {family.trained_block_size})"
            if family.trained_block_size
            else ""
        )
        raise ValueError(
            f"{family.name} is a block-diffusion model and its config has no block size: pass "
            f"--block_size{trained}"
        )
    return None


def input_embeddings(model: nn.Module) -> nn.Embedding:
    """The model's input embedding table, from transformers' ``get_input_embeddings()``."""
    # nn.Module types its attributes as Tensor | Module: the method is looked up for its type.
    get = cast(Callable[[], nn.Embedding], model.get_input_embeddings)
    return get()


def check_block_model(model: nn.Module) -> str:
    """The attention implementation (``'eager'`` or ``'sdpa'``) of a model that can run the
    block-diffusion forward; ValueError with the reason otherwise. Static and cheap: the
    numerical check is :func:`check_block_attention`."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation == "flex_attention":
        raise ValueError(
            f"{name} runs flex_attention: block-diffusion scoring passes a 4D tensor "
            "mask, not a BlockMask; load the model with attn_implementation='sdpa' "
            "(--attn_implementation sdpa)"
        )
    if implementation not in MASK_ATTENTION:
        raise ValueError(
            f"{name} runs attention with {implementation!r}: block-diffusion scoring "
            f"needs a custom 4D attention mask, which only {MASK_ATTENTION} take in "
            "transformers; load the model with attn_implementation='sdpa'"
        )
    if "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ValueError(
            f"{name} has sliding-window layers: a custom 4D mask would replace their "
            "window, so block-diffusion scoring cannot be exact for it"
        )
    parameters = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if "position_ids" not in parameters and not takes_any:
        raise ValueError(
            f"{name}.forward takes no position_ids: block-diffusion scoring gives the "
            "noisy and the clean half the same positions [0..T-1]"
        )
    return implementation


def block_diffusion_mask(
    seq_len: int, block_size: int, device: torch.device | str = "cpu"
) -> Tensor:
    """bool [2T, 2T]: True where a query of ``[x_t ; x_0]`` may attend a key (module docstring).

    The clean-clean quadrant ``[T:, T:]`` is the block-causal mask of block-by-block generation.
    """
    position = torch.arange(2 * seq_len, device=device)
    noisy = position < seq_len
    block = (position % max(seq_len, 1)) // block_size
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    q_block, k_block = block[:, None], block[None, :]
    own_block = q_noisy & k_noisy & (q_block == k_block)
    clean_prefix = q_noisy & ~k_noisy & (k_block < q_block)
    block_causal = ~q_noisy & ~k_noisy & (k_block <= q_block)
    return own_block | clean_prefix | block_causal


def block_model_inputs(
    noisy: Tensor,
    clean: Tensor,
    block_size: int,
    attention_mask: Tensor | None,
    attn_implementation: str,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """Keyword arguments of the one-pass block-diffusion forward.

    Args:
        noisy: int64 [C, T], the noisy copies x_t.
        clean: int64 [C, T], their clean sequences x_0.
        block_size: b; the last block may be partial (T need not be a multiple of b: with right
            padding that block ends in padding keys, which nothing attends).
        attention_mask: [C, T] (1 = real token) or None (no padding).
        attn_implementation: ``'sdpa'`` (boolean mask, True = attend) or ``'eager'`` (additive
            mask: 0 or the lowest ``dtype`` value).
        dtype: the eager mask's dtype (the model's activations).

    Returns:
        ``input_ids`` int64 [C, 2T] = [x_t ; x_0], ``position_ids`` int64 [C, 2T] =
        [0..T-1, 0..T-1], ``attention_mask`` [C or 1, 1, 2T, 2T] (1 in front without padding).
    """
    num_copies, seq_len = noisy.shape
    allowed = block_diffusion_mask(seq_len, block_size, noisy.device)[None]
    if attention_mask is not None:
        real = attention_mask.bool().repeat(1, 2)  # [C, 2T]: both halves share the padding
        eye = torch.eye(2 * seq_len, dtype=torch.bool, device=noisy.device)
        allowed = (allowed & real[:, None, :]) | eye
    position_ids = torch.arange(seq_len, device=noisy.device).repeat(2)
    return {
        "input_ids": torch.cat([noisy, clean], dim=1),
        "position_ids": position_ids.expand(num_copies, -1),
        "attention_mask": format_mask(allowed, attn_implementation, dtype),
    }


def format_mask(allowed: Tensor, attn_implementation: str, dtype: torch.dtype) -> Tensor:
    """bool [N, Q, K] -> the 4D [N, 1, Q, K] mask that ``attn_implementation`` adds or applies."""
    if attn_implementation == "sdpa":
        return allowed[:, None]
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )[:, None]
    raise ValueError(
        f"attn_implementation={attn_implementation!r}; expected one of {MASK_ATTENTION}"
    )


@torch.no_grad()
def check_block_attention(model: nn.Module, block_size: int) -> None:
    """Checks that ``model`` applies the block-diffusion mask as :mod:`elbokto.block` builds it.

    Two forwards on a random two-block input, in the model's current mode: the noisy second
    block's logits from the one-pass ``[x_t ; x_0]`` forward must equal those of a forward on
    ``[clean block 0 ; noisy block 1]`` with the block-causal mask. A model that ignores the
    custom mask, reads it with another convention (e.g. 1 = attend as a float), or overrides it
    in its own code fails with ValueError; so does one that :func:`check_block_model` refuses.
    """
    implementation = check_block_model(model)
    embeddings = input_embeddings(model)
    vocab, dtype = embeddings.num_embeddings, embeddings.weight.dtype
    device = embeddings.weight.device
    generator = torch.Generator().manual_seed(0)
    clean = torch.randint(0, vocab, (1, 2 * block_size), generator=generator).to(device)
    noisy = torch.randint(0, vocab, (1, 2 * block_size), generator=generator).to(device)
    one_pass = (
        model(
            **block_model_inputs(noisy, clean, block_size, None, implementation, dtype),
            use_cache=False,
        )
        .logits[0, block_size : 2 * block_size]
        .float()
    )
    seq_len = 2 * block_size
    causal = block_diffusion_mask(seq_len, block_size, device)[seq_len:, seq_len:][None]
    per_block = (
        model(
            input_ids=torch.cat([clean[:, :block_size], noisy[:, block_size:]], 1),
            attention_mask=format_mask(causal, implementation, dtype),
            position_ids=torch.arange(seq_len, device=device)[None],
            use_cache=False,
        )
        .logits[0, block_size:]
        .float()
    )
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    error = float((one_pass - per_block).abs().max())
    if not error <= tolerance * max(1.0, float(per_block.abs().max())):
        raise ValueError(
            f"{type(model).__name__} does not apply a custom 4D attention mask the "
            f"way transformers' {implementation} attention does: the one-pass "
            "block-diffusion forward and a forward on [clean prefix ; noisy block] "
            f"differ by {error:.3g} in the logits. Load it with "
            "attn_implementation='sdpa', or score it without --block_size"
        )
