"""Labellers: a verifier function and a pointwise judge over HTTP (a local rule server that times
out, rate-limits and answers garbage on demand), and the store that never pays twice."""

import json

import pytest

from elbokto.eval import JudgeConfig, RuleJudgeServer
from elbokto.eval.template import POINTWISE_SLOTS, load_template, render, unrender
from elbokto.labellers import CallableLabeller, JudgeLabeller, LabelStore, parse_good_bad

ITEMS = [("abc", "CBA"), ("abd", "abd"), ("xyz", "ZYX"), ("pq", "??")]
WANT = [True, False, True, False]


def reversed_upper(prompt, response):
    return response == prompt[::-1].upper()


def good_bad(question, answer):
    return "GOOD" if reversed_upper(question, answer) else "BAD"


def judge_config(server, **kwargs):
    return JudgeConfig(
        judge_model=["rule"],
        judge_base_url=server.base_url,
        judge_timeout=kwargs.pop("judge_timeout", 0.5),
        judge_backoff=0.01,
        **kwargs,
    )


def serve(rule=good_bad, **kwargs):
    return RuleJudgeServer(
        rule, template=load_template(kind="pointwise"), slots=POINTWISE_SLOTS, **kwargs
    )


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("fine. [[GOOD]]", "GOOD"),
        ("[[BAD]]", "BAD"),
        ("[[GOOD]] ... [[GOOD]]", "GOOD"),
        ("good", None),
        ("[[GOOD]] or [[BAD]]", None),
        ("[GOOD]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_good_bad_is_strict(text, verdict):
    assert parse_good_bad(text) == verdict


def test_pointwise_template_roundtrip_and_slots(tmp_path):
    template = load_template(kind="pointwise")
    message = render(template, "q {answer}", "a {question}")
    assert unrender(template, message, POINTWISE_SLOTS) == {
        "question": "q {answer}",
        "answer": "a {question}",
    }
    pairwise_file = tmp_path / "pairwise.txt"
    pairwise_file.write_text(load_template())
    with pytest.raises(ValueError, match="pointwise judge template"):
        load_template(str(pairwise_file), kind="pointwise")


def test_callable_labeller_by_name_and_its_refusals():
    labeller = CallableLabeller("operator:eq")
    assert labeller.identity == "callable:operator:eq"
    assert [label.desirable for label in labeller([("a", "a"), ("a", "b")])] == [True, False]
    unsure = CallableLabeller(lambda p, r: None, name="unsure")([("a", "b")])[0]
    assert unsure.desirable is None and unsure.final and "None" in unsure.error
    with pytest.raises(ValueError, match="expected True, False or None"):
        CallableLabeller(lambda p, r: 0.7, name="score")([("a", "b")])
    for spec, match in (
        ("operator", "module:function"),
        ("no_such_module_x:f", "cannot import"),
        ("operator:no_such_function", "no function"),
    ):
        with pytest.raises(ValueError, match=match):
            CallableLabeller(spec)


def test_judge_faults_are_retried_and_change_no_label():
    with serve() as clean:
        want = JudgeLabeller(judge_config(clean))(ITEMS)
    assert [label.desirable for label in want] == WANT
    with serve(faults=["429", "500", "garbage", "timeout"], delay=1.0) as server:
        got = JudgeLabeller(judge_config(server))(ITEMS)
        assert server.requests == len(ITEMS) + 4
    assert [label.desirable for label in got] == WANT
    assert all(label.final and label.error is None for label in got)


def test_garbage_is_dropped_never_labelled_bad(tmp_path):
    def rule(question, answer):
        return None if question == "abd" else good_bad(question, answer)

    with serve(rule) as server:
        store = LabelStore(JudgeLabeller(judge_config(server, judge_parse_retries=1)), tmp_path)
        labels = [label for label, _ in store(ITEMS)]
        assert server.requests == 3 + 2  # the garbage item asked twice
    assert [label.desirable for label in labels] == [True, None, True, False]
    assert labels[1].final and "[[GOOD]]/[[BAD]]" in labels[1].error
    # It was paid for: stored, and not asked again.
    with serve(rule) as server:
        again = LabelStore(JudgeLabeller(judge_config(server)), tmp_path)
        assert [label.desirable for label, cached in again(ITEMS)] == [True, None, True, False]
        assert server.requests == 0 and again.asked == 0


def test_transient_failures_are_dropped_and_asked_again_later(tmp_path):
    with serve(faults=["429"] * 3) as server:
        store = LabelStore(
            JudgeLabeller(judge_config(server, judge_max_retries=2, judge_concurrency=1)), tmp_path
        )
        first = store(ITEMS[:1])[0][0]
    assert first.desirable is None and not first.final and "429" in first.error
    assert not (tmp_path / "labels-rank0.jsonl").exists()
    with serve() as server:
        store = LabelStore(JudgeLabeller(judge_config(server)), tmp_path)
        assert store(ITEMS[:1])[0][0].desirable is True
        assert server.requests == 1


def test_store_answers_across_ranks_and_keys_on_the_labeller(tmp_path):
    rank0 = LabelStore(CallableLabeller(reversed_upper, name="rev"), tmp_path, rank=0)
    assert [(label.desirable, cached) for label, cached in rank0(ITEMS)] == [
        (w, False) for w in WANT
    ]
    # Another rank (a resume with another world size) finds them; nothing is asked.
    rank1 = LabelStore(CallableLabeller(reversed_upper, name="rev"), tmp_path, rank=1)
    assert [(label.desirable, cached) for label, cached in rank1(ITEMS)] == [
        (w, True) for w in WANT
    ]
    assert rank1.asked == 0
    # Another labeller's labels are not this one's.
    other = LabelStore(CallableLabeller(lambda p, r: True, name="yes"), tmp_path, rank=1)
    assert [label.desirable for label, _ in other(ITEMS)] == [True] * 4 and other.asked == 4
    records = [
        json.loads(line) for line in (tmp_path / "labels-rank0.jsonl").read_text().splitlines()
    ]
    assert [(r["prompt"], r["response"], r["desirable"]) for r in records] == [
        (p, r, w) for (p, r), w in zip(ITEMS, WANT)
    ]
