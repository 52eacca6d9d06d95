"""elbo_estimate through real transformers models: the fused head equals full logits."""

import math
from types import SimpleNamespace

import pytest
import torch
from devices import DEVICE, MODEL_BACKEND, on_device
from distributed import TESTS, assert_every_rank_matched, torchrun
from tiny_models import MASK_ID, NextTokenLogits, tiny_batch, tiny_gemma
from torch import nn

from elbokto import MCConfig, sample_draws
from elbokto.estimate import elbo_estimate, noisy_copies


def unfused_elbo(model, input_ids, draws, attention_mask=None, shift=False):
    """Straightforward float64 scoring: full logits, log_softmax, gather, weighted sum."""
    noisy = noisy_copies(input_ids, draws, MASK_ID)
    out = model(input_ids=noisy, attention_mask=attention_mask[draws.sample_index])
    logits = out.logits if hasattr(out, "logits") else out
    if shift:
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)  # row p now scores token p
    logp = (
        torch.log_softmax(logits.double(), -1)
        .gather(-1, input_ids[draws.sample_index].unsqueeze(-1))
        .squeeze(-1)
    )
    per_copy = (logp * draws.mask).sum(1) * draws.weight.double()
    return torch.zeros(input_ids.shape[0], dtype=torch.float64, device=input_ids.device).index_add(
        0, draws.sample_index, per_copy
    )


def draws_for(batch, n_t=4):
    return sample_draws(
        MCConfig(n_t=n_t),
        batch["prompt_lengths"],
        batch["response_lengths"],
        batch["input_ids"].shape[1],
        uids=batch["uid"],
        seed=3,
    )


def grads_of(model, value):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(value, params, allow_unused=True)


@pytest.mark.parametrize("keep_logits", [False, True], ids=["recompute", "keep-logits"])
@pytest.mark.parametrize("softcap", [False, True], ids=["gemma", "gemma2-softcap"])
def test_fused_head_matches_full_logits(softcap, keep_logits):
    model, batch = on_device(tiny_gemma(softcap=softcap), tiny_batch())
    draws = draws_for(batch)
    upstream = torch.randn(4, device=DEVICE)
    fused = elbo_estimate(
        model,
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
        keep_logits=keep_logits,
        backend=MODEL_BACKEND,
    )
    ref = unfused_elbo(model, batch["input_ids"], draws, batch["attention_mask"])
    assert fused.dtype == torch.float32 and fused.shape == (4,)
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-5)
    got = grads_of(model, (fused * upstream).sum())
    want = grads_of(model, (ref * upstream.double()).sum())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-4, atol=1e-5)
    assert model.get_output_embeddings().forward.__func__ is nn.Linear.forward  # restored


def test_shift_logits_and_logits_path():
    inner, batch = on_device(tiny_gemma(seed=1), tiny_batch(seed=1))
    draws = draws_for(batch, n_t=2)
    direct = elbo_estimate(
        inner,
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
    )
    shifted = elbo_estimate(
        NextTokenLogits(inner),
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
        shift_logits=True,
    )
    torch.testing.assert_close(shifted, direct, rtol=1e-5, atol=1e-5)
    batch["prompt_lengths"][1] = 0  # a response at position 0: nothing scores its first token
    draws = draws_for(batch, n_t=2)
    with pytest.raises(RuntimeError, match="prompt of at least one token"):
        elbo_estimate(
            NextTokenLogits(inner),
            batch["input_ids"],
            draws,
            mask_token_id=MASK_ID,
            attention_mask=batch["attention_mask"],
            shift_logits=True,
        )


@pytest.mark.slow
def test_fused_head_under_fsdp2():
    """Two gloo ranks, FSDP2 (fully_shard): the head weight exists only inside its forward."""
    assert_every_rank_matched(torchrun(TESTS / "fsdp_worker.py"))


def test_fused_head_under_autocast_runs_in_the_autocast_dtype(monkeypatch):
    """Under autocast the LM head's GEMMs run in bf16, as an nn.Linear head would, and the ELBO
    matches the unfused model under the same autocast."""
    from elbokto_kernels import linear_elbo

    seen = []
    real = linear_elbo._gemm_rows

    def spy(hidden, index):  # the hidden states as the op takes them, after any autocast cast
        seen.append(hidden.dtype)
        return real(hidden, index)

    monkeypatch.setattr(linear_elbo, "_gemm_rows", spy)
    model = tiny_gemma()
    batch = tiny_batch()
    draws = draws_for(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = elbo_estimate(
            model,
            batch["input_ids"],
            draws,
            mask_token_id=MASK_ID,
            attention_mask=batch["attention_mask"],
            backend="torch",
        )
        ref = unfused_elbo(model, batch["input_ids"], draws, batch["attention_mask"])
    assert seen == [torch.bfloat16]
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused.double(), ref, rtol=1e-4, atol=1e-4)
    for g, w in zip(grads_of(model, fused.sum()), grads_of(model, ref.sum())):
        assert (g.double() - w.double()).abs().max() <= 3e-2 * w.abs().max()
    elbo_estimate(
        model,
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
        backend="torch",
    )
    assert seen[-1] == torch.float32  # outside autocast: the model's dtype


class _Recorder(nn.Module):
    """Uniform logits over the vocabulary; remembers the tokens and attention mask it was given."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask=None):
        self.seen, self.attention = input_ids, attention_mask
        return torch.zeros(*input_ids.shape, self.vocab)


def test_the_model_sees_exactly_the_drawn_copies():
    """Copy c is example c // K with its drawn positions replaced by the mask token (and nothing
    else changed); with uniform logits each masked position scores -log V, times its weight."""
    batch = tiny_batch(seed=3)
    draws = draws_for(batch, n_t=4)
    assert draws.mask.any() and not draws.mask.all()
    expected = batch["input_ids"].repeat_interleave(4, dim=0)
    expected[draws.mask] = MASK_ID
    assert torch.equal(noisy_copies(batch["input_ids"], draws, MASK_ID), expected)
    model = _Recorder(vocab=97)
    elbo = elbo_estimate(
        model,
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
        backend="torch",
    )
    assert torch.equal(model.seen, expected)
    assert torch.equal(model.attention, batch["attention_mask"].repeat_interleave(4, dim=0))
    per_copy = draws.weight.double() * draws.mask.sum(1) * -math.log(97)
    want = torch.zeros(4, dtype=torch.float64).index_add(0, draws.sample_index, per_copy)
    torch.testing.assert_close(elbo.double(), want, rtol=1e-6, atol=1e-6)


def test_llada_scale_logits_is_scored():
    """A model whose config says scale_logits (LLaDA's flag) multiplies its head's logits by
    1 / sqrt(d_model) after the head: the fused head scores those logits."""

    class ScaledLogits(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = SimpleNamespace(scale_logits=True, d_model=32)

        def get_output_embeddings(self):
            return self.inner.get_output_embeddings()

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
            return SimpleNamespace(logits=out.logits * 32**-0.5)

    model, batch = tiny_gemma(seed=2), tiny_batch(seed=2)
    draws = draws_for(batch, n_t=2)
    fused = elbo_estimate(
        ScaledLogits(model),
        batch["input_ids"],
        draws,
        mask_token_id=MASK_ID,
        attention_mask=batch["attention_mask"],
        backend="torch",
    )
    ref = unfused_elbo(ScaledLogits(model), batch["input_ids"], draws, batch["attention_mask"])
    torch.testing.assert_close(fused.double(), ref, rtol=1e-5, atol=1e-5)
