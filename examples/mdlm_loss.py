"""The masked-diffusion (MDLM / LLaDA SFT) loss of a dLLM trainer, computed at the model's LM head
by elbokto-kernels: the same loss and gradients, without the [B, L, V] logits.

A trainer such as dllm's ``MDLMTrainer.compute_loss`` masks each sequence at a random time t,
runs the model, takes the token cross-entropy of the masked positions weighted by w(t) (the
scheduler's weight, or 1), and normalises by the response tokens of the batch ("token"), of each
sequence ("sequence") or by the batch size ("batch"). Its forward and loss (the steps after the
masking) become one call::

    loss = mdlm_loss(model, noised_input_ids, input_ids, masked_mask, loss_weights,
                     labels != -100, attention_mask=attention_mask, norm="token")

Run this file for a check on a tiny random model: ``python examples/mdlm_loss.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from elbokto_kernels import fused_lm_head


def mdlm_loss(
    model: nn.Module,
    noised_input_ids: Tensor,
    input_ids: Tensor,
    masked: Tensor,
    loss_weights: Tensor,
    maskable: Tensor,
    *,
    attention_mask: Tensor | None = None,
    norm: str = "token",
    backend: str = "auto",
) -> Tensor:
    """Scalar loss: sum over masked positions of w * NLL(token), normalised as ``norm`` says.

    Args:
        model: a transformers-style model with ``get_output_embeddings()``: a linear head, a
            LoRA-wrapped one, or LLaDA's tied embedding (its forward is run as it is, with its
            own hooks; its config's logit scale and soft-cap are applied).
        noised_input_ids: int64 [B, L], the masked inputs; input_ids: [B, L] clean tokens.
        masked: bool [B, L], the positions the noise masked (scored).
        loss_weights: float [B] (per sequence, e.g. w(t)) or [B, L].
        maskable: bool [B, L], the response positions (``labels != -100``): the normaliser.
        norm: "token", "sequence" or "batch".
    """
    batch = input_ids.shape[0]
    if norm == "token":
        scale = maskable.sum().clamp_min(1)
    elif norm == "sequence":
        scale = maskable.sum(-1).clamp_min(1) * batch
        scale = scale[:, None] if loss_weights.dim() == 2 else scale
    elif norm == "batch":
        scale = torch.tensor(float(batch), device=input_ids.device)
    else:
        raise ValueError(f"norm must be 'token', 'sequence' or 'batch', got {norm!r}")
    weights = loss_weights.float() / scale
    with fused_lm_head(model, input_ids, masked, weights, backend=backend) as elbo:
        model(input_ids=noised_input_ids, attention_mask=attention_mask)
    return -elbo[0].sum()


if __name__ == "__main__":
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=101,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    ids = torch.randint(0, 100, (4, 24))
    maskable = torch.arange(24) >= 8  # a prompt of 8 tokens, then the response
    maskable = maskable.expand(4, 24)
    t = torch.rand(4) * 0.999 + 1e-3
    masked = (torch.rand(4, 24) < t[:, None]) & maskable
    noised = ids.masked_fill(masked, 100)
    loss = mdlm_loss(model, noised, ids, masked, 1 / t, maskable)
    logits = model(input_ids=noised).logits
    nll = F.cross_entropy(logits.transpose(1, 2), ids, reduction="none")
    plain = (nll * (1 / t)[:, None] * masked).sum() / maskable.sum()
    print(f"fused {loss.item():.6f}, plain {plain.item():.6f}")
