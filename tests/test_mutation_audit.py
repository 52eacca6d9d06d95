"""The mutation audit stays true to the code: each mutant's snippet occurs exactly once in its
file, so every mutant plants the bug it names (a stale snippet would be skipped or ambiguous, and
the audit's table would claim a catch that no longer happens), and the table in tests/README.md
is the recorded results'."""

from __future__ import annotations

import json

import pytest
from mutation_audit import MUTANTS, RESULTS, ROOT, table


@pytest.mark.parametrize("mutant", MUTANTS, ids=lambda m: m.name)
def test_each_mutant_plants_its_bug_exactly_once(mutant):
    source = (ROOT / mutant.file).read_text()
    assert source.count(mutant.old) == 1, f"{mutant.file}: {mutant.old!r}"
    assert mutant.new != mutant.old


def test_the_recorded_results_and_the_readme_table_are_current():
    """Every recorded result is of a mutant that exists, and tests/README.md shows the table of
    the recorded results (``python tests/mutation_audit.py --table``)."""
    results = json.loads(RESULTS.read_text())
    assert set(results) <= {m.name for m in MUTANTS}
    assert table(results) in (ROOT / "tests" / "README.md").read_text()
