"""ELBOKTOObjective: the step's loss and gradients, references, chunking, the KL baseline."""

import copy

import pytest
import torch
from devices import on_device
from tiny_models import tiny_batch, tiny_gemma

from elbokto import LossConfig, MCConfig, estimate_gradient_noise
from elbokto.objective import ELBOKTOObjective, mismatched_batch


def policy_and_reference(seed=0, on_test_device=False):
    """(policy, frozen reference): the policy moved a little away from it; on the test device
    when asked."""
    reference = tiny_gemma(seed=seed)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # move the policy away from the reference so margins are non-zero
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    for p in reference.parameters():
        p.requires_grad_(False)
    return on_device(policy, reference) if on_test_device else (policy, reference)


def param_grads(model):
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


def test_loss_is_the_formula_on_the_estimates():
    policy, reference = policy_and_reference(on_test_device=True)
    batch = on_device(tiny_batch())
    obj = ELBOKTOObjective(mc=MCConfig(n_t=4), loss=LossConfig(beta=0.5, lambda_u=1.5))
    out = obj(policy, batch, reference=reference, draw_index=2)
    draws = obj.draws(batch, draw_index=2)
    ref_elbo = obj.elbo(reference, batch, draws)
    torch.testing.assert_close(out.ref_elbo, ref_elbo)  # same draws: common random numbers
    r = out.policy_elbo.double() - ref_elbo.double()
    sign = batch["desirable"].double() * 2 - 1
    lam = torch.where(batch["desirable"], 1.0, 1.5).double()
    expected = (lam * (1 - torch.sigmoid(0.5 * sign * (r - r.mean())))).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in policy.parameters())
    assert set(out.metrics) >= {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    }
    assert "kl" not in out.metrics  # only the KL baseline logs kl


@pytest.mark.parametrize(
    "keep_logits, chunk",
    [(False, 5), (True, 5), (False, 1), (False, 6), (False, 24), (False, 100)],
    ids=["recompute", "keep-logits", "one-copy", "one-example", "all", "more-than-all"],
)
def test_mc_chunk_size_equals_one_pass(keep_logits, chunk):
    """B * K = 24 copies in chunks of 5 (a chunk splits an example), 1, 6 (= K: chunks follow the
    examples), 24 (one chunk) and 100 (larger than the batch)."""
    policy, reference = policy_and_reference(seed=1, on_test_device=True)
    batch = on_device(tiny_batch(seed=1))
    mc = MCConfig(n_t=3, n_yt=2)
    whole = ELBOKTOObjective(mc=mc)(policy, batch, reference=reference)
    whole.loss.backward()
    expected = param_grads(policy)
    policy.zero_grad(set_to_none=True)
    chunked = ELBOKTOObjective(mc=mc, mc_chunk_size=chunk, keep_logits=keep_logits)(
        policy, batch, reference=reference
    )
    torch.testing.assert_close(chunked.loss, whole.loss)
    torch.testing.assert_close(chunked.policy_elbo, whole.policy_elbo)
    (chunked.loss * 0.5).backward()  # the incoming gradient scales the deferred backward
    for g, e in zip(param_grads(policy), expected):
        e = e * 0.5
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_precomputed_reference_and_errors():
    policy, reference = policy_and_reference()
    batch = tiny_batch()
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2))
    online = obj(policy, batch, reference=reference)
    offline = obj(policy, batch, ref_elbo=online.ref_elbo)
    torch.testing.assert_close(offline.loss, online.loss)
    with pytest.raises(ValueError, match="no reference"):
        obj(policy, batch)
    with pytest.raises(ValueError, match="batch lacks"):
        obj(policy, {k: v for k, v in batch.items() if k != "uid"}, reference=reference)
    with pytest.raises(ValueError, match="mc_chunk_size"):
        ELBOKTOObjective(mc_chunk_size=0)


def test_peft_reference_is_the_policy_without_adapters():
    peft = pytest.importorskip("peft")
    base = tiny_gemma(seed=2)
    frozen = copy.deepcopy(base)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    policy = peft.get_peft_model(base, lora)
    batch = tiny_batch(seed=2)
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2))
    out = obj(policy, batch)
    torch.testing.assert_close(out.ref_elbo, obj(policy, batch, reference=frozen).ref_elbo)
    assert not torch.allclose(out.policy_elbo, out.ref_elbo)  # adapters are active for the policy
    out.loss.backward()
    assert all(p.grad is None for n, p in policy.named_parameters() if "lora" not in n)


def test_kl_baseline():
    """b0 = max(0, mean margin of the mismatched pairs), on their own draws; the loss uses it."""
    first, second = policy_and_reference(seed=3)
    batch = tiny_batch(seed=3)
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2), loss=LossConfig(baseline="kl", beta=0.5))
    mismatched = mismatched_batch(batch, obj.pad_token_id)
    draws = obj.draws(mismatched)
    raw = (obj.elbo(first, mismatched, draws) - obj.elbo(second, mismatched, draws)).mean()
    # The orientation with a positive KL estimate, so that the clamp does not hide it.
    policy, reference = (first, second) if raw > 0 else (second, first)
    kl = abs(float(raw))
    assert kl > 1e-3
    out = obj(policy, batch, reference=reference)
    assert float(out.metrics["kl"]) == pytest.approx(kl, rel=1e-5)
    r = out.policy_elbo.double() - out.ref_elbo.double()
    sign = batch["desirable"].double() * 2 - 1
    expected = torch.sigmoid(-0.5 * sign * (r - kl)).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-7)
    # The other orientation's estimate is negative: clamped to 0.
    assert float(obj(reference, batch, reference=policy).metrics["kl"]) == 0
    # A precomputed reference has no values for the mismatched pairs.
    with pytest.raises(ValueError, match="mismatched"):
        obj(policy, batch, ref_elbo=out.ref_elbo)


def test_kl_baseline_warns_once_about_a_batch_of_one(caplog):
    """A batch of one (e.g. an epoch's last, partial batch) pairs the example with itself: the
    objective goes on, warning once and naming the flag."""
    policy, reference = policy_and_reference(seed=3)
    one = {k: v[:1] for k, v in tiny_batch(seed=3).items()}
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2), loss=LossConfig(baseline="kl"))
    obj(policy, tiny_batch(seed=3), reference=reference)
    assert not caplog.records
    for _ in range(2):
        obj(policy, one, reference=reference)
    warnings = [r for r in caplog.records if "per_device_train_batch_size" in r.getMessage()]
    assert len(warnings) == 1 and "own response" in warnings[0].getMessage()


def test_mismatched_batch_pairs_prompt_with_next_response():
    batch = tiny_batch(seed=4)
    mm = mismatched_batch(batch, pad_token_id=0)
    ids, p, r = batch["input_ids"], batch["prompt_lengths"], batch["response_lengths"]
    for i in range(4):
        j = (i + 1) % 4
        pi, pj, rj = int(p[i]), int(p[j]), int(r[j])
        assert torch.equal(mm["input_ids"][i, :pi], ids[i, :pi])
        assert torch.equal(mm["input_ids"][i, pi : pi + rj], ids[j, pj : pj + rj])
        assert int(mm["attention_mask"][i].sum()) == pi + rj
        assert torch.all(mm["input_ids"][i, pi + rj :] == 0)
    assert torch.equal(mm["response_lengths"], r.roll(-1))
    assert len(set(mm["uid"].tolist()) & set(batch["uid"].tolist())) == 0


def test_psi_of_a_model_setting():
    policy, reference = policy_and_reference(seed=5)
    batch = tiny_batch(seed=5)
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2))
    margins = obj.margins(policy, batch, reference=reference, redraws=6)
    assert margins.shape == (6, 4)
    assert margins.std(0).min() > 0  # redraws are independent: the margins move
    est = obj.psi(policy, batch, reference=reference, redraws=6)
    assert est.num_redraws == 6 and est.batch_size == 4
    assert est.psi > 0
    assert abs(est.psi_baseline - est.psi) < 1e-9 * max(1.0, est.psi)  # batch_mean: b = b0
    none = ELBOKTOObjective(mc=MCConfig(n_t=2), loss=LossConfig(baseline="none"))
    assert none.psi(policy, batch, reference=reference, redraws=6).psi_baseline >= est.psi - 1e-9
    # Common random numbers: the same model as policy and reference gives zero margins.
    assert torch.all(obj.margins(reference, batch, reference=reference, redraws=2) == 0)


def test_gradient_noise_of_a_model_setting():
    policy, reference = policy_and_reference(seed=5)
    batch = tiny_batch(seed=5)
    for p in policy.parameters():
        p.grad = torch.full_like(p, 3.0)
    small = ELBOKTOObjective(mc=MCConfig(n_t=1)).gradient_noise(
        policy, batch, reference=reference, redraws=6
    )
    assert all(torch.all(p.grad == 3.0) for p in policy.parameters())  # .grad restored
    assert small.num_redraws == 6 and small.variance > 0
    # A bigger budget averages more copies: less noise around the same mean gradient.
    large = ELBOKTOObjective(mc=MCConfig(n_t=16)).gradient_noise(
        policy, batch, reference=reference, redraws=6
    )
    assert large.variance < 0.5 * small.variance
    # One seed for every redraw: the gradients coincide.
    fixed = ELBOKTOObjective(mc=MCConfig(n_t=1))
    grads = []
    for _ in range(2):
        policy.zero_grad(set_to_none=True)
        fixed(policy, batch, reference=reference).loss.backward()
        grads.append([p.grad.clone() for p in policy.parameters()])
    assert estimate_gradient_noise(grads).variance < 1e-12 * max(1.0, small.variance)
    # The chunked backward (mc_chunk_size) gives the same spread.
    chunked = ELBOKTOObjective(mc=MCConfig(n_t=1), mc_chunk_size=1).gradient_noise(
        policy, batch, reference=reference, redraws=6
    )
    assert chunked.variance == pytest.approx(small.variance, rel=1e-4)


def test_pairs_share_their_draws_and_crn_off_does_not():
    batch = tiny_batch(seed=6)
    batch["response_lengths"] = torch.tensor([4, 4, 5, 5])
    batch["pair_uid"] = torch.tensor([11, 11, 12, 12])
    obj = ELBOKTOObjective(mc=MCConfig(n_t=3))
    draws = obj.draws(batch)
    K = 3
    t = draws.t.view(4, K)
    assert torch.equal(t[0], t[1]) and torch.equal(t[2], t[3]) and not torch.equal(t[0], t[2])
    # The same relative positions are masked in both rows of a pair of equal lengths.
    p = batch["prompt_lengths"]
    mask = draws.mask.view(4, K, -1)
    for a, b in ((0, 1), (2, 3)):
        length = int(batch["response_lengths"][a])
        assert torch.equal(mask[a, :, p[a] : p[a] + length], mask[b, :, p[b] : p[b] + length])
    # Without CRN the reference of the same model scores other copies: the margins move.
    policy, _ = policy_and_reference(seed=6)
    off = ELBOKTOObjective(mc=MCConfig(n_t=2), crn=False)
    assert off.margins(policy, batch, reference=policy, redraws=2).abs().max() > 0
    out = off(policy, batch, reference=policy)
    assert not torch.equal(out.policy_elbo, out.ref_elbo)


def test_elbo_dpo_objective_is_the_pairwise_formula():
    policy, reference = policy_and_reference(seed=7)
    batch = tiny_batch(seed=7)
    batch["pair_uid"] = torch.tensor([1, 1, 2, 2])
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2), loss=LossConfig(loss_type="elbo_dpo", beta=0.3))
    out = obj(policy, batch, reference=reference)
    r = out.policy_elbo.double() - out.ref_elbo.double()
    expected = -torch.nn.functional.logsigmoid(0.3 * (r[0::2] - r[1::2])).mean()
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-6, atol=1e-7)
    out.loss.backward()
    assert all(p.grad is None for p in reference.parameters())
    batch["desirable"] = torch.tensor([True, True, False, False])
    with pytest.raises(RuntimeError, match="alternate chosen"):
        obj(policy, batch, reference=reference)


def test_filter_eps_reaches_the_fused_head(monkeypatch):
    """The objective's filter_eps is what the LM head's fused_linear_elbo gets, and training
    with it moves the same parameters, within the filter's error, as without."""
    from elbokto_kernels import lm_head

    seen = []
    real = lm_head.fused_linear_elbo
    monkeypatch.setattr(
        lm_head,
        "fused_linear_elbo",
        lambda *a, **kw: seen.append(kw["filter_eps"]) or real(*a, **kw),
    )
    policy, reference = policy_and_reference(seed=2)
    batch = tiny_batch(seed=2)
    grads = []
    for eps in (None, 2.0**-12):
        policy.zero_grad()
        ELBOKTOObjective(mc=MCConfig(n_t=2), filter_eps=eps, backend="torch")(
            policy, batch, reference=reference
        ).loss.backward()
        grads.append(param_grads(policy))
    # Reference and policy alike: without a backward (the reference) the op ignores it.
    assert seen == [None, None, 2.0**-12, 2.0**-12]
    for exact, filtered in zip(*grads):
        assert (filtered - exact).abs().max() <= 1e-3 * exact.abs().max() + 1e-8


def test_the_old_step_keyword_still_works_and_warns():
    """``step=`` was renamed ``draw_index=`` (glossary): accepted for one release, with a warning;
    both at once is an error."""
    policy, reference = policy_and_reference()
    batch = tiny_batch()
    obj = ELBOKTOObjective(mc=MCConfig(n_t=2))
    with pytest.warns(FutureWarning, match=r"ELBOKTOObjective.draws\(step=\) is now draw_index="):
        old = obj.draws(batch, step=3)
    assert torch.equal(old.mask, obj.draws(batch, draw_index=3).mask)
    assert not torch.equal(old.mask, obj.draws(batch).mask)
    with pytest.warns(FutureWarning, match="draw_index="):
        loss = obj(policy, batch, reference=reference, step=3).loss
    assert loss == obj(policy, batch, reference=reference, draw_index=3).loss
    with pytest.raises(TypeError, match="pass draw_index="):
        obj.draws(batch, step=3, draw_index=3)
