"""Test helpers around the package's float64 oracle."""

from __future__ import annotations

from torch import Tensor

from elbokto_kernels.oracle import elbo_oracle, linear_elbo_oracle, relative_error, tolerances

BACKENDS = ("torch", "triton", "cpu")

__all__ = ["BACKENDS", "assert_close", "elbo_oracle", "linear_elbo_oracle", "tolerances"]


def assert_close(actual: Tensor, expected: Tensor, rel: float, what: str) -> None:
    """|actual - expected| <= rel * max|expected| elementwise."""
    err = relative_error(actual, expected)
    assert err <= rel, f"{what}: relative error {err:.3g} > {rel:g}"
