"""The `elbokto` command line on the tiny model: train -> generate, precompute-ref, diagnose;
selfcheck."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from elbokto.cli import main
from test_trainer import write_kto_mix

COMMON = ["--per_device_train_batch_size", "4", "--n_t", "2", "--use_cpu", "--report_to", "none",
          "--save_strategy", "no", "--max_length", "64"]


def test_train_then_generate(tmp_path, capsys):
    data = write_kto_mix(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    assert main(["train", "--dataset", str(data), "--output_dir", str(out), "--max_steps", "2",
                 "--train_sampling_strategy", "group_by_length", "--pad_to_multiple_of", "8",
                 *COMMON]) == 0
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    capsys.readouterr()
    assert main(["generate", "--model_name_or_path", str(out), "--prompt", "reverse abc",
                 "reverse hello", "--gen_length", "8", "--steps", "4",
                 "--block_length", "8"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["reverse abc", "reverse hello"]
    assert all(isinstance(line["response"], str) for line in lines)


def test_precompute_ref_and_diagnose(tmp_path, capsys):
    data = write_kto_mix(tmp_path / "data.jsonl")
    ref = tmp_path / "ref.pt"
    assert main(["precompute-ref", "--dataset", str(data), "--output_dir", str(tmp_path),
                 "--output_file", str(ref), *COMMON]) == 0
    assert ref.exists() and "wrote 16 reference ELBOs" in capsys.readouterr().out
    assert main(["diagnose", "--dataset", str(data), "--output_dir", str(tmp_path),
                 "--budgets", "2x1", "1x2", "--redraws", "3", "--batch_size", "4",
                 "--num_batches", "1", *COMMON]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["n_t", "n_yt", "estimator", "Psi", "v", "c"]
    assert len(table) == 3


def test_usage_and_bad_flags(capsys):
    assert main([]) == 2
    assert "elbokto train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--no_such_flag", "1"])


def test_selfcheck_without_triton_interpret():
    """`elbokto selfcheck` imports transformers, and with it triton, before the self-check runs;
    on CPU the Triton rows must still appear (under the interpreter)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "elbokto.cli", "selfcheck"], env=env,
                            capture_output=True, text=True, timeout=600,
                            cwd=Path(__file__).resolve().parent.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    for op in ("fused_elbo", "fused_linear_elbo"):
        assert re.search(rf"^{op} +triton +float32 .* yes$", result.stdout, re.M), result.stdout
    assert "all backends within tolerance" in result.stdout
