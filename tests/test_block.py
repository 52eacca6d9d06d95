"""Block-diffusion scoring: the one-pass [x_t ; x_0] forward equals one forward per block and copy
on [clean prefix ; noisy block], and models that cannot run it are refused with the reason."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import MASK_ID, Wrapper, tiny_batch, tiny_block_model
from torch import nn

from elbokto import ELBOKTOObjective, LossConfig, MCConfig, sample_draws
from elbokto.block import (
    block_diffusion_mask,
    check_block_attention,
    check_block_model,
    resolve_block_size,
)
from elbokto.estimate import elbo_estimate

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_step import per_block_elbo  # noqa: E402  (the benchmark's baseline, in float64 here)


def block_draws(batch, block_size, estimator="fixed_count"):
    config = MCConfig(estimator=estimator, n_t=2, block_size=block_size, eps=0.0)
    return sample_draws(
        config,
        batch["prompt_lengths"],
        batch["response_lengths"],
        batch["input_ids"].shape[1],
        uids=batch["uid"],
        seed=5,
    )


class SubclassedHead(nn.Linear):
    """Not a plain Linear: the estimate takes the full-logits path (fused_elbo)."""


def grads_of(model, value):
    return torch.autograd.grad(value, [p for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize(
    "block_size, attn, head",
    [(4, "sdpa", "fused-head"), (5, "eager", "fused-head"), (4, "eager", "logits")],
)
def test_one_pass_equals_per_block_forwards(block_size, attn, head):
    """Values and parameter gradients; prompts of 3..5 tokens end inside blocks, padding, and a
    partial last block (T = 12 with b = 5)."""
    model = tiny_block_model(attn_implementation=attn)
    if head == "logits":
        model.lm_head.__class__ = SubclassedHead
    batch = tiny_batch(seed=2)
    draws = block_draws(batch, block_size, "bernoulli" if block_size == 5 else "fixed_count")
    assert draws.mask.any()
    upstream = torch.randn(4)
    one_pass = elbo_estimate(
        model,
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
        backend="torch",
    )
    reference = per_block_elbo(model, batch, draws, MASK_ID, torch.float64)
    torch.testing.assert_close(one_pass.double(), reference, rtol=1e-5, atol=1e-5)
    got = grads_of(model, (one_pass * upstream).sum())
    want = grads_of(model, (reference * upstream.double()).sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)


def test_chunked_objective_equals_one_pass():
    """mc_chunk_size slices the per-position block weights with their copies."""
    policy, reference = tiny_block_model(seed=1), tiny_block_model(seed=2)
    batch = tiny_batch(seed=3)
    results = []
    for chunk in (None, 3):
        objective = ELBOKTOObjective(
            mc=MCConfig(n_t=2, block_size=4),
            loss=LossConfig(beta=1.0),
            mc_chunk_size=chunk,
            backend="torch",
        )
        policy.zero_grad()
        out = objective(policy, batch, reference=reference)
        out.loss.backward()
        results.append((out.loss, out.policy_elbo, [p.grad.clone() for p in policy.parameters()]))
    (loss, elbo, grads), (loss_c, elbo_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(elbo_c, elbo)
    for g, g_c in zip(grads, grads_c):
        torch.testing.assert_close(g_c, g, rtol=1e-4, atol=1e-6)


def test_mask_structure():
    """Noisy block k: its own noisy block and the clean blocks < k; clean block k: clean <= k."""
    allowed = block_diffusion_mask(5, 2)  # blocks {0,1} {2,3} {4}
    noisy, clean = slice(0, 5), slice(5, 10)
    same = torch.tensor([[i // 2 == j // 2 for j in range(5)] for i in range(5)])
    before = torch.tensor([[j // 2 < i // 2 for j in range(5)] for i in range(5)])
    assert torch.equal(allowed[noisy, noisy], same)
    assert torch.equal(allowed[noisy, clean], before)
    assert torch.equal(allowed[clean, clean], same | before)
    assert not allowed[clean, noisy].any()


def test_capability_probe():
    for attn in ("sdpa", "eager"):
        check_block_attention(tiny_block_model(attn_implementation=attn), 4)

    class IgnoresMask(Wrapper):
        """Drops the custom mask: the model's own (causal) attention runs instead."""

        def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, position_ids=position_ids, **kwargs)

    with pytest.raises(ValueError, match="does not apply a custom 4D attention mask"):
        check_block_attention(IgnoresMask(tiny_block_model()), 4)


def test_models_that_cannot_take_the_mask_are_refused():
    batch = tiny_batch()
    draws = block_draws(batch, 4)
    for implementation, match in (
        ("flex_attention", "BlockMask.*sdpa"),
        ("flash_attention_2", "custom 4D attention mask"),
    ):
        model = tiny_block_model()
        model.config._attn_implementation = implementation
        with pytest.raises(ValueError, match=match):
            elbo_estimate(model, batch["input_ids"], draws, mask_token_id=MASK_ID)
    sliding = tiny_block_model()
    sliding.config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding-window"):
        check_block_model(sliding)

    class NoPositions(nn.Module):
        config = SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, input_ids, attention_mask=None):
            raise AssertionError("never called")

    with pytest.raises(ValueError, match="takes no position_ids"):
        check_block_model(NoPositions())
    with pytest.raises(ValueError, match="shift_logits"):
        elbo_estimate(
            tiny_block_model(), batch["input_ids"], draws, mask_token_id=MASK_ID, shift_logits=True
        )


def test_block_size_from_the_config_or_the_flag(caplog):
    sdar = SimpleNamespace(model_type="sdar", block_size=4)
    assert resolve_block_size(sdar, None) == 4
    assert resolve_block_size(sdar, 8) == 8 and "differs" in caplog.text
    assert resolve_block_size(SimpleNamespace(model_type="llada2_moe"), 32) == 32
    with pytest.raises(ValueError, match=r"pass --block_size \(llada2 was trained with 32\)"):
        resolve_block_size(SimpleNamespace(model_type="llada2_moe"), None)
    # The family record says which models are block diffusion (model type, in any case).
    assert resolve_block_size(SimpleNamespace(model_type="SDAR", block_size=4), None) == 4
    # Another model type's block_size field means something else: never read.
    assert resolve_block_size(SimpleNamespace(model_type="big_bird", block_size=64), None) is None
