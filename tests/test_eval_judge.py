"""The pairwise judge against a real HTTP server on 127.0.0.1 that answers by rule, and
misbehaves on demand: retries, strict verdicts, both orders, the cache, unreachable judges."""

import json
import socket

import pytest

from elbokto.eval import JudgeConfig, RuleJudgeServer, compute_winrate, parse_verdict
from elbokto.eval.judge import JudgmentCache, PairwiseJudge
from elbokto.eval.template import load_template, render, unrender

PROMPTS = ["p0", "p1", "p2", "p3"]
CANDIDATE = ["long answer", "x", "same", "longest answer"]
BASELINE = ["short", "longer", "same", "tiny"]


def longer_wins(question, a, b):
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"


def config(server, *models, **kwargs):
    return JudgeConfig(
        judge_model=list(models) or ["rule"],
        judge_base_url=server.base_url,
        judge_timeout=kwargs.pop("judge_timeout", 0.5),
        judge_backoff=0.01,
        **kwargs,
    )


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("A is better. [[A]]", "A"),
        ("[[B]]", "B"),
        ("tie: [[C]]", "C"),
        ("[[A]] ... [[A]]", "A"),
        ("A is better", None),
        ("[[A]] or [[B]]", None),
        ("[A]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict_is_strict(text, verdict):
    assert parse_verdict(text) == verdict


def test_template_roundtrip_and_slots(tmp_path):
    template = load_template()
    message = render(template, "q {answer_b}", "first {question}", "second")
    assert unrender(template, message) == {
        "question": "q {answer_b}",
        "answer_a": "first {question}",
        "answer_b": "second",
    }
    one_slot = tmp_path / "bad.txt"
    one_slot.write_text("Compare {question}: {answer_a}")
    with pytest.raises(ValueError, match="answer_b"):
        load_template(str(one_slot))


def test_faults_are_retried_and_the_result_is_unchanged(tmp_path):
    with RuleJudgeServer(longer_wins) as clean:
        want = compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(clean), tmp_path / "clean")
    # One of each failure before the rule answers: the same verdicts come out.
    with RuleJudgeServer(
        longer_wins, faults=["429", "500", "garbage", "timeout"], delay=1.0
    ) as server:
        got = compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server), tmp_path / "faulty")
        assert server.requests == 8 + 4
    for key in ("awr", "wins", "ties", "losses", "errors"):
        assert got[key] == want[key]
    assert (got["wins"], got["ties"], got["losses"], got["errors"]) == (2, 1, 1, 0)
    assert got["awr"] == pytest.approx(2.5 / 4)


def test_persistent_garbage_is_an_error_not_a_tie(tmp_path):
    def rule(question, a, b):
        return None if question == "p0" else longer_wins(question, a, b)

    with RuleJudgeServer(rule) as server:
        summary = compute_winrate(
            PROMPTS, CANDIDATE, BASELINE, config(server, judge_parse_retries=1), tmp_path
        )
        assert server.requests == 2 * 2 + 6  # p0: both orders asked twice
    assert (summary["n"], summary["errors"], summary["ties"]) == (3, 1, 1)
    assert summary["awr"] == pytest.approx(1.5 / 3)
    assert summary["error_rate"] == pytest.approx(1 / 4)


def test_both_orders_expose_a_position_bias(tmp_path):
    with RuleJudgeServer(lambda q, a, b: "A") as server:
        summary = compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server), tmp_path)
    assert summary["inconsistent"] == 4 and summary["awr"] == 0.5
    outcomes = [json.loads(line) for line in (tmp_path / "outcomes.jsonl").read_text().splitlines()]
    assert outcomes[0]["rule"] == {
        "candidate_as_a": "A",
        "candidate_as_b": "A",
        "outcome": "inconsistent",
    }


def test_cache_makes_repeated_and_interrupted_runs_free(tmp_path):
    with RuleJudgeServer(longer_wins) as server:
        first = compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server), tmp_path)
        assert server.requests == 8
        again = compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server), tmp_path)
        assert server.requests == 8 and again["awr"] == first["awr"]
        # An interrupted run: 3 judgments written; only the missing ones are asked. (Both orders
        # of p2, "same" against "same", share one key, and a run asks for each order: which lines
        # survive the cut decides the count.)
        lines = (tmp_path / "judgments.jsonl").read_text().splitlines()
        assert len(lines) == 8
        keys = [json.dumps(json.loads(line)["key"]) for line in lines]
        missing = sum(key not in set(keys[:3]) for key in keys)
        assert missing in (4, 5)
        (tmp_path / "judgments.jsonl").write_text("\n".join(lines[:3]) + '\n{"key": "cut')
        compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server), tmp_path)
        assert server.requests == 8 + missing
        # What the rerun appended after the torn line is readable: a third run asks nothing.
        compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server), tmp_path)
        assert server.requests == 8 + missing
        # Another judge model is another key.
        compute_winrate(PROMPTS, CANDIDATE, BASELINE, config(server, "other"), tmp_path)
        assert server.requests == 8 + missing + 8


def test_two_judges_and_their_kappa(tmp_path):
    def rule_for(question, a, b):
        return longer_wins(question, a, b)

    with RuleJudgeServer(rule_for) as server:
        summary = compute_winrate(
            PROMPTS, CANDIDATE, BASELINE, config(server, "judge-1", "judge-2"), tmp_path
        )
    assert set(summary["judges"]) == {"judge-1", "judge-2"}
    assert summary["judge"] == "judge-1" and summary["cohen_kappa"] == 1.0
    assert (tmp_path / "winrate.png").stat().st_size > 0
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "awr",
        "ci_low",
        "ci_high",
        "n",
        "wins",
        "ties",
        "losses",
        "inconsistent",
        "errors",
        "mean_response_chars",
    ):
        assert on_disk[key] == summary[key]
    assert isinstance(on_disk["wins"], int) and 0 <= on_disk["win_rate"] <= 1


def test_judge_model_flag_given_twice():
    from transformers import HfArgumentParser

    (cfg,) = HfArgumentParser(JudgeConfig).parse_args_into_dataclasses(
        ["--judge_model", "a", "--judge_model", "b"]
    )
    assert cfg.judge_model == ["a", "b"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_or_unreachable_judge(tmp_path):
    with pytest.raises(ValueError, match="no judge"):
        compute_winrate(PROMPTS, CANDIDATE, BASELINE, JudgeConfig(), tmp_path)
    dead = JudgeConfig(
        judge_model=["rule"],
        judge_base_url=f"http://127.0.0.1:{free_port()}/v1",
        judge_max_retries=1,
        judge_backoff=0.01,
    )
    with pytest.raises(ValueError, match="unreachable"):
        compute_winrate(PROMPTS, CANDIDATE, BASELINE, dead, tmp_path)


def test_rate_limits_beyond_the_retries_are_errors_not_cached(tmp_path):
    cache = JudgmentCache(tmp_path / "judgments.jsonl")
    with RuleJudgeServer(longer_wins, faults=["429"] * 3) as server:
        judge = PairwiseJudge(
            config(server, judge_max_retries=2, judge_concurrency=1), "rule", load_template(), cache
        )
        (first,) = judge.judge([("p", "aa", "b")])
        assert first.verdict is None and "429" in first.error
        (second,) = judge.judge([("p", "aa", "b")])
        assert second.verdict == "A" and not second.cached
    assert server.requests == 4
