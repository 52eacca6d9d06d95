"""``fused_lm_head``: a model's own forward scored at its head, against the model's logits, and
the head left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from devices import DEVICE, MODEL_BACKEND, on_device
from elbokto_kernels import fused_elbo, fused_lm_head


class TinyLM(nn.Module):
    """Embedding, one mixing layer, a (biased) linear head: logits [C, L, V]."""

    def __init__(self, vocab=29, width=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=True)

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_the_head_scores_the_models_own_forward():
    model = on_device(TinyLM())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 29, (3, 6), generator=g)
    mask = torch.rand(3, 6, generator=g) < 0.5
    weights = torch.rand(3, generator=g) + 0.5
    ids, mask, weights = on_device(ids, mask, weights)
    targets = ids.masked_fill(~mask, -100)
    want = fused_elbo(model(ids), targets, weights=weights, backend="torch")
    want_grads = torch.autograd.grad(want.sum(), list(model.parameters()))
    with fused_lm_head(model.head, targets, weights=weights, backend=MODEL_BACKEND) as result:
        logits = model(ids)
    assert logits.shape == (3, 6, 0) and len(result) == 1
    torch.testing.assert_close(result[0], want, rtol=1e-5, atol=1e-5)
    got_grads = torch.autograd.grad(result[0].sum(), list(model.parameters()))
    for got, expected in zip(got_grads, want_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert "forward" not in model.head.__dict__  # the class's forward again


def test_a_previous_instance_forward_and_hooks_come_back_exactly():
    """accelerate's hooks (and others) install an instance ``forward``: it is put back as it was,
    and the module's hooks are neither removed nor duplicated."""
    head = nn.Linear(8, 11)
    installed = head.forward  # a bound method stored on the instance, as a hook would
    head.forward = installed
    calls = []
    handle = head.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    targets = torch.randint(0, 11, (1, 4))
    with fused_lm_head(head, targets, backend="torch") as result:
        head(torch.randn(1, 4, 8))
    assert head.__dict__["forward"] is installed
    assert calls == ["pre"] and len(result) == 1  # the hooks ran, around the fused call
    head(torch.randn(1, 4, 8))
    assert calls == ["pre", "pre"]
    handle.remove()
    with pytest.raises(RuntimeError):
        with fused_lm_head(head, targets, backend="torch"):
            raise RuntimeError("the model failed")
    assert head.__dict__["forward"] is installed  # restored on errors too


def test_a_head_with_adapters_is_refused():
    class Adapted(nn.Linear):
        pass

    with pytest.raises(ValueError, match="needs a plain nn.Linear head, got Adapted"):
        with fused_lm_head(Adapted(4, 5), torch.zeros(1, 2, dtype=torch.long)):
            pass


def test_a_scaled_head():
    """A model that scales its head's logits (LLaDA's scale_logits: 1 / sqrt(d_model)) is scored
    on the scaled logits: logit_scale folds the factor into the hidden states and the bias."""
    model = on_device(TinyLM())
    scale = 16 ** -0.5
    g = torch.Generator().manual_seed(2)
    ids = on_device(torch.randint(0, 29, (2, 5), generator=g))
    targets = ids.masked_fill(on_device(torch.rand(2, 5, generator=g) < 0.4), -100)
    want = fused_elbo(model(ids) * scale, targets, backend="torch")
    with fused_lm_head(model.head, targets, logit_scale=scale, backend=MODEL_BACKEND) as result:
        model(ids) * scale
    torch.testing.assert_close(result[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, fused_elbo(model(ids), targets, backend="torch"))
