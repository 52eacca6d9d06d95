"""Online ELBO-KTO on CPU: a tiny model learns from a rule labeller's verdicts on its own samples;
a faulty judge loses no step and mislabels nothing; a resume asks nothing twice; two ranks split
the prompts."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed import torchrun
from online_runs import ascii_start, samples, trainer, write_prompts
from training_runs import history

from elbokto.eval import RuleJudgeServer
from elbokto.eval.template import POINTWISE_SLOTS, load_template
from elbokto.labellers import CallableLabeller
from elbokto.online import balanced_lambda_d, share_rows


def test_online_loop_raises_the_desirable_rate(tmp_path):
    run = trainer(tmp_path, CallableLabeller(ascii_start, name="ascii"))
    run.train()
    rates = history(run, "online/desirable_rate")
    assert len(rates) == 24
    assert 0.25 < np.mean(rates[:2]) < 0.75  # the random model: about half
    assert np.mean(rates[-4:]) > np.mean(rates[:2]) + 0.25
    assert all(history(run, "time/sampling")) and all(history(run, "time/training"))
    logged = samples(tmp_path)
    assert len(logged) == 24 * 16
    assert all(s["desirable"] == ascii_start(s["prompt"], s["response"]) for s in logged)


def test_balance_rule():
    assert balanced_lambda_d(4, 4, 1.0, 1.0) == 1.0
    assert balanced_lambda_d(5, 4, 1.0, 1.0) == 1.0  # 1.25: inside [1, 4/3]
    assert balanced_lambda_d(12, 4, 1.0, 1.0) == pytest.approx(4 / 9)  # to 4/3
    assert balanced_lambda_d(2, 6, 1.0, 2.0) == pytest.approx(6.0)  # to 1
    assert balanced_lambda_d(0, 6, 1.0, 1.0) == balanced_lambda_d(6, 0, 1.0, 1.0) == 1.0


def test_faulty_judge_loses_no_step_and_mislabels_nothing(tmp_path):
    def rule(question, answer):
        if answer.startswith("\ufffd"):
            return None  # this judge never decides these: dropped and counted, never BAD
        return "GOOD" if ascii_start(question, answer) else "BAD"

    faults = ["429", "500", "timeout", "garbage"] * 3
    with RuleJudgeServer(
        rule,
        template=load_template(kind="pointwise"),
        slots=POINTWISE_SLOTS,
        faults=faults,
        delay=2.0,
    ) as server:
        from elbokto.eval import JudgeConfig
        from elbokto.labellers import JudgeLabeller

        judge = JudgeConfig(
            judge_model=["rule"],
            judge_base_url=server.base_url,
            judge_timeout=1.5,
            judge_backoff=0.01,
            judge_parse_retries=1,
        )
        run = trainer(tmp_path, JudgeLabeller(judge), max_steps=3)
        run.train()
    assert run.state.global_step == 3
    logged = samples(tmp_path)
    undecided = [s for s in logged if s["response"].startswith("\ufffd")]
    assert undecided and all(s["desirable"] is None for s in undecided)
    # A call that still fails after the retries (a machine so loaded that every try times out)
    # drops its sample for the step, with the error: no label, never a wrong one.
    decided = [s for s in logged if not s["response"].startswith("\ufffd")]
    wrong = [
        s for s in decided if s["desirable"] not in (None, ascii_start(s["prompt"], s["response"]))
    ]
    assert not wrong, wrong
    assert all(s["error"] for s in logged if s["desirable"] is None)
    assert sum(s["desirable"] is not None for s in decided) >= len(decided) - 2
    assert sum(history(run, "online/judge_errors")) == sum(s["desirable"] is None for s in logged)


def test_a_step_without_labels_logs_with_the_others(tmp_path):
    # Every sample of the second step goes unlabelled; a log covers three steps. That step's
    # loop metrics count like the others' (its batch is empty, its judge errors are not), and
    # the objective's metrics pool the labelled steps only.
    calls = []

    def flaky(prompt, response):
        calls.append(prompt)
        return None if 16 < len(calls) <= 32 else ascii_start(prompt, response)

    run = trainer(tmp_path, CallableLabeller(flaky, name="flaky"), max_steps=6, logging_steps=3)
    run.train()
    assert run.state.global_step == 6
    assert history(run, "online/judge_errors")[0] == pytest.approx(16 / 3)  # 0, 16, 0
    first = next(e for e in run.state.log_history if "online/judge_errors" in e)
    assert first["count/chosen"] + first["count/rejected"] == 2 * 16


@pytest.mark.parametrize("accumulation", [1, 2])
def test_resume_replays_no_labeller_call(tmp_path, accumulation):
    calls = []

    def counting(prompt, response):
        calls.append((prompt, response))
        return ascii_start(prompt, response)

    labeller = CallableLabeller(counting, name="ascii")
    first = trainer(
        tmp_path,
        labeller,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=8 // accumulation,
    )
    first.train()
    asked = len(calls)
    assert asked == first.labels.asked > 0
    before = [s for s in samples(tmp_path) if s["step"] >= 2]
    second = trainer(
        tmp_path,
        labeller,
        max_steps=4,
        save_strategy="no",
        gradient_accumulation_steps=accumulation,
        per_device_train_batch_size=8 // accumulation,
    )
    second.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))
    assert second.state.global_step == 4
    assert second.labels.asked == 0 and len(calls) == asked
    replayed = samples(tmp_path)[-len(before) :]
    assert [(s["prompt"], s["response"], s["stored"]) for s in replayed] == [
        (s["prompt"], s["response"], True) for s in before
    ]


@pytest.mark.parametrize("counts", [(3, 0), (0, 5), (4, 4), (2, 7, 0), (1, 0), (0, 1, 0), (0, 0)])
def test_shared_rows_keep_the_global_mean(counts):
    """Every process gets a row when any has one, and the data-parallel average of the processes'
    factor-scaled local means is the mean over the step's rows, for any split of the labels."""
    world = len(counts)
    values = iter(torch.randn(sum(counts), dtype=torch.float64).tolist())
    rows = [[next(values) for _ in range(n)] for n in counts]
    shares = [share_rows(rows, rank) for rank in range(world)]
    every = [v for process in rows for v in process]
    if not every:
        assert shares == [([], 1.0)] * world
        return
    assert all(mine for mine, _ in shares)
    averaged = sum(factor * sum(mine) / len(mine) for mine, factor in shares) / world
    assert averaged == pytest.approx(sum(every) / len(every), rel=1e-12)
    if len(every) >= world:  # a partition, as even as it goes
        assert sorted(v for mine, _ in shares for v in mine) == sorted(every)
        assert max(len(m) for m, _ in shares) - min(len(m) for m, _ in shares) <= 1


@pytest.mark.slow
def test_two_ranks_split_the_prompts_and_share_the_labelled_rows(tmp_path):
    """Rank 1's labeller answers nothing: its process still trains, on its share of rank 0's
    rows (a process without rows skipped the collectives and hung the run), and the two ranks'
    weights stay equal (both joined every gradient all-reduce)."""
    script = tmp_path / "rank.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
import torch, torch.distributed as dist
from elbokto.labellers import CallableLabeller
from online_runs import ascii_start, trainer
rank = int(os.environ["RANK"])
label = (lambda prompt, response: None) if rank == 1 else ascii_start
run = trainer(Path({str(tmp_path)!r}), CallableLabeller(label, name="ascii"), max_steps=2,
              per_device_train_batch_size=4, num_samples_per_prompt=1)
run.train()
weights = torch.cat([p.detach().flatten() for p in run.model.parameters()])
torch.save(weights, Path({str(tmp_path)!r}, f"weights{{rank}}.pt"))
dist.barrier()
os._exit(0)  # skip teardown: gloo's threads sometimes abort at interpreter exit
""")
    torchrun(script, timeout=300)
    w0, w1 = (torch.load(tmp_path / f"weights{rank}.pt") for rank in (0, 1))
    assert torch.equal(w0, w1) and torch.isfinite(w0).all()
    assert all(s["desirable"] is None for s in samples(tmp_path, 1))
    prompts = [
        json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()
    ]
    texts = [p if isinstance(p, str) else p[0]["content"] for p in prompts]
    rank0, rank1 = ({s["prompt"] for s in samples(tmp_path, rank)} for rank in (0, 1))
    assert len(rank0) == len(rank1) == 8  # 2 steps x 4 prompts each, none seen twice
    assert not rank0 & rank1 and rank0 | rank1 == set(texts)


def test_cli_train_online(tmp_path, capsys):
    from elbokto.cli import main

    prompts = write_prompts(tmp_path / "prompts.jsonl", n=8)
    out = tmp_path / "cli"
    common = [
        "train",
        "--online",
        "--dataset",
        str(prompts),
        "--output_dir",
        str(out),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "4",
        "--n_t",
        "2",
        "--use_cpu",
        "--report_to",
        "none",
        "--save_strategy",
        "no",
        "--gen_length",
        "4",
        "--temperature",
        "1",
        "--remasking",
        "random",
        "--kernel_backend",
        "torch",
    ]
    assert main([*common, "--labeller", "test_online:ascii_start"]) == 0
    assert (out / "config.json").exists()
    assert len((out / "online" / "samples-rank0.jsonl").read_text().splitlines()) == 2 * 4 * 2
    capsys.readouterr()
    for extra, message in (
        (["--labeller", "judge"], "--judge_model"),
        ([], "no labeller"),
        (
            ["--labeller", "x:y", "--temperature", "0", "--remasking", "low_confidence"],
            "same response every time",
        ),
    ):
        assert main([*common, *extra]) == 2
        assert message in capsys.readouterr().err


def test_online_demo_matches_the_offline_budget(tmp_path):
    from elbokto.demo.online import run_online_demo

    table = run_online_demo(str(tmp_path), [0], quick=True)
    row = table["seeds"][0]
    assert row["online_labels"] == row["offline_labels"] == 64
    assert row["online_steps"] == row["offline_steps"] == 4
    assert set(row["online_seconds"]) == {"sampling", "labelling", "training"}
    assert json.loads((tmp_path / "online.json").read_text())["seeds"]["0"]["online_steps"] == 4
    assert (tmp_path / "seed0" / "online" / "summary.json").exists()
