"""One-pass ELBO estimation: the B*K noisy copies of a batch through ONE batched forward.

For a transformers model the LM head is bypassed: while the model runs, its head computes
``fused_linear_elbo`` on the final hidden states of the masked rows (with its own weight, bias,
LoRA adapters and the config's logit scale and soft-cap) and hands the model an empty logits
tensor (:func:`elbokto_kernels.fused_lm_head`). Running inside the head's call is what keeps this
right under FSDP, where the head weight is only gathered during that call. Any other module that
returns logits, and a head the fused path cannot score exactly (said once in the log), goes
through ``fused_elbo``.

Block draws (``draws.block_size``) run the one-pass block-diffusion forward of
:mod:`elbokto.block` on [x_t ; x_0]; the clean half gets mask False, so none of its rows is scored.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping

import torch
from accelerate.utils import extract_model_from_parallel
from torch import Tensor, nn

from elbokto.block import block_model_inputs, check_block_model, input_embeddings
from elbokto.draws import Draws
from elbokto_kernels import fused_elbo, fused_lm_head, lm_head_unsupported
from elbokto_kernels.backends import Backend
from elbokto_kernels.grad_filter import FilterEps

logger = logging.getLogger(__name__)


def noisy_copies(input_ids: Tensor, draws: Draws, mask_token_id: int) -> Tensor:
    """int64 [C, T]: copy c is ``input_ids[sample_index[c]]`` with its drawn positions masked."""
    clean = input_ids[draws.sample_index]
    return clean.masked_fill(draws.mask, mask_token_id)


def elbo_estimate(
    model: nn.Module,
    input_ids: Tensor,
    draws: Draws,
    *,
    mask_token_id: int,
    attention_mask: Tensor | None = None,
    shift_logits: bool = False,
    keep_logits: bool = False,
    filter_eps: FilterEps = None,
    backend: Backend = "auto",
) -> Tensor:
    """Monte-Carlo ELBO of every example: float32 [B], differentiable w.r.t. the model.

    Args:
        model: a transformers model with a linear output embedding (fused head), or any module
            whose output is logits [C, T, V] or has ``.logits``.
        input_ids: int64 [B, T] clean sequences (prompt then response, padded).
        draws: from :func:`elbokto.sample_draws`; ``draws.mask`` is [C, T] with C = B*K, or a
            subset of the copies (``sample_index`` says whose they are).
        mask_token_id: the id that replaces masked tokens (LLaDA 126336, Dream 151666,
            LLaDA2.0 156895).
        attention_mask: optional [B, T] (1 = real token); repeated for every copy.
        shift_logits: the model's output at position p predicts token p + 1 (Dream). Not with
            block draws (block-diffusion models score the position itself).
        keep_logits: fused head only: keep the masked rows' float32 logits for the backward
            instead of recomputing them (see :func:`elbokto_kernels.fused_linear_elbo`).
        filter_eps: fused head only: gradient filtering of the LM head's backward (None: exact;
            a float or "auto"; see :func:`elbokto_kernels.fused_linear_elbo`).
        backend: kernel backend, see :func:`elbokto_kernels.fused_elbo`.
    """
    num_samples = input_ids.shape[0]
    noisy = noisy_copies(input_ids, draws, mask_token_id)
    targets = input_ids[draws.sample_index]
    mask = draws.mask
    if shift_logits:
        # The output at p - 1 scores token p: move targets and mask one place left.
        targets = torch.cat([targets[:, 1:], targets[:, :1]], dim=1)
        # Position 0 has no predecessor, so no output scores it: it must be prompt (checked on
        # the device, without a host sync).
        torch._assert_async(
            ~mask[:, 0].any(),
            "with shift_logits the response cannot start at "
            "position 0: every example needs a prompt of at least one token",
        )
        mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    copy_attention = None if attention_mask is None else attention_mask[draws.sample_index]
    weight = draws.weight
    # DDP / FSDP / DeepSpeed wrappers are called as they are (their hooks must run); the head and
    # the config are looked up on the wrapped model.
    inner = extract_model_from_parallel(model)
    inputs: Mapping[str, Tensor | None]
    if draws.block_size is None:
        inputs = {"input_ids": noisy, "attention_mask": copy_attention}
    else:
        if shift_logits:
            raise ValueError(
                "shift_logits is not supported with block draws: block-diffusion "
                "models (LLaDA2.0, SDAR) score each position itself"
            )
        inputs = block_model_inputs(
            noisy,
            input_ids[draws.sample_index],
            draws.block_size,
            copy_attention,
            check_block_model(inner),
            _dtype_of(inner),
        )
        # [x_t ; x_0]: the clean half is context only, never scored.
        targets, mask, weight = (
            torch.cat([x, torch.zeros_like(x)], dim=1) for x in (targets, mask, weight)
        )
    elbo_args = (targets, mask, weight, draws.sample_index, num_samples)
    problem = lm_head_unsupported(inner)
    if problem is not None:
        if callable(getattr(inner, "get_output_embeddings", None)):
            _say_unfused(type(inner).__name__, problem)
        out = model(**inputs)
        logits = out if isinstance(out, Tensor) else out.logits
        return fused_elbo(logits, *elbo_args, backend=backend)
    with fused_lm_head(
        inner, *elbo_args, keep_logits=keep_logits, filter_eps=filter_eps, backend=backend
    ) as result:
        model(**inputs, use_cache=False)
    if not result:
        raise RuntimeError(f"{type(model).__name__}'s forward never called its output embedding")
    return result[0]


@functools.lru_cache(maxsize=None)
def _say_unfused(model_name: str, problem: str) -> None:
    logger.warning(
        "%s: the LM head is not fused, its full logits are built (%s)", model_name, problem
    )


def _dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's activations: that of its input embedding."""
    return input_embeddings(model).weight.dtype
