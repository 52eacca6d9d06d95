"""The `elbokto` command line on the tiny model: train -> generate, precompute-ref, diagnose;
selfcheck."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from training_runs import write_kto_mix

from elbokto.cli import main
from elbokto.models import TINY, ModelConfig, load_model, load_tokenizer

COMMON = [
    "--per_device_train_batch_size",
    "4",
    "--n_t",
    "2",
    "--use_cpu",
    "--report_to",
    "none",
    "--save_strategy",
    "no",
    "--max_length",
    "64",
]


def test_train_then_generate(tmp_path, capsys):
    data = write_kto_mix(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--dataset",
                str(data),
                "--output_dir",
                str(out),
                "--max_steps",
                "2",
                "--train_sampling_strategy",
                "group_by_length",
                "--pad_to_multiple_of",
                "8",
                *COMMON,
            ]
        )
        == 0
    )
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model_name_or_path",
                str(out),
                "--prompt",
                "reverse abc",
                "reverse hello",
                "--gen_length",
                "8",
                "--steps",
                "4",
                "--block_length",
                "8",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["reverse abc", "reverse hello"]
    assert all(isinstance(line["response"], str) for line in lines)


def test_precompute_ref_and_diagnose(tmp_path, capsys):
    data = write_kto_mix(tmp_path / "data.jsonl")
    ref = tmp_path / "ref.pt"
    assert (
        main(
            [
                "precompute-ref",
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path),
                "--output_file",
                str(ref),
                *COMMON,
            ]
        )
        == 0
    )
    assert ref.exists() and "wrote 16 reference ELBOs" in capsys.readouterr().out
    assert (
        main(
            [
                "diagnose",
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path),
                "--budgets",
                "2x1",
                "1x2",
                "--redraws",
                "3",
                "--batch_size",
                "4",
                "--num_batches",
                "1",
                *COMMON,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["n_t", "n_yt", "estimator", "Psi", "v", "c"]
    assert len(table) == 3
    rows = json.loads((tmp_path / "diagnose.json").read_text())
    assert [(r["n_t"], r["n_yt"]) for r in rows] == [(2, 1), (1, 2)]
    # The policy is its own reference: with common random numbers every margin is exactly 0.
    assert all(r["psi"] == r["v"] == r["c"] == 0 for r in rows)
    assert (tmp_path / "diagnose.png").stat().st_size > 0
    # The gradient still moves with the redraws: its noise is what tells the budgets apart here.
    assert (
        main(
            [
                "diagnose",
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path),
                "--budgets",
                "1x1",
                "8x1",
                "--redraws",
                "4",
                "--batch_size",
                "4",
                "--num_batches",
                "1",
                "--gradient_noise",
                *COMMON,
            ]
        )
        == 0
    )
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["n_t", "n_yt", "estimator", "Psi", "v", "c", "grad", "noise"]
    one, eight = json.loads((tmp_path / "diagnose.json").read_text())
    assert 0 < eight["gradient_noise"] < one["gradient_noise"]


def test_usage_and_bad_flags(capsys):
    assert main([]) == 2
    assert "elbokto train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--no_such_flag", "1"])


ONE = {"prompt": "q", "completion": "a", "label": True}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--dataset", "{empty}"], "empty file"),
        (["train", "--dataset", "{garbage}"], "not readable as json"),
        (["train", "--dataset", "{tmp}/missing.jsonl"], "no such file"),
        (["train", "--dataset", "{data}", "--n_t", "0"], "n_t=0"),
        (["train", "--dataset", "{data}", "--n_yt", "-2"], "n_yt=-2"),
        (["train", "--dataset", "{data}", "--estimator", "uniform"], "invalid choice: 'uniform'"),
        (["train", "--dataset", "{data}", "--eps", "1.5"], "eps=1.5"),
        (["train", "--dataset", "{data}", "--beta", "-1"], "beta=-1.0"),
        (["train", "--dataset", "{data}", "--lambda_u", "-0.5"], "lambda_u=-0.5"),
        (
            ["train", "--dataset", "{data}", "--baseline", "mean"],
            "argument --baseline: invalid choice: 'mean'",
        ),
        (["train", "--dataset", "{data}", "--loss_type", "dpo"], "loss_type='dpo'"),
        (["train", "--dataset", "{data}", "--loss_type", "elbo_dpo"], "unpaired layout"),
        (["train", "--dataset", "{data}", "--mc_chunk_size", "0"], "mc_chunk_size"),
        (["train", "--dataset", "{data}", "--max_length", "0"], "max_length"),
        (["train", "--dataset", "{data}", "--max_prompt_length", "-3"], "max_prompt_length"),
        (["train", "--dataset", "{data}", "--desirable_fraction", "2"], "fractions"),
        (["train", "--dataset", "{data}", "--pad_to_multiple_of", "0"], "pad_to_multiple_of"),
        (
            ["train", "--dataset", "{data}", "--end_of_turn_token_id", "100000"],
            "end_of_turn_token_id",
        ),
        (["train", "--dataset", "{data}", "--mask_token_id", "100000"], "--mask_token_id 100000"),
        (["train", "--dataset", "{data}", "--kernel_backend", "cuda"], "backend"),
        (["train", "--dataset", "{data}", "--filter_eps", "2**x"], "--filter_eps '2**x'"),
        (["train", "--dataset", "{data}", "--block_size", "0"], "block_size=0"),
        (["train", "--dataset", "{data}", "--ref_elbo_file", "{garbage}"], "not a reference ELBO"),
        (["train", "--dataset", "{data}", "--ref_elbo_file", "{empty}"], "not a reference ELBO"),
        (["train", "--dataset", "{data}", "--ref_elbo_file", "{tmp}/nope.pt"], "does not exist"),
        (
            ["train", "--dataset", "{data}", "--resume_from_checkpoint", "last"],
            "no complete checkpoint",
        ),
        (
            ["train", "--dataset", "{data}", "--model_name_or_path", "./nope"],
            "--model_name_or_path ./nope: no such local model folder",
        ),
        (
            ["train", "--dataset", "{data}", "--ref_model_name_or_path", "{tmp}/nope"],
            "/nope: no such local model folder",
        ),
        (["diagnose", "--dataset", "{data}", "--batch_size", "1"], "--batch_size 1"),
        (["diagnose", "--dataset", "{data}", "--redraws", "1"], "--redraws 1"),
        (["diagnose", "--dataset", "{data}", "--budgets", "8by1"], "--budgets '8by1'"),
        (["diagnose", "--dataset", "{data}", "--batch_size", "64"], "no full batch"),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "garbage.jsonl").write_text("this is { not json\n")
    rows = [ONE, {**ONE, "completion": "b", "label": False}]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    names = {
        "empty": tmp_path / "empty.jsonl",
        "garbage": tmp_path / "garbage.jsonl",
        "data": tmp_path / "data.jsonl",
        "tmp": tmp_path,
    }
    argv = [a.format(**names) for a in argv]
    try:
        code = main(
            [*argv, "--output_dir", str(tmp_path / "out"), "--use_cpu", "--report_to", "none"]
        )
    except SystemExit as exit:  # argparse's own one-line error (e.g. a value outside choices)
        code = exit.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"elbokto {argv[0]}: error: ") and message in err, err


def test_merge_refuses_what_is_no_adapter_folder(tmp_path, capsys):
    assert (
        main(["merge", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path / "m")])
        == 2
    )
    assert "not a LoRA adapter folder (no adapter_config.json)" in capsys.readouterr().err
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "tiny"}))
    assert (
        main(["merge", "--model_name_or_path", str(tmp_path), "--output_dir", str(tmp_path)]) == 2
    )
    assert "is the adapter folder itself" in capsys.readouterr().err


@pytest.mark.slow
def test_selfcheck_without_triton_interpret():
    """`elbokto selfcheck` imports transformers, and with it triton, before the self-check runs;
    on CPU the Triton rows must still appear (under the interpreter)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "elbokto.cli", "selfcheck"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for op in ("fused_elbo", "fused_linear_elbo"):
        assert re.search(rf"^{op} +triton +float32 .* yes$", result.stdout, re.M), result.stdout
    assert "all backends within tolerance" in result.stdout


def test_lora_adapter_folder_loads_everywhere_and_merges(tmp_path, capsys):
    """`train --lora_r` saves only an adapter; generate, precompute-ref and merge load it as its
    base with the adapter merged in, and the merged model gives the adapter model's logits."""
    data = write_kto_mix(tmp_path / "data.jsonl")
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert (
        main(
            [
                "train",
                "--dataset",
                str(data),
                "--output_dir",
                str(adapter),
                "--max_steps",
                "2",
                "--lora_r",
                "4",
                "--learning_rate",
                "0.01",
                *COMMON,
            ]
        )
        == 0
    )
    assert (adapter / "adapter_config.json").exists() and not (adapter / "config.json").exists()
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model_name_or_path",
                str(adapter),
                "--prompt",
                "reverse abc",
                "--gen_length",
                "8",
                "--steps",
                "4",
                "--block_length",
                "8",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["prompt"] == "reverse abc"
    assert (
        main(
            [
                "precompute-ref",
                "--model_name_or_path",
                str(adapter),
                "--dataset",
                str(data),
                "--output_dir",
                str(tmp_path),
                "--output_file",
                str(tmp_path / "ref.pt"),
                *COMMON,
            ]
        )
        == 0
    )
    assert "wrote 16 reference ELBOs" in capsys.readouterr().out
    assert main(["merge", "--model_name_or_path", str(adapter), "--output_dir", str(merged)]) == 0
    assert (merged / "config.json").exists() and (merged / "tokenizer.json").exists()

    tokenizer = load_tokenizer(ModelConfig(model_name_or_path=str(adapter)))
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = {
            name: load_model(str(path), ModelConfig(), tokenizer=tokenizer)(ids).logits
            for name, path in (("adapter", adapter), ("merged", merged), ("base", TINY))
        }
    torch.testing.assert_close(logits["merged"], logits["adapter"])
    assert (logits["adapter"] - logits["base"]).abs().max() > 1e-3  # the adapter was applied


def test_eval_errors_take_the_one_error_path(monkeypatch, capsys):
    """`elbokto eval ...` reports like every command: one line under its subcommand's name, the
    traceback with ELBOKTO_DEBUG=1."""
    import elbokto.eval.cli

    def fails(argv):
        raise ValueError("the judge\n  said nothing")

    monkeypatch.setattr(elbokto.eval.cli, "winrate", fails)
    assert main(["eval", "winrate"]) == 2
    assert capsys.readouterr().err.strip() == "elbokto eval winrate: error: the judge said nothing"
    monkeypatch.setenv("ELBOKTO_DEBUG", "1")
    with pytest.raises(ValueError, match="the judge"):
        main(["eval", "winrate"])
