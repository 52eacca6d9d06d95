"""The demo pipeline end to end: at smoke size, and on a small task where alignment must show (the
real figures come from `make demo`)."""

import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from kill_points import Killed, armed, torn_torch_save
from tiny_models import small_demo_config

from elbokto.cli import main
from elbokto.demo import (
    ABLATION_FIGURES,
    ABLATIONS,
    CONTROLS,
    DESIRABLE,
    OTHER,
    QUICK,
    UNDESIRABLE,
    DemoConfig,
    Encoder,
    build_model,
    classify,
    run_demo,
    sft_model,
)


def extras(pyproject: Path) -> dict[str, set[str]]:
    """pyproject.toml's optional dependencies: extra -> the import names of its packages."""
    table = pyproject.read_text().split("[project.optional-dependencies]")[1].split("\n[")[0]
    return {
        name: {re.match(r"[A-Za-z0-9_.-]+", req)[0].replace("-", "_") for req in reqs}
        for name, body in re.findall(r"^(\w+) = \[(.*?)\]", table, re.MULTILINE | re.DOTALL)
        for reqs in [re.findall(r'"([^"]+)"', body)]
    }


@pytest.mark.slow
def test_quick_demo_writes_summary_and_plot(tmp_path):
    """`make demo` installs the package with the demo extra alone: the demo runs, in a process of
    its own, with every package that only the other extras bring made unimportable."""
    by_extra = extras(Path(__file__).resolve().parents[1] / "pyproject.toml")
    assert {"openai", "lm_eval", "matplotlib"} <= set().union(*by_extra.values())
    blocked = sorted(set().union(*by_extra.values()) - by_extra["demo"])
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({blocked!r}))\n"
        "from elbokto.cli import main\n"
        f"sys.exit(main(['demo', '--quick', '--output_dir', {str(tmp_path)!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key in (
        "base_desirable_rate",
        "aligned_desirable_rate",
        "train_seconds",
        "config",
        "noise",
        "curves",
        "winrate",
    ):
        assert key in summary
    assert 0 <= summary["base_desirable_rate"] <= 1
    assert summary["config"]["mc"]["n_t"] >= 1
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_seeds_and_filter_eps(tmp_path):
    """--seeds runs one demo per seed in its own folder and gathers the rates; --filter_eps
    reaches the training runs."""
    assert (
        main(
            [
                "demo",
                "--quick",
                "--seeds",
                "1",
                "2",
                "--filter_eps",
                "2**-12",
                "--output_dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    seeds = json.loads((tmp_path / "seeds.json").read_text())
    runs = {s: json.loads((tmp_path / f"seed{s}" / "summary.json").read_text()) for s in (1, 2)}
    assert [r["config"]["seed"] for r in runs.values()] == [1, 2]
    assert all(r["config"]["filter_eps"] == 2.0**-12 for r in runs.values())
    rates = [r["aligned_desirable_rate"] for r in runs.values()]
    assert seeds["seeds"] == {
        str(s): {"base": r["base_desirable_rate"], "aligned": r["aligned_desirable_rate"]}
        for s, r in runs.items()
    }
    assert seeds["aligned"]["mean"] == sum(rates) / 2
    assert seeds["aligned"]["min"] == min(rates) and seeds["aligned"]["max"] == max(rates)
    assert seeds["filter_eps"] == 2.0**-12
    assert main(["demo", "--quick", "--seeds", "1", "1", "--output_dir", str(tmp_path)]) == 2


@pytest.mark.slow
def test_ablations_over_seeds(tmp_path):
    """--ablate --seeds: every setting for every seed, gathered in ablations.json with the spread
    over the seeds, and plotted."""
    assert (
        main(["demo", "--quick", "--ablate", "--seeds", "0", "1", "--output_dir", str(tmp_path)])
        == 0
    )
    table = json.loads((tmp_path / "ablations.json").read_text())
    assert table["seeds"] == [0, 1]
    assert list(table["settings"]) == ["default", *ABLATIONS]
    for name, entry in table["settings"].items():
        runs = [
            json.loads((tmp_path / f"seed{s}" / "summary.json").read_text())["ablations"][name]
            for s in (0, 1)
        ]
        assert list(entry["per_seed"].values()) == runs
        for r in runs:
            assert r["desirable_rate"] + r["undesirable_rate"] + r["other_rate"] == pytest.approx(
                1.0
            )
        for key in ABLATION_FIGURES:
            values = [r[key] for r in runs]
            assert entry[key]["mean"] == pytest.approx(sum(values) / 2)
            assert entry[key]["min"] == min(values) and entry[key]["max"] == max(values)
        control = table["settings"][entry["control"]]["per_seed"].values()
        assert entry["control"] == CONTROLS.get(name, "default")
        changes = [r["desirable_rate"] - d["desirable_rate"] for r, d in zip(runs, control)]
        assert entry["desirable_rate_change"]["mean"] == pytest.approx(sum(changes) / 2)
        assert entry["start_gradient_noise"]["mean"] > 0
    assert table["settings"]["default"]["desirable_rate_change"]["max"] == 0
    # At the start the policy is the reference: with CRN the margins have no MC noise, without
    # CRN they do.
    assert table["settings"]["default"]["start_psi"]["max"] == 0
    assert table["settings"]["crn=off"]["start_psi"]["min"] > 0
    default = table["settings"]["default"]["per_seed"]["0"]
    summary = json.loads((tmp_path / "seed0" / "summary.json").read_text())
    assert default["desirable_rate"] == summary["aligned_desirable_rate"]
    assert (tmp_path / "ablations.png").stat().st_size > 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--beta", "0"], "beta=0.0"),
        (["--kto_lr=-1e-4"], "kto_lr=-0.0001"),
        (["--kto_epochs", "0"], "kto_epochs=0"),
    ],
)
def test_demo_flags_refuse_bad_values(tmp_path, capsys, argv, message):
    assert main(["demo", "--quick", "--output_dir", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_kto_flags_and_the_sft_cache(tmp_path):
    """--beta, --kto_lr and --kto_epochs reach the ELBO-KTO stage; with --sft_cache a second run
    loads the SFT model the first one trained (the same SFT losses, no SFT time spent)."""
    cache = tmp_path / "cache"
    argv = ["demo", "--quick", "--sft_cache", str(cache)]
    assert main([*argv, "--output_dir", str(tmp_path / "a")]) == 0
    assert (
        main(
            [
                *argv,
                "--output_dir",
                str(tmp_path / "b"),
                "--beta",
                "0.1",
                "--kto_lr",
                "1e-3",
                "--kto_epochs",
                "2",
            ]
        )
        == 0
    )
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab")
    assert len(list(cache.iterdir())) == 1
    assert a["curves"]["sft_loss"] == b["curves"]["sft_loss"]
    assert a["base_rates"] == b["base_rates"]
    assert (b["config"]["loss"]["beta"], b["config"]["kto_lr"], b["config"]["kto_epochs"]) == (
        0.1,
        1e-3,
        2,
    )
    assert len(b["curves"]["loss"]) == 2 * len(a["curves"]["loss"])
    assert a["curves"]["loss"] != b["curves"]["loss"][: len(a["curves"]["loss"])]
    # Another seed trains (and caches) its own SFT model.
    assert main([*argv, "--output_dir", str(tmp_path / "c"), "--seeds", "1"]) == 0
    assert len(list(cache.iterdir())) == 2


def test_an_sft_cache_cut_short_or_unreadable_is_trained_again(tmp_path, caplog):
    """A kill while the cache file is written leaves no file to trip on; an unreadable one (empty,
    truncated: what such a kill left before) is trained again with a warning and replaced."""
    config = replace(DemoConfig(), **{**QUICK, "sft_steps": 3})
    encoder = Encoder(config)

    def sft(cache=None):
        model = build_model(config, encoder.tokenizer)
        losses, _ = sft_model(model, encoder, config, np.random.default_rng(0), cache)
        return model.state_dict(), losses

    state, losses = sft()
    with torn_torch_save(), pytest.raises(Killed):
        sft(tmp_path)
    with armed(lambda name, path: name == "replace"), pytest.raises(Killed):
        sft(tmp_path)
    assert list(tmp_path.iterdir()) == []
    sft(tmp_path)
    (path,) = tmp_path.iterdir()
    for broken in (b"", path.read_bytes()[: path.stat().st_size // 2]):
        path.write_bytes(broken)
        again, again_losses = sft(tmp_path)
        assert "unreadable SFT cache" in caplog.text
        assert again_losses == losses and all(torch.equal(again[k], state[k]) for k in state)
        assert torch.load(path, weights_only=True)["losses"] == losses  # replaced by a whole one
        caplog.clear()


@pytest.mark.slow
def test_alignment_moves_the_desirable_rate(tmp_path):
    """SFT leaves both styles; ELBO-KTO on unpaired feedback raises the desirable rate by 20
    points and more, and the rule judge prefers the aligned model."""
    summary = run_demo(str(tmp_path), config=small_demo_config(psi_batch_size=16, psi_redraws=2))
    base, aligned = summary["base_desirable_rate"], summary["aligned_desirable_rate"]
    assert 0.2 <= base <= 0.8, summary["base_rates"]
    assert aligned - base >= 0.2, (summary["base_rates"], summary["aligned_rates"])
    assert summary["winrate"]["ci_low"] > 0.5, summary["winrate"]
    margins = summary["curves"]["margins"]
    assert margins[-1] > margins[0]


def test_the_rule_that_judges_samples():
    # The desirable style reverses the string and upper-cases it; the other copies it.
    assert classify("abc", "CBA") == DESIRABLE
    assert classify("abc", "abc") == UNDESIRABLE
    for malformed in ("ABC", "cba", "CAB", ""):
        assert classify("abc", malformed) == OTHER
