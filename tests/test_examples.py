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
        mdlm_loss(tiny_gemma(), torch.zeros(1, 2, dtype=torch.long),
                  torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.bool),
                  torch.ones(1), torch.ones(1, 2, dtype=torch.bool), norm="mean")
