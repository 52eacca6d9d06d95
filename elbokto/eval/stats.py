"""From two-order pairwise verdicts to a win rate: per-prompt outcomes, AWR, bootstrap, kappa.

Every prompt is judged twice, candidate as answer A then as answer B. Each verdict, read from the
candidate's side, is ``win``, ``loss`` or ``tie``. A prompt's outcome is the common reading when the
two orders agree, else ``inconsistent`` (the judge's preference followed the position, not the
answer), and its score is win 1, tie or inconsistent 0.5, loss 0. A prompt with an error in either
order is excluded and counted under ``errors``.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

WIN, TIE, LOSS, INCONSISTENT, ERROR = "win", "tie", "loss", "inconsistent", "error"
SCORES = {WIN: 1.0, TIE: 0.5, INCONSISTENT: 0.5, LOSS: 0.0}


def candidate_view(verdict: str | None, candidate_is_a: bool) -> str:
    """``win`` / ``loss`` / ``tie`` of the candidate from a verdict "A" / "B" / "C" (tie); None (an
    error) stays ``error``."""
    if verdict is None:
        return ERROR
    if verdict == "C":
        return TIE
    if verdict not in ("A", "B"):
        raise ValueError(f"verdict {verdict!r}; expected 'A', 'B', 'C' or None")
    return WIN if (verdict == "A") == candidate_is_a else LOSS


def prompt_outcome(first: str | None, second: str | None) -> str:
    """Outcome of one prompt from its verdicts with the candidate as A (``first``) and as B."""
    a, b = candidate_view(first, True), candidate_view(second, False)
    if ERROR in (a, b):
        return ERROR
    return a if a == b else INCONSISTENT


def win_rate(
    outcomes: Sequence[str], *, samples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict:
    """AWR of per-prompt outcomes with a percentile-bootstrap interval.

    Returns ``awr`` (mean score over the n scored prompts), ``ci_low`` / ``ci_high`` (bootstrap
    percentiles of the mean over ``samples`` resamples of the n prompts, seeded), the counts
    ``n``, ``wins``, ``ties``, ``losses``, ``inconsistent``, ``errors`` (ints; n excludes errors)
    and the fractions ``win_rate``, ``tie_rate``, ``loss_rate``, ``inconsistent_rate`` (of n) and
    ``error_rate`` (of n + errors). With n = 0 the AWR and its interval are None.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence}; expected a value in (0, 1)")
    counts = Counter(outcomes)
    unknown = set(counts) - {*SCORES, ERROR}
    if unknown:
        raise ValueError(f"unknown outcomes {sorted(unknown)}; expected {sorted({*SCORES, ERROR})}")
    scores = np.array([SCORES[o] for o in outcomes if o != ERROR])
    n, errors = len(scores), counts[ERROR]
    result: dict[str, float | int | None] = {
        "awr": None,
        "ci_low": None,
        "ci_high": None,
        "n": n,
        "wins": counts[WIN],
        "ties": counts[TIE],
        "losses": counts[LOSS],
        "inconsistent": counts[INCONSISTENT],
        "errors": errors,
    }
    for key, name in (
        ("win_rate", WIN),
        ("tie_rate", TIE),
        ("loss_rate", LOSS),
        ("inconsistent_rate", INCONSISTENT),
    ):
        result[key] = counts[name] / n if n else None
    result["error_rate"] = errors / (n + errors) if n + errors else None
    if n:
        rng = np.random.default_rng(seed)
        means = scores[rng.integers(0, n, size=(samples, n))].mean(axis=1)
        tail = (1 - confidence) / 2 * 100
        result["awr"] = float(scores.mean())
        result["ci_low"], result["ci_high"] = (
            float(x) for x in np.percentile(means, [tail, 100 - tail])
        )
    return result


def cohen_kappa(first: Sequence[str], second: Sequence[str]) -> float | None:
    """Cohen's kappa between two raters' per-prompt scores (1, 0.5, 0: win, tie or inconsistent,
    loss) on the prompts both scored (no error from either). None when no prompt is shared or
    chance agreement is 1 (both raters always gave one and the same class)."""
    if len(first) != len(second):
        raise ValueError(
            f"{len(first)} outcomes against {len(second)}; expected one per prompt from each judge"
        )
    pairs = [(SCORES[a], SCORES[b]) for a, b in zip(first, second) if ERROR not in (a, b)]
    if not pairs:
        return None
    n = len(pairs)
    observed = sum(a == b for a, b in pairs) / n
    left, right = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    chance = sum(left[c] * right[c] for c in left) / n**2
    if math.isclose(chance, 1.0):
        return None
    return (observed - chance) / (1 - chance)
