"""``fused_lm_head``: a model's own forward scored at its head, against the model's logits, and
the head left exactly as it was."""

from __future__ import annotations

import pytest
import torch
from devices import DEVICE, MODEL_BACKEND, on_device
from distributed import TESTS, assert_every_rank_matched, torchrun
from head_models import TinyLM, case, lora_tiny_lm
from torch import nn

from elbokto_kernels import fused_elbo, fused_lm_head, lm_head_unsupported


def _assert_exact(model, scored, ids, targets, weights, rtol=1e-5):
    """``scored`` (what fused_lm_head gave) equals fused_elbo of the model's own logits, value
    and gradients of every trainable parameter."""
    params = [p for p in model.parameters() if p.requires_grad]
    want = fused_elbo(model(ids), targets, weights=weights, backend="torch")
    torch.testing.assert_close(scored, want, rtol=rtol, atol=1e-5)
    assert scored.requires_grad == want.requires_grad
    if not want.requires_grad:  # e.g. merged adapters: nothing trainable is in the forward
        return want
    upstream = torch.rand(want.shape, generator=torch.Generator().manual_seed(9)).to(want)
    got_grads = torch.autograd.grad(scored, params, upstream)
    for got, expected in zip(got_grads, torch.autograd.grad(want, params, upstream)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    return want


@pytest.mark.parametrize("tied", [False, True], ids=["linear", "tied"])
def test_the_head_scores_the_models_own_forward(tied):
    model = on_device(TinyLM(tied=tied))
    ids, targets, weights = case(1)
    with fused_lm_head(model, targets, weights=weights, backend=MODEL_BACKEND) as result:
        logits = model(ids)
    assert logits.shape == (3, 6, 0) and len(result) == 1
    _assert_exact(model, result[0], ids, targets, weights)
    assert "forward" not in model.get_output_embeddings().__dict__  # the class's forward again
    assert model(ids).shape == (3, 6, 29)  # and F.linear is F.linear again


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


def test_a_head_that_computes_more_than_its_weight_is_refused():
    class Adapted(nn.Linear):
        pass

    assert "Adapted head" in lm_head_unsupported(Adapted(4, 5))
    with pytest.raises(ValueError, match="cannot score this head: a Adapted head"):
        with fused_lm_head(Adapted(4, 5), torch.zeros(1, 2, dtype=torch.long)):
            pass
    assert lm_head_unsupported(TinyLM()) is None and lm_head_unsupported(nn.Linear(2, 3)) is None


@pytest.mark.parametrize(
    "config",
    [
        {"scale_logits": True},
        {"logits_scaling": 3.0},
        {"final_logit_softcapping": 0.3},
        {"scale_logits": True, "final_logit_softcapping": 0.5},
    ],
    ids=str,
)
@pytest.mark.parametrize("tied", [False, True], ids=["linear", "tied"])
def test_the_logit_transforms_a_config_declares(config, tied):
    """Given the model, its config's scale (LLaDA's scale_logits, Granite's logits_scaling) and
    soft-cap (Gemma's) are applied as the model applies them to its own logits."""
    model = on_device(TinyLM(tied=tied, **config))
    ids, targets, weights = case(2)
    with fused_lm_head(model, targets, weights=weights, backend=MODEL_BACKEND) as result:
        model(ids)
    want = _assert_exact(model, result[0], ids, targets, weights)
    plain = fused_elbo(TinyLM(tied=tied).to(DEVICE)(ids), targets, weights=weights, backend="torch")
    assert not torch.allclose(want, plain, rtol=1e-3)  # the transform mattered
    with pytest.raises(ValueError, match="come from its config"):
        with fused_lm_head(model, targets, logit_scale=0.5):
            pass


def test_a_partitioned_weight_is_refused_not_scored():
    """ZeRO-3 leaves a parameter with no elements outside its module's gathered call."""
    head = nn.Linear(4, 5)
    head.weight = nn.Parameter(torch.empty(0))
    with pytest.raises(RuntimeError, match="partitioned"):
        with fused_lm_head(head, torch.zeros(1, 2, dtype=torch.long), backend="torch"):
            head(torch.randn(1, 2, 4))


def test_a_scaled_head():
    """A model that scales its head's logits (LLaDA's scale_logits: 1 / sqrt(d_model)) is scored
    on the scaled logits: logit_scale folds the factor into the hidden states and the bias."""
    model = on_device(TinyLM())
    scale = 16**-0.5
    g = torch.Generator().manual_seed(2)
    ids = on_device(torch.randint(0, 29, (2, 5), generator=g))
    targets = ids.masked_fill(on_device(torch.rand(2, 5, generator=g) < 0.4), -100)
    want = fused_elbo(model(ids) * scale, targets, backend="torch")
    with fused_lm_head(model.head, targets, logit_scale=scale, backend=MODEL_BACKEND) as result:
        model(ids) * scale
    torch.testing.assert_close(result[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(want, fused_elbo(model(ids), targets, backend="torch"))


def _lora_model(**lora):
    return on_device(lora_tiny_lm(pytest.importorskip("peft"), **lora))


@pytest.mark.parametrize("lora", [{}, {"lora_bias": True}], ids=["lora", "lora_bias"])
def test_a_lora_head_trains_its_adapters_exactly(lora):
    """The adapters' low-rank path is part of the scored logits (the model's own forward adds
    it), and the gradients reach A and B; the base weight is frozen, as peft leaves it."""
    model = _lora_model(**lora)
    head = model.get_output_embeddings()
    assert lm_head_unsupported(model) is None and type(head).__name__ == "Linear"
    ids, targets, weights = case(3)
    with fused_lm_head(model, targets, weights=weights, backend=MODEL_BACKEND) as result:
        assert model(ids).shape == (3, 6, 0)
    _assert_exact(model, result[0], ids, targets, weights)
    with model.disable_adapter():  # switching the adapters off is followed (peft freezes them)
        with fused_lm_head(model, targets, weights=weights, backend=MODEL_BACKEND) as off:
            model(ids)
        want = fused_elbo(model(ids), targets, weights=weights, backend="torch")
    torch.testing.assert_close(off[0], want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(off[0], result[0], rtol=1e-3)  # and the adapters mattered
    assert "forward" not in head.__dict__


def test_a_merged_lora_head_is_its_base_layer():
    model = _lora_model()
    ids, targets, weights = case(4)
    model.merge_adapter()
    with fused_lm_head(model, targets, weights=weights, backend=MODEL_BACKEND) as result:
        model(ids)
    _assert_exact(model, result[0], ids, targets, weights)


def test_a_lora_variant_head_is_refused_with_the_reason():
    model = _lora_model(use_dora=True)
    assert "DoRA" in lm_head_unsupported(model)
    with pytest.raises(ValueError, match="LoRA variant"):
        with fused_lm_head(model, torch.zeros(1, 2, dtype=torch.long)):
            pass


@pytest.mark.slow
def test_tied_and_lora_heads_under_fsdp2():
    """Two gloo ranks, FSDP2 (fully_shard): the weights exist whole only inside the forward."""
    pytest.importorskip("peft")
    assert_every_rank_matched(torchrun(TESTS / "fsdp_lm_head_worker.py"))
