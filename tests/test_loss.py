import math
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elbokto.loss import elbo_dpo_loss, elbo_kto_loss, kl_baseline, pool_metrics

KTO_METRICS = {
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "count/chosen",
    "count/rejected",
    "elbo/policy",
    "elbo/reference",
    "logps/chosen",
    "logps/rejected",
    "saturated_fraction",
    "baseline",
}


def _batch(m: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    policy = (
        (torch.randn(m, generator=gen, dtype=torch.float64) * 20 - 300).float().requires_grad_()
    )
    noise = torch.randn(m, generator=gen, dtype=torch.float64) * 15
    ref = (policy.detach().double() + noise).float().requires_grad_()
    desirable = torch.rand(m, generator=gen) < 0.5
    desirable[0], desirable[1] = True, False
    return policy, ref, desirable


def _expected(policy, ref, desirable, beta, lambda_d, lambda_u, b0):
    """Loss and d loss / d policy in float64, with b0 a constant."""
    r = policy.detach().double() - ref.detach().double()
    s = desirable.double() * 2 - 1
    lam = desirable.double() * lambda_d + (~desirable).double() * lambda_u
    sig = torch.sigmoid(beta * s * (r - b0))
    m = r.numel()
    return (lam * (1 - sig)).sum() / m, -lam * beta * s * sig * (1 - sig) / m


@pytest.mark.parametrize("baseline", ["batch_mean", "none", "kl"])
@pytest.mark.parametrize("beta, lambda_d, lambda_u", [(0.1, 1.0, 1.0), (0.2, 1.5, 0.7)])
def test_kto_loss_value_and_gradient(baseline, beta, lambda_d, lambda_u):
    policy, ref, desirable = _batch()
    kl = torch.tensor(3.25) if baseline == "kl" else None
    loss, metrics = elbo_kto_loss(
        policy,
        ref,
        desirable,
        beta=beta,
        lambda_d=lambda_d,
        lambda_u=lambda_u,
        baseline=baseline,
        kl=kl,
    )
    r = policy.detach().double() - ref.detach().double()
    b0 = {"batch_mean": float(r.mean()), "none": 0.0, "kl": 3.25}[baseline]
    value, grad = _expected(policy, ref, desirable, beta, lambda_d, lambda_u, b0)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert math.isclose(float(loss.detach()), float(value), rel_tol=1e-5)
    loss.backward()
    # The baseline is a constant: the gradient is the formula's with b0 frozen, not through the
    # mean.
    torch.testing.assert_close(policy.grad.double(), grad, rtol=1e-4, atol=1e-8)
    assert ref.grad is None
    assert set(metrics) == KTO_METRICS | ({"kl"} if baseline == "kl" else set())
    assert all(
        not v.requires_grad and v.shape == () and v.is_floating_point() for v in metrics.values()
    )
    assert math.isclose(float(metrics["baseline"]), b0, rel_tol=1e-5, abs_tol=1e-6)


def test_kto_metrics():
    policy = torch.tensor([-10.0, -20.0, -30.0, -40.0])
    ref = torch.tensor([-12.0, -19.0, -100.0, -40.0])
    desirable = torch.tensor([True, True, False, False])
    # A non-zero baseline: rewards are beta * r, without b0; saturation is measured on r - b0.
    _, metrics = elbo_kto_loss(
        policy, ref, desirable, beta=0.5, baseline="kl", kl=torch.tensor(13.0)
    )
    expected = {
        "rewards/chosen": 0.5 * (2 - 1) / 2,
        "rewards/rejected": 0.5 * (70 + 0) / 2,
        "rewards/margins": 0.25 - 17.5,
        "logps/chosen": -15,
        "logps/rejected": -35,
        "count/chosen": 2,
        "count/rejected": 2,
        "elbo/policy": -25,
        "elbo/reference": -42.75,
        "baseline": 13,
        "kl": 13,
        "saturated_fraction": 0.75,  # 0.5 * (r - 13) = -5.5, -7, 28.5, -6.5
    }
    assert {k: pytest.approx(float(v)) for k, v in metrics.items()} == expected


ABSENT_IF_NO_REJECTED = {"rewards/rejected", "logps/rejected", "rewards/margins"}
ABSENT_IF_NO_CHOSEN = {"rewards/chosen", "logps/chosen", "rewards/margins"}


def test_kto_one_sided_batch_reports_the_absent_class_as_nan():
    """Absent means absent: a batch without rejected examples has no rejected mean (NaN, not 0)
    and no margin; the loss and the other metrics stay finite."""
    policy, ref, _ = _batch(5)
    loss, metrics = elbo_kto_loss(policy, ref, torch.ones(5, dtype=torch.bool))
    assert torch.isfinite(loss)
    assert {k for k, v in metrics.items() if torch.isnan(v)} == ABSENT_IF_NO_REJECTED
    assert float(metrics["count/rejected"]) == 0 and float(metrics["count/chosen"]) == 5


def test_kto_empty_batch_gives_zero_loss():
    policy = torch.zeros(0, requires_grad=True)
    loss, metrics = elbo_kto_loss(policy, torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    assert float(loss.detach()) == 0
    assert {
        k for k, v in metrics.items() if torch.isnan(v)
    } == ABSENT_IF_NO_CHOSEN | ABSENT_IF_NO_REJECTED
    assert all(float(v) == 0 for v in metrics.values() if not torch.isnan(v))
    loss.backward()
    assert policy.grad.shape == (0,)


def _kto_metrics(rewards_and_labels, beta=1.0):
    """The loss's metrics of a batch whose margins r (ref 0, so logps = r) are given."""
    r = torch.tensor([x for x, _ in rewards_and_labels], dtype=torch.float64)
    desirable = torch.tensor([d for _, d in rewards_and_labels])
    return elbo_kto_loss(r, torch.zeros_like(r), desirable, beta=beta, baseline="none")[1]


def _lists(*batches):
    out = {}
    for metrics in batches:
        for k, v in metrics.items():
            out.setdefault(k, []).append(v)
    return out


def test_pooled_metrics_weigh_each_class_by_its_count():
    """TRL's pooling: class means weighed by the class's count over the micro-batches, the
    margin from the pooled means, counts added, per-example metrics weighed by examples."""
    one_class = _kto_metrics([(1.0, True), (1.0, True)])
    mixed = _kto_metrics([(4.0, True), (-2.0, False), (-2.0, False), (-2.0, False)])
    pooled = pool_metrics(_lists(one_class, mixed))
    assert pooled["rewards/chosen"] == pytest.approx(2.0)  # (1 + 1 + 4) / 3, not (1 + 4) / 2
    assert pooled["rewards/rejected"] == pytest.approx(-2.0)  # not (0 - 2) / 2
    assert pooled["logps/rejected"] == pytest.approx(-2.0)
    assert pooled["rewards/margins"] == pytest.approx(4.0)
    assert pooled["count/chosen"] == 3 and pooled["count/rejected"] == 3
    assert pooled["elbo/policy"] == pytest.approx((1 + 1 + 4 - 6) / 6)
    # A class absent from every batch is absent from the pool.
    alone = pool_metrics(_lists(one_class, one_class))
    assert not ABSENT_IF_NO_REJECTED & set(alone) and alone["rewards/chosen"] == 1.0


def test_pooled_metrics_across_ranks_equal_one_pool():
    """The ranks' sums go through one reduction: pooling two ranks equals pooling all of their
    micro-batches in one place."""
    a = [_kto_metrics([(1.0, True), (2.0, True)]), _kto_metrics([(-1.0, False), (3.0, True)])]
    b = [_kto_metrics([(-5.0, False), (-7.0, False)])]
    sent = {}

    def record(totals):
        sent["b"] = totals.clone()
        return totals

    pool_metrics(_lists(*b), record)
    two_ranks = pool_metrics(_lists(*a), lambda totals: totals + sent["b"])
    one_pool = pool_metrics(_lists(*a, *b))
    assert two_ranks == pytest.approx(one_pool)
    assert two_ranks["rewards/rejected"] == pytest.approx(-13 / 3)


def test_dpo_metrics_pool_as_plain_means():
    gen = torch.Generator().manual_seed(5)
    batches = [elbo_dpo_loss(*torch.randn(4, 3, generator=gen))[1] for _ in range(3)]
    pooled = pool_metrics(_lists(*batches))
    for name in batches[0]:
        assert pooled[name] == pytest.approx(float(torch.stack([m[name] for m in batches]).mean()))


def test_kto_kl_baseline_is_clamped():
    policy, ref, desirable = _batch()
    loss, metrics = elbo_kto_loss(policy, ref, desirable, baseline="kl", kl=torch.tensor(-4.0))
    value, _ = _expected(policy, ref, desirable, 0.1, 1.0, 1.0, 0.0)
    assert (
        math.isclose(float(loss.detach()), float(value), rel_tol=1e-5) and float(metrics["kl"]) == 0
    )


def test_kto_float64_stays_float64():
    policy, ref, desirable = _batch()
    loss, _ = elbo_kto_loss(policy.double(), ref.double(), desirable)
    assert loss.dtype == torch.float64


@pytest.mark.parametrize("lambda_d, lambda_u", [(0.7, 1.3), (1.0, 0.1)])
def test_kto_float64_class_weights_are_not_rounded_to_float32(lambda_d, lambda_u):
    # 0.7, 1.3 and 0.1 have no exact float32: a weight built in float32 first moves the loss by
    # ~1e-8 relative, far above float64's rounding.
    policy, ref, desirable = _batch()
    policy, ref = policy.detach().double(), ref.detach().double()
    loss, _ = elbo_kto_loss(
        policy, ref, desirable, lambda_d=lambda_d, lambda_u=lambda_u, baseline="none"
    )
    value, _ = _expected(policy, ref, desirable, 0.1, lambda_d, lambda_u, 0.0)
    assert math.isclose(float(loss), float(value), rel_tol=1e-14)


def test_kl_baseline():
    policy = torch.tensor([1.0, 2.0, 6.0], requires_grad=True)
    kl = kl_baseline(policy, torch.tensor([0.0, 0.0, 3.0]))
    assert float(kl) == 2.0 and not kl.requires_grad
    assert float(kl_baseline(torch.tensor([1.0]), torch.tensor([5.0]))) == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"desirable": torch.tensor([1, 0, 1])}, "desirable must be a bool tensor"),
        ({"ref_elbo": torch.zeros(4)}, "ref_elbo is \\[4\\]"),
        ({"policy_elbo": torch.zeros(3, 1)}, "policy_elbo must be a floating tensor"),
        ({"ref_elbo": torch.zeros(3, dtype=torch.int64)}, "ref_elbo must be a floating tensor"),
        ({"beta": 0.0}, "beta=0.0"),
        ({"lambda_u": -1.0}, "lambda_u=-1.0"),
        ({"baseline": "mean"}, "baseline='mean'"),
        ({"baseline": "kl"}, "kl is required"),
        ({"kl": torch.tensor(1.0)}, "kl is required with baseline='kl' and only then"),
        ({"baseline": "kl", "kl": torch.ones(2)}, "kl must be a floating scalar"),
    ],
)
def test_kto_validation(kwargs, match):
    desirable = torch.tensor([True, False, True])
    args = {"policy_elbo": torch.zeros(3), "ref_elbo": torch.zeros(3), "desirable": desirable}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        elbo_kto_loss(args.pop("policy_elbo"), args.pop("ref_elbo"), args.pop("desirable"), **args)


def test_dpo_loss_value_gradient_and_metrics():
    gen = torch.Generator().manual_seed(1)
    pc, rc, pr, rr = (torch.randn(6, generator=gen) * 10 - 200 for _ in range(4))
    pc.requires_grad_(), pr.requires_grad_(), rc.requires_grad_(), rr.requires_grad_()
    loss, metrics = elbo_dpo_loss(pc, rc, pr, rr, beta=0.2)
    logits = 0.2 * (
        (pc.detach().double() - rc.detach().double())
        - (pr.detach().double() - rr.detach().double())
    )
    expected = -torch.nn.functional.logsigmoid(logits).mean()
    assert math.isclose(float(loss.detach()), float(expected), rel_tol=1e-5)
    loss.backward()
    sig = torch.sigmoid(-logits)
    torch.testing.assert_close(pc.grad.double(), -0.2 * sig / 6, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(pr.grad.double(), 0.2 * sig / 6, rtol=1e-4, atol=1e-9)
    assert rc.grad is None and rr.grad is None  # the reference never gets a gradient
    assert set(metrics) == {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    }
    assert math.isclose(float(metrics["logps/chosen"]), float(pc.detach().mean()), rel_tol=1e-6)
    assert math.isclose(float(metrics["logps/rejected"]), float(pr.detach().mean()), rel_tol=1e-6)
    accuracy = float((logits > 0).double().mean())
    assert math.isclose(float(metrics["rewards/accuracies"]), accuracy, rel_tol=1e-6)
    with pytest.raises(ValueError, match="ref_rejected is \\[5\\]"):
        elbo_dpo_loss(pc, rc, pr, rr[:5])


# --- data parallel: the baseline is the mean over all ranks -------------------------------------

RANK_MARGINS = (
    [1.0, 2.0, 6.0],
    [-4.0, 10.0, 0.5, 3.0, 7.5],
)  # different sizes: sum / count matters


def _worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        margins = torch.tensor(RANK_MARGINS[rank])
        policy = (margins - 50).requires_grad_()
        ref = torch.full_like(margins, -50.0)
        desirable = torch.arange(margins.numel()) % 2 == 0
        loss, metrics = elbo_kto_loss(policy, ref, desirable, beta=0.3)
        everything = torch.tensor(RANK_MARGINS[0] + RANK_MARGINS[1], dtype=torch.float64)
        b0 = float(everything.mean())
        assert math.isclose(float(metrics["baseline"]), b0, rel_tol=1e-6), (
            rank,
            float(metrics["baseline"]),
            b0,
        )
        value, grad = _expected(policy, ref, desirable, 0.3, 1.0, 1.0, b0)  # the LOCAL m
        assert math.isclose(float(loss.detach()), float(value), rel_tol=1e-5)
        loss.backward()
        torch.testing.assert_close(policy.grad.double(), grad, rtol=1e-4, atol=1e-9)
        kl = kl_baseline(policy, ref)
        assert math.isclose(float(kl), b0, rel_tol=1e-6)
    except BaseException:
        traceback.print_exc()
        os._exit(1)  # fails the spawn, which reports it
    # No gloo teardown: on some torch releases (2.7.1 here) ~ProcessGroupGloo can hang joining its
    # threads after all the work is done (seen in the compat lane), which would hang the test.
    dist.barrier()
    os._exit(0)


def test_batch_mean_baseline_is_global_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, os.fspath(tmp_path / "init")), nprocs=2, join=True)
