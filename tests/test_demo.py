"""The demo pipeline end to end at smoke size (the real figures come from `make demo`)."""

import json

from elbokto.cli import main
from elbokto.demo import DESIRABLE, OTHER, UNDESIRABLE, classify


def test_quick_demo_writes_summary_and_plot(tmp_path):
    assert main(["demo", "--quick", "--output_dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in ("base_desirable_rate", "aligned_desirable_rate", "train_seconds", "config",
                "psi", "curves", "winrate"):
        assert key in summary
    assert 0 <= summary["base_desirable_rate"] <= 1
    assert summary["config"]["mc"]["n_t"] >= 1
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_the_rule_that_judges_samples():
    # The desirable style reverses the string and upper-cases it; the other copies it.
    assert classify("abc", "CBA") == DESIRABLE
    assert classify("abc", "abc") == UNDESIRABLE
    for malformed in ("ABC", "cba", "CAB", ""):
        assert classify("abc", malformed) == OTHER
