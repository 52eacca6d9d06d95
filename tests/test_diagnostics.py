import math

import pytest
import torch

from elbokto.diagnostics import estimate_gradient_noise, estimate_psi


def _synthetic(num_redraws: int, m: int, a: float, b: float, seed: int = 0) -> torch.Tensor:
    """r_i = mu_i + a * Z_shared + b * eps_i: v = a^2 + b^2, c = a^2, psi = (m-1)/m * b^2."""
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(m, generator=gen, dtype=torch.float64) * 50
    shared = torch.randn(num_redraws, 1, generator=gen, dtype=torch.float64)
    own = torch.randn(num_redraws, m, generator=gen, dtype=torch.float64)
    return mu + a * shared + b * own


def test_recovers_known_structure():
    num_redraws, m, a, b = 20_000, 6, 2.0, 0.5
    est = estimate_psi(_synthetic(num_redraws, m, a, b))
    # Relative standard error of a variance estimate from R draws is ~sqrt(2 / R) = 1%.
    assert est.v == pytest.approx(a**2 + b**2, rel=0.04)
    assert est.c == pytest.approx(a**2, rel=0.05)
    assert est.psi == pytest.approx((m - 1) / m * b**2, rel=0.04)
    assert (est.num_redraws, est.batch_size, est.psi_baseline) == (num_redraws, m, None)


def test_identity_holds_exactly():
    """(m-1)/m * (v - c) == mean_i Var(r_i - mean_j r_j) for sample moments, not only in
    expectation."""
    margins = _synthetic(5, 4, 1.0, 3.0, seed=1) + torch.randn(5, 4, dtype=torch.float64)
    est = estimate_psi(margins.float())
    assert est.psi == pytest.approx((4 - 1) / 4 * (est.v - est.c), rel=1e-6)


def test_constant_baselines_cost_var_of_their_difference():
    margins = _synthetic(50, 5, 1.5, 1.0, seed=2)
    est = estimate_psi(margins)
    b0 = margins.mean(1)
    gen = torch.Generator().manual_seed(3)
    noisy = torch.randn(50, generator=gen, dtype=torch.float64)
    for baseline in (torch.zeros(50), 7.0, noisy * 2, b0 + 0.1 * noisy):
        with_b = estimate_psi(margins, baseline=baseline)
        gap = torch.as_tensor(baseline, dtype=torch.float64) - b0
        assert with_b.psi_baseline - est.psi == pytest.approx(float(gap.var()), rel=1e-9, abs=1e-9)
        assert with_b.psi_baseline >= est.psi - 1e-12
    assert estimate_psi(margins, baseline=b0).psi_baseline == pytest.approx(est.psi, rel=1e-12)


def test_shared_noise_lowers_psi():
    """Same total per-item variance; moving it into the shared component leaves less Psi."""
    private = estimate_psi(_synthetic(2000, 8, 0.0, 2.0)).psi
    shared = estimate_psi(_synthetic(2000, 8, math.sqrt(3.0), 1.0)).psi
    assert shared < 0.4 * private


@pytest.mark.parametrize(
    "margins, kwargs, match",
    [
        (torch.zeros(1, 4), {}, "need R >= 2 redraws and m >= 2 items"),
        (torch.zeros(4, 1), {}, "need R >= 2"),
        (torch.zeros(4), {}, "floating tensor \\[R, m\\]"),
        (torch.zeros(4, 3, dtype=torch.int64), {}, "floating tensor"),
        (
            torch.zeros(4, 3),
            {"baseline": torch.zeros(3)},
            "baseline must be a scalar or \\[R\\] = \\[4\\]",
        ),
    ],
)
def test_validation(margins, kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate_psi(margins, **kwargs)


def test_gradient_noise_recovers_known_moments():
    """g = mu + sigma * eps over two parameter tensors: variance = P * sigma^2,
    signal = ||mu||^2."""
    gen = torch.Generator().manual_seed(7)
    mu = [torch.randn(3, 4, generator=gen), torch.randn(5, generator=gen)]
    sigma, num_redraws = 0.5, 4000
    noise = estimate_gradient_noise(
        [m + sigma * torch.randn(m.shape, generator=gen) for m in mu] for _ in range(num_redraws)
    )
    assert noise.num_redraws == num_redraws
    assert noise.variance == pytest.approx(17 * sigma**2, rel=0.03)
    signal = sum(float(m.double().square().sum()) for m in mu)
    assert noise.signal == pytest.approx(signal, rel=0.02)
    assert noise.relative_variance == pytest.approx(17 * sigma**2 / signal, rel=0.05)


def test_gradient_noise_survives_a_large_mean():
    """Gradients of size 1e3 that differ by 1e-2 across redraws: sums of squares would cancel
    (in float32 the running total alone rounds by more than the noise); Welford's update does
    not."""
    gen = torch.Generator().manual_seed(8)
    mu = 1e3 * (1 + torch.rand(17, generator=gen))
    sigma, num_redraws = 1e-2, 400
    noise = estimate_gradient_noise(
        [mu + sigma * torch.randn(17, generator=gen)] for _ in range(num_redraws)
    )
    assert noise.variance == pytest.approx(17 * sigma**2, rel=0.15)


def test_gradient_noise_of_identical_gradients_is_zero_and_of_pure_noise_is_infinite():
    same = estimate_gradient_noise([torch.ones(3)] for _ in range(3))
    assert same.variance == 0 and same.signal == pytest.approx(3.0) and same.relative_variance == 0
    opposite = estimate_gradient_noise([[torch.ones(3)], [-torch.ones(3)]])
    assert opposite.variance == pytest.approx(6.0) and opposite.relative_variance == math.inf


@pytest.mark.parametrize(
    "gradients, match",
    [
        ([[torch.ones(2)]], "need R >= 2"),
        ([[torch.ones(2)], [torch.ones(3)]], "same parameters"),
    ],
)
def test_gradient_noise_rejects(gradients, match):
    with pytest.raises(ValueError, match=match):
        estimate_gradient_noise(gradients)
