"""`train` stopped at its writes (kill_points) and damaged checkpoints: nothing on disk loads
wrongly, and the next `--resume_from_checkpoint last` resumes from the newest complete checkpoint
and repairs the output folder, ending bit for bit where an uninterrupted run ends."""

import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kill_points import Killed, armed
from safetensors.torch import load_file
from training_runs import configs, write_kto_mix

from elbokto import durable
from elbokto.run import train

# Checkpoints every step; rotation keeps one, so that it must wait for the seal of the new one.
SAVE = {"save_strategy": "steps", "save_steps": 1, "save_total_limit": 1}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A first run of 2 steps (its checkpoints and final model), and the weights an uninterrupted
    continuation to 4 steps produces: at each checkpoint and at the end."""
    root = tmp_path_factory.mktemp("runs")
    data = write_kto_mix(root / "data.jsonl")
    train(*configs(root / "first", data, max_steps=2, **SAVE))
    shutil.copytree(root / "first", root / "straight")
    train(
        *configs(root / "straight", data, max_steps=4, **{**SAVE, "save_total_limit": None}),
        resume_from_checkpoint="last",
    )
    out = root / "straight" / "out"
    return {
        "root": root,
        "data": data,
        "after_2": _weights(root / "first" / "out"),
        "final": _weights(out),
        "checkpoints": {k: _weights(out / f"checkpoint-{k}") for k in range(2, 5)},
    }


def _continue(runs, folder: Path, **kw):
    """The continued run (2 -> 4 steps) in ``folder``: `train --resume_from_checkpoint last`."""
    return train(
        *configs(folder, runs["data"], max_steps=4, **{**SAVE, **kw}), resume_from_checkpoint="last"
    )


def _fresh_copy(runs, name: str) -> Path:
    folder = runs["root"] / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(runs["root"] / "first", folder)
    return folder


def _assert_nothing_loads_wrongly(runs, out: Path) -> None:
    """Every checkpoint that counts holds the weights of its step; the model folder holds the
    old weights or the new ones, or none at all (it then fails to load). That no other file of
    the other version sits beside them, test_durable checks with files that differ by version
    (here the config is the same before and after)."""
    for folder in out.glob("checkpoint-*"):
        if durable.check_complete(folder) is None:
            step = int(folder.name.split("-")[1])
            assert _same(_weights(folder), runs["checkpoints"][step]), folder
    if (out / "model.safetensors").exists():
        weights = _weights(out)
        assert _same(weights, runs["after_2"]) or _same(weights, runs["final"])


def _assert_repaired(runs, out: Path) -> None:
    assert durable.check_complete(out) is None
    assert _same(_weights(out), runs["final"])
    assert not durable.staging_folder(out).exists()
    assert not [p for p in out.rglob("*") if p.name.startswith(".tmp") or p.suffix == ".tmp"]


def _write_points(runs) -> list[tuple[str, str]]:
    folder = _fresh_copy(runs, "count")
    with armed(None) as seen:
        _continue(runs, folder)
    return list(seen)


def _targeted(points: list[tuple[str, str]]) -> list[int]:
    """Write points (1-based) where a kill is most likely to tear something: the weights of the
    first new checkpoint, its marker, the rotation after it, the final save's weights, the first
    move of the final model into place and its marker; and one more at random (test_durable
    stops the publish at each of its writes)."""

    def first(name, where, after=0):
        return next(
            i for i, (n, p) in enumerate(points, 1) if i > after and n == name and where in p
        )

    final_moves = [
        i
        for i, (n, p) in enumerate(points, 1)
        if n == "replace" and "/out/" in p and "checkpoint" not in p and "staging" not in p
    ]
    chosen = {
        first("safetensors", "checkpoint-3"),
        first("replace", "checkpoint-3"),
        first("rmtree", "checkpoint-2"),
        first("safetensors", "staging"),
        final_moves[0],
        final_moves[-1],
    }
    chosen.add(random.Random(0).randint(1, len(points)))
    return sorted(chosen)


@pytest.mark.slow
def test_kills_at_write_points_of_a_continued_run(runs):
    """The main kill trial, in process: stopped before each chosen write, then resumed."""
    points = _write_points(runs)
    for n in _targeted(points):
        folder = _fresh_copy(runs, f"killed-{n}")
        with armed(n), pytest.raises(Killed):
            _continue(runs, folder)
        _assert_nothing_loads_wrongly(runs, folder / "out")
        trainer = _continue(runs, folder)
        assert trainer.state.global_step == 4, (n, points[n - 1])
        _assert_repaired(runs, folder / "out")
        shutil.rmtree(folder)


@pytest.mark.soak
def test_kills_at_every_write_point_of_a_continued_run(runs):
    """The same at every write point (about 140: 11 minutes on a busy 2-core machine)."""
    for n in range(1, len(_write_points(runs)) + 1):
        folder = _fresh_copy(runs, f"killed-{n}")
        with armed(n), pytest.raises(Killed):
            _continue(runs, folder)
        _assert_nothing_loads_wrongly(runs, folder / "out")
        _continue(runs, folder)
        _assert_repaired(runs, folder / "out")
        shutil.rmtree(folder)


@pytest.mark.parametrize(
    "damage",
    [
        "optimizer.pt removed",
        "model.safetensors cut in half",
        "trainer_state.json removed",
        "marker removed",
    ],
)
def test_last_falls_back_past_a_damaged_checkpoint(runs, damage, caplog):
    """A checkpoint whose files are not what its save wrote is skipped, named with the reason;
    the run resumes from the one before and ends bit for bit where the uninterrupted one does."""
    folder = _fresh_copy(runs, "damaged")
    train(
        *configs(folder, runs["data"], max_steps=3, **{**SAVE, "save_total_limit": 2}),
        resume_from_checkpoint="last",
    )
    checkpoint = folder / "out" / "checkpoint-3"
    name = damage.split()[0]
    if damage == "model.safetensors cut in half":
        data = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data[: len(data) // 2])
    else:
        (checkpoint / (durable.MARKER if name == "marker" else name)).unlink()
    with pytest.raises(ValueError, match=r"checkpoint-3: .*(optimizer|model|trainer|marker)"):
        train(
            *configs(folder, runs["data"], max_steps=4, **SAVE),
            resume_from_checkpoint=str(checkpoint),
        )
    # Saving step 3 again replaces the damaged folder; cut short (here after all but its last
    # file was rewritten), it does not count either, whatever the old folder's marker said.
    with (
        armed(lambda name, path: path.endswith("checkpoint-3/trainer_state.json")),
        pytest.raises(Killed),
    ):
        _continue(runs, folder)
    assert durable.check_complete(checkpoint) is not None
    _continue(runs, folder)
    assert f"skipping {checkpoint}" in caplog.text
    assert _same(_weights(folder / "out"), runs["final"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_trials_of_the_cli(runs, tmp_path, seed):
    """Real kills: `elbokto train` in a subprocess SIGKILLs itself at a random write point, then
    `--resume_from_checkpoint last` runs to the end in a fresh process."""
    folder = _fresh_copy(runs, f"sigkill-{seed}")
    n = random.Random(seed).randint(1, len(_write_points(runs)))
    argv = [
        "train",
        "--dataset",
        str(runs["data"]),
        "--max_length",
        "64",
        "--output_dir",
        str(folder / "out"),
        "--max_steps",
        "4",
        "--save_strategy",
        "steps",
        "--save_steps",
        "1",
        "--save_total_limit",
        "2",
        "--resume_from_checkpoint",
        "last",
        *(
            f"--{k}={v}"
            for k, v in (
                ("per_device_train_batch_size", 4),
                ("learning_rate", 3e-3),
                ("beta", 1.0),
                ("n_t", 2),
                ("use_cpu", True),
                ("report_to", "none"),
                ("lr_scheduler_type", "constant"),
                ("kernel_backend", "torch"),
            )
        ),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    tests = Path(__file__).parent
    killed = subprocess.run(
        [sys.executable, str(tests / "kill_points.py"), str(n), *argv],
        env=env,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    _assert_nothing_loads_wrongly(runs, folder / "out")
    resumed = subprocess.run(
        [sys.executable, "-m", "elbokto.cli", *argv], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_repaired(runs, folder / "out")
