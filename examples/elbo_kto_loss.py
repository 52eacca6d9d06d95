"""The ELBO-KTO loss of a training script that draws its own masks (as the authors' ELBO-KTO code
does: K draws per example, each masking exactly l_k response tokens, B_theta = the mean over the
draws of (response length / l_k) x the sum of the masked tokens' log-probabilities), computed by
elbokto-kernels: the B x K noisy copies go through ONE forward, and the LM head scores only the
masked rows (no [B, L, V] logits per draw).

    loss = elbo_kto_loss(model, input_ids, masks, completion_lengths, ref_elbo, desirable,
                         mask_token_id=mask_token_id, beta=0.1)

Run this file for a check on a tiny random model: ``python examples/elbo_kto_loss.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from elbokto_kernels import fused_lm_head


def policy_elbo(
    model: nn.Module,
    input_ids: Tensor,
    masks: Tensor,
    completion_lengths: Tensor,
    *,
    mask_token_id: int,
    backend: str = "auto",
) -> Tensor:
    """B_theta: float32 [B], the mean over the K draws of (response length / l_k) x the masked
    tokens' log-probability sum.

    input_ids: int64 [B, L] clean sequences; masks: bool [B, K, L], draw k of example b (exactly
    l_k > 0 masked response tokens); completion_lengths: [B] response lengths."""
    batch, draws, length = masks.shape
    counts = masks.sum(-1).clamp_min(1)  # l_k, [B, K]
    weights = (completion_lengths[:, None].float() / counts / draws).reshape(-1)  # per copy
    copies = input_ids.repeat_interleave(draws, dim=0)  # [B * K, L], draws of b contiguous
    masks = masks.reshape(batch * draws, length)
    sample_index = torch.arange(batch, device=input_ids.device).repeat_interleave(draws)
    with fused_lm_head(model, copies, masks, weights, sample_index, batch, backend=backend) as elbo:
        model(input_ids=copies.masked_fill(masks, mask_token_id))
    return elbo[0]


def elbo_kto_loss(
    model: nn.Module,
    input_ids: Tensor,
    masks: Tensor,
    completion_lengths: Tensor,
    ref_elbo: Tensor,
    desirable: Tensor,
    *,
    mask_token_id: int,
    beta: float = 0.1,
    lambda_d: float = 1.0,
    lambda_u: float = 1.0,
    baseline: bool = True,
    backend: str = "auto",
) -> Tensor:
    """mean(lambda - v): v = lambda_d sigmoid(s) for desirable examples, lambda_u sigmoid(-s) for
    the others, s = beta (r - z0), r = B_theta - B_ref, z0 the batch mean of r without gradient
    (0 when ``baseline`` is False). Under torch.distributed, take z0 over the global batch."""
    r = (
        policy_elbo(
            model,
            input_ids,
            masks,
            completion_lengths,
            mask_token_id=mask_token_id,
            backend=backend,
        )
        - ref_elbo
    )
    z0 = r.detach().mean() if baseline else r.new_zeros(())
    s = beta * (r - z0)
    value = torch.where(desirable, lambda_d * torch.sigmoid(s), lambda_u * torch.sigmoid(-s))
    lambdas = torch.where(desirable, lambda_d, lambda_u)
    return (lambdas - value).mean()


if __name__ == "__main__":
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
    B, K, L, prompt = 4, 8, 24, 8
    ids = torch.randint(0, 100, (B, L))
    levels = torch.randint(1, L - prompt + 1, (B, K))
    order = torch.rand(B, K, L - prompt).argsort(-1)
    masks = torch.zeros(B, K, L, dtype=torch.bool)
    masks[..., prompt:] = order < levels[..., None]
    loss = elbo_kto_loss(
        model,
        ids,
        masks,
        torch.full((B,), L - prompt),
        torch.full((B,), -60.0),
        torch.tensor([True, False, True, False]),
        mask_token_id=100,
    )
    loss.backward()
    print(f"ELBO-KTO loss {loss.item():.6f}")
