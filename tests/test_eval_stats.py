"""Per-prompt outcomes from two-order verdicts, the AWR, its bootstrap interval, Cohen's kappa."""

import numpy as np
import pytest

from elbokto.eval import cohen_kappa, prompt_outcome, win_rate


@pytest.mark.parametrize(
    "first, second, outcome",
    [
        ("A", "B", "win"),
        ("B", "A", "loss"),
        ("C", "C", "tie"),
        ("A", "A", "inconsistent"),
        ("B", "B", "inconsistent"),
        ("A", "C", "inconsistent"),
        ("C", "A", "inconsistent"),
        (None, "B", "error"),
        ("A", None, "error"),
    ],
)
def test_prompt_outcome_reads_both_orders_from_the_candidate_side(first, second, outcome):
    # first: candidate shown as A; second: candidate shown as B.
    assert prompt_outcome(first, second) == outcome


def test_win_rate_counts_fractions_and_interval():
    outcomes = ["win"] * 5 + ["tie"] * 2 + ["inconsistent"] + ["loss"] * 2 + ["error"] * 2
    result = win_rate(outcomes, samples=4000, seed=1)
    assert (
        result["n"],
        result["wins"],
        result["ties"],
        result["losses"],
        result["inconsistent"],
        result["errors"],
    ) == (10, 5, 2, 2, 1, 2)
    assert result["awr"] == pytest.approx((5 + 0.5 * 3) / 10)
    assert result["win_rate"] == 0.5 and result["error_rate"] == pytest.approx(2 / 12)
    # The percentile bootstrap of a mean of 10 scores: close to the normal interval.
    scores = np.array([1] * 5 + [0.5] * 3 + [0] * 2)
    half = 1.96 * scores.std() / np.sqrt(10)
    assert result["ci_low"] == pytest.approx(result["awr"] - half, abs=0.04)
    assert result["ci_high"] == pytest.approx(result["awr"] + half, abs=0.04)
    assert result == win_rate(outcomes, samples=4000, seed=1)


def test_win_rate_of_errors_only_has_no_awr():
    result = win_rate(["error", "error"])
    assert result["awr"] is None and result["n"] == 0 and result["errors"] == 2


def test_cohen_kappa_known_values():
    a = ["win", "win", "loss", "loss", "tie", "error"]
    assert cohen_kappa(a, a) == 1.0
    # Scores 1,1,0,0 vs 1,0,1,0 (inconsistent counts as 0.5 like a tie): p_o = 1/2, p_e = 1/2.
    assert cohen_kappa(["win", "win", "loss", "loss"], ["win", "loss", "win", "loss"]) == 0.0
    # 0.5-scored classes agree: tie and inconsistent are one class.
    assert cohen_kappa(["tie", "win", "loss"], ["inconsistent", "win", "loss"]) == 1.0
    assert cohen_kappa(["win", "win"], ["win", "win"]) is None  # chance agreement 1
    assert cohen_kappa(["error"], ["win"]) is None
