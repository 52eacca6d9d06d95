"""The drop-in examples (examples/) against stand-ins of the public codebases' loss functions:
equal loss and gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MASK_ID, tiny_gemma

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from elbo_kto_loss import elbo_kto_loss  # noqa: E402
from mdlm_loss import mdlm_loss  # noqa: E402


def mdlm_loss_standin(model, noised, input_ids, masked, loss_weights, maskable, norm):
    """What an MDLM trainer's loss computes from full logits (as dllm's MDLMTrainer does after
    masking): token cross-entropy x per-token weights x masked, normalised, summed."""
    logits = model(input_ids=noised).logits
    nll = F.cross_entropy(logits.transpose(1, 2).float(), input_ids, reduction="none")
    weights = loss_weights if loss_weights.dim() == 2 else loss_weights[:, None]
    nll = nll * weights * masked
    batch = input_ids.shape[0]
    if norm == "token":
        nll = nll / maskable.sum().clamp_min(1)
    elif norm == "sequence":
        nll = nll / (maskable.sum(-1, keepdim=True).clamp_min(1) * batch)
    else:
        nll = nll / batch
    return nll.sum()


@pytest.mark.parametrize("norm", ["token", "sequence", "batch"])
@pytest.mark.parametrize("per_position", [False, True], ids=["w(t)", "per-position"])
def test_mdlm_loss_equals_the_trainers(norm, per_position):
    model = tiny_gemma()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, MASK_ID, (4, 10), generator=g)
    # Prompts of 3 tokens, responses of 7, 5, 6 and 2 (then padding).
    position = torch.arange(10)
    maskable = (position >= 3) & (position < 3 + torch.tensor([7, 5, 6, 2])[:, None])
    t = torch.rand(4, generator=g) * 0.999 + 1e-3
    masked = (torch.rand(4, 10, generator=g) < t[:, None]) & maskable
    noised = ids.masked_fill(masked, MASK_ID)
    weights = (1 / t)[:, None].expand(4, 10).clone() if per_position else 1 / t
    params = [p for p in model.parameters() if p.requires_grad]
    want = mdlm_loss_standin(model, noised, ids, masked, weights, maskable, norm)
    want_grads = torch.autograd.grad(want, params)
    got = mdlm_loss(model, noised, ids, masked, weights, maskable, norm=norm, backend="torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g_got, g_want in zip(torch.autograd.grad(got, params), want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)


def test_mdlm_loss_refuses_an_unknown_norm():
    with pytest.raises(ValueError, match="norm must be 'token', 'sequence' or 'batch'"):
        mdlm_loss(
            tiny_gemma(),
            torch.zeros(1, 2, dtype=torch.long),
            torch.zeros(1, 2, dtype=torch.long),
            torch.ones(1, 2, dtype=torch.bool),
            torch.ones(1),
            torch.ones(1, 2, dtype=torch.bool),
            norm="mean",
        )


def elbo_kto_loss_standin(
    model,
    input_ids,
    masks,
    completion_lengths,
    ref_elbo,
    desirable,
    mask_token_id,
    beta,
    lambda_d,
    lambda_u,
):
    """The authors' ELBO-KTO loss as their trainer computes it: one forward per draw, the mean
    log-probability over each example's masked tokens times its response length, the mean over
    the draws, then KTO with the batch-mean baseline."""
    terms = []
    for k in range(masks.shape[1]):
        mask = masks[:, k]
        logits = model(input_ids=input_ids.masked_fill(mask, mask_token_id)).logits
        per_example = []
        for b in range(input_ids.shape[0]):
            rows = mask[b].nonzero()[:, 0]
            nll = F.cross_entropy(logits[b, rows].float(), input_ids[b, rows], reduction="none")
            per_example.append(-nll.mean())
        terms.append(completion_lengths.float() * torch.stack(per_example))
    r = torch.stack(terms).mean(0) - ref_elbo
    s = beta * (r - r.detach().mean())
    v = torch.where(desirable, lambda_d * torch.sigmoid(s), lambda_u * torch.sigmoid(-s))
    return (torch.where(desirable, lambda_d, lambda_u) - v).mean()


def test_elbo_kto_loss_equals_the_authors():
    model = tiny_gemma()
    g = torch.Generator().manual_seed(4)
    B, K, L, prompt = 4, 3, 12, 4
    ids = torch.randint(0, MASK_ID, (B, L), generator=g)
    lengths = torch.tensor([8, 6, 8, 5])
    levels = torch.minimum(torch.randint(1, 9, (B, K), generator=g), lengths[:, None])
    masks = torch.zeros(B, K, L, dtype=torch.bool)
    for b in range(B):  # draw k masks l_k positions of the response, without replacement
        for k in range(K):
            chosen = torch.randperm(int(lengths[b]), generator=g)[: int(levels[b, k])]
            masks[b, k, prompt + chosen] = True
    ref = torch.randn(B, generator=g) * 3 - 30
    desirable = torch.tensor([True, False, False, True])
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(mask_token_id=MASK_ID, beta=0.5, lambda_d=1.0, lambda_u=1.5)
    want = elbo_kto_loss_standin(model, ids, masks, lengths, ref, desirable, **kwargs)
    want_grads = torch.autograd.grad(want, params)
    got = elbo_kto_loss(model, ids, masks, lengths, ref, desirable, backend="torch", **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g_got, g_want in zip(torch.autograd.grad(got, params), want_grads):
        torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
