"""`elbokto eval winrate` end to end: a tiny model sampled, a JSONL response file, prompts from a
file or a dataset, a rule judge on 127.0.0.1; clear errors for what cannot work."""

import json

import pytest
from tiny_eval import save_tiny_model

from elbokto.cli import main
from elbokto.eval import JudgeConfig, RuleJudgeServer, WinrateArgs, run_winrate
from elbokto.sampling import SamplingConfig

PROMPTS = ["Reverse abc", "Reverse hello", "What color is the sky?"]


def longer_wins(question, a, b):
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "C"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny"))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_cli_model_against_file_then_reuse(folder, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    opponent = write_jsonl(
        tmp_path / "base.jsonl",
        [{"prompt": p, "response": "x"} for p in reversed(PROMPTS)]
        + [{"prompt": "unused", "response": "y"}],
    )
    out = tmp_path / "out"
    with RuleJudgeServer(longer_wins) as server:
        argv = [
            "eval",
            "winrate",
            "--candidate",
            str(folder),
            "--opponent",
            str(opponent),
            "--prompts",
            str(prompts),
            "--output_dir",
            str(out),
            "--judge_model",
            "rule",
            "--judge_base_url",
            server.base_url,
            "--gen_length",
            "8",
            "--steps",
            "4",
            "--block_length",
            "8",
            "--batch_size",
            "2",
            "--device",
            "cpu",
        ]
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        responses = out / f"responses_{str(folder).strip('/').replace('/', '__')}.jsonl"
        sampled = [json.loads(line) for line in responses.read_text().splitlines()]
        assert sorted(r["prompt"] for r in sampled) == sorted(PROMPTS)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["awr"] == printed["awr"] and summary["n"] == 3
        want = (
            sum(
                {"A": 1.0, "C": 0.5, "B": 0.0}[longer_wins("", r["response"], "x")] for r in sampled
            )
            / 3
        )
        assert summary["awr"] == pytest.approx(want)
        assert summary["mean_response_chars"]["opponent"] == 1.0
        asked = server.requests
        # Repeated: nothing sampled, nothing judged.
        mtime = responses.stat().st_mtime_ns
        assert main(argv) == 0
        assert server.requests == asked and responses.stat().st_mtime_ns == mtime
        # More prompts: only the new one is sampled and judged (2 orders).
        write_jsonl(prompts, [{"prompt": p} for p in PROMPTS + ["Which is a fruit?"]])
        write_jsonl(
            opponent, [{"prompt": p, "response": "x"} for p in PROMPTS + ["Which is a fruit?"]]
        )
        assert main(argv) == 0
        assert server.requests == asked + 2
        assert len(responses.read_text().splitlines()) == 4
        # A kill in the middle of an append left a torn line: it is skipped, the rest reused, and
        # the next append starts on a line of its own.
        with responses.open("a") as f:
            f.write('{"prompt": "Which is a fr')
        write_jsonl(prompts, [{"prompt": p} for p in PROMPTS + ["Which is a fruit?", "Hi"]])
        write_jsonl(
            opponent,
            [{"prompt": p, "response": "x"} for p in PROMPTS + ["Which is a fruit?", "Hi"]],
        )
        assert main(argv) == 0
        assert server.requests == asked + 4
        lines = responses.read_text().splitlines()
        assert lines[4] == '{"prompt": "Which is a fr' and json.loads(lines[5])["prompt"] == "Hi"


def test_prompts_from_a_dataset_split(tmp_path, folder):
    data = write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": [{"role": "user", "content": p}], "completion": "c", "label": i % 2 == 0}
            for i, p in enumerate(PROMPTS + PROMPTS)
        ],
    )
    answers = [{"prompt": p, "response": p.upper()} for p in PROMPTS]
    with RuleJudgeServer(longer_wins) as server:
        summary = run_winrate(
            WinrateArgs(
                candidate=str(write_jsonl(tmp_path / "a.jsonl", answers)),
                opponent=str(write_jsonl(tmp_path / "b.jsonl", answers)),
                dataset=str(data),
                dataset_split="train",
                max_samples=2,
                output_dir=str(tmp_path / "out"),
            ),
            SamplingConfig(),
            JudgeConfig(judge_model=["rule"], judge_base_url=server.base_url),
        )
    assert summary["n"] == 2 and summary["ties"] == 2 and summary["awr"] == 0.5


@pytest.mark.parametrize(
    "case, message",
    [
        ("mismatch", "2 of 3 prompts have no response"),
        ("no judge", "no judge"),
        ("dead judge", "unreachable"),
        ("bad template", "slots"),
        ("no mask token", "no mask token id"),
    ],
)
def test_clear_errors(case, message, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": p, "response": "r"} for p in PROMPTS])
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": PROMPTS[0], "response": "r"}])
    template = tmp_path / "t.txt"
    template.write_text("{question} {answer_a}")
    live = RuleJudgeServer(longer_wins).start()
    dead = RuleJudgeServer(longer_wins)  # bound, then closed: nothing listens on its port
    dead.stop()
    url = (dead if case == "dead judge" else live).base_url
    argv = [
        "eval",
        "winrate",
        "--candidate",
        str(good),
        "--opponent",
        str(good),
        "--prompts",
        str(prompts),
        "--output_dir",
        str(tmp_path / "o"),
        "--judge_base_url",
        url,
        "--judge_max_retries",
        "0",
    ]
    if case == "no mask token":
        save_tiny_model(tmp_path / "m", mask=False)
    argv += {
        "mismatch": ["--judge_model", "rule", "--opponent", str(other)],
        "no judge": [],
        "dead judge": ["--judge_model", "rule"],
        "bad template": ["--judge_model", "rule", "--judge_template", str(template)],
        "no mask token": [
            "--judge_model",
            "rule",
            "--candidate",
            str(tmp_path / "m"),
            "--device",
            "cpu",
            "--gen_length",
            "4",
            "--steps",
            "4",
            "--block_length",
            "4",
        ],
    }[case]
    capsys.readouterr()
    try:
        assert main(argv) == 2
    finally:
        live.stop()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("elbokto eval winrate: error: ") and message in err[-1]


def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "winrate", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--candidate",
        "--opponent",
        "--prompts",
        "--dataset",
        "--max_samples",
        "--judge_model",
        "--judge_base_url",
        "--judge_template",
        "--threshold",
    ):
        assert flag in text
    assert main(["eval"]) == 2


def test_the_old_baseline_flag_still_works_and_warns(tmp_path, capsys):
    """--baseline was renamed --opponent (glossary): accepted for one release, with a warning."""
    answers = write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "response": p} for p in PROMPTS])
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in PROMPTS])
    with RuleJudgeServer(longer_wins) as server:
        flags = ["--prompts", str(prompts), "--judge_model", "rule"]
        flags += ["--judge_base_url", server.base_url]
        for old, where in (("--baseline", "old"), ("--opponent", "new")):
            argv = ["eval", "winrate", "--candidate", str(answers), f"{old}={answers}", *flags]
            argv += ["--output_dir", str(tmp_path / where)]
            if old == "--baseline":
                with pytest.warns(FutureWarning, match="--baseline is now --opponent"):
                    assert main(argv) == 0
            else:
                assert main(argv) == 0
    old, new = (json.loads((tmp_path / w / "summary.json").read_text()) for w in ("old", "new"))
    assert old["opponent"] == new["opponent"] == "a" and old["awr"] == new["awr"] == 0.5
