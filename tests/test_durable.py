"""elbokto.durable under faults: every write point of every primitive stopped in turn (kill_points),
truncated and missing files, leftover temporaries; and the order of fsyncs a power cut needs."""

import json
import os

import pytest
from kill_points import Killed, armed

from elbokto import durable


def _write_model(folder, version, weights=("model.safetensors",)):
    """A stand-in model folder whose every file names its version."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", *weights):
        (folder / name).write_text(f"{name} v{version}" + "x" * version)


def _versions(folder):
    """The version each model file of ``folder`` holds."""
    return {
        p.name: int(p.read_text().split(" v")[1].rstrip("x"))
        for p in folder.iterdir()
        if p.is_file() and p.name != durable.MARKER and not p.name.startswith(".")
    }


def _points(action):
    """How many write points ``action()`` passes."""
    with armed(None) as seen:
        action()
    return len(seen)


def _killed_at(n, action):
    with armed(n), pytest.raises(Killed):
        action()


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "ref.pt"

    def write():
        durable.atomic_write(path, lambda f: (f.write(b"new, half"), f.write(b" and the rest")))

    with armed(None) as seen:
        write()
    renamed = [name for name, _ in seen].index("replace") + 1  # the write point of the rename
    for n in range(1, len(seen) + 1):
        path.write_bytes(b"old")
        _killed_at(n, write)
        assert path.read_bytes() == (b"old" if n <= renamed else b"new, half and the rest"), n
    # The killed writes' temporaries (a kill leaves them) go with the next write of the file.
    (tmp_path / ".ref.pt.abc_12x.tmp").write_bytes(b"half")
    (tmp_path / "other.pt").write_bytes(b"kept")
    write()
    assert path.read_bytes() == b"new, half and the rest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt", "ref.pt"]


def test_atomic_write_fsyncs_the_data_before_the_rename_and_the_folder_after(tmp_path):
    path = tmp_path / "summary.json"
    with armed(None) as seen:
        durable.atomic_write(path, "{}")
    calls = [(name, os.path.basename(p)) for name, p in seen if name in ("fsync", "replace")]
    # The file's bytes, then its new name, then the folder entry holding that name.
    assert calls[0][0] == "fsync" and calls[0][1].startswith(".summary.json.")
    assert calls[1:] == [("replace", "summary.json"), ("fsync", tmp_path.name)]


def test_append_lines_starts_after_a_torn_line(tmp_path):
    path = tmp_path / "judgments.jsonl"
    durable.append_lines(path, ['{"key": 1}'])
    with path.open("a") as f:
        f.write('{"key": 2, "ver')  # a kill in the middle of an append
    durable.append_lines(path, ['{"key": 3}', '{"key": 4}'])
    lines = path.read_text().splitlines()
    assert lines == ['{"key": 1}', '{"key": 2, "ver', '{"key": 3}', '{"key": 4}']


def test_check_complete_names_what_is_wrong(tmp_path):
    folder = tmp_path / "checkpoint-3"
    _write_model(folder, 1, weights=("model.safetensors", "optimizer.pt"))
    assert "completion marker elbokto-complete.json is missing" in durable.check_complete(folder)
    durable.seal(folder)
    assert durable.check_complete(folder) is None
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    assert durable.check_complete(folder) == (
        f"model.safetensors has {len(data) // 2} bytes, its save wrote {len(data)}"
    )
    weights.write_bytes(data)
    (folder / "optimizer.pt").unlink()
    assert durable.check_complete(folder) == "optimizer.pt is missing"
    (folder / durable.MARKER).write_text('{"files": ')
    assert "is unreadable" in durable.check_complete(folder)


def test_seal_fsyncs_every_file_before_the_marker(tmp_path):
    folder = tmp_path / "checkpoint-1"
    _write_model(folder, 1)
    (folder / "global_step1").mkdir()
    (folder / "global_step1" / "shard.pt").write_text("shard v1")
    with armed(None) as seen:
        durable.seal(folder)
    marker = next(
        i for i, (name, p) in enumerate(seen) if name == "replace" and p.endswith(durable.MARKER)
    )
    synced = {os.path.relpath(p, folder) for name, p in seen[:marker] if name == "fsync"}
    assert {
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "global_step1/shard.pt",
        "global_step1",
        ".",
    } <= synced
    files = json.loads((folder / durable.MARKER).read_text())["files"]
    assert set(files) == {
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "global_step1/shard.pt",
    }


@pytest.mark.parametrize(
    "weights",
    [("model.safetensors",), ("model-1.safetensors", "model.safetensors.index.json")],
    ids=["one-file", "sharded"],
)
def test_publish_killed_at_every_write_never_shows_old_weights_beside_new_files(tmp_path, weights):
    """The final save of a continued run, stopped at each of its writes: until recovery the
    folder holds the whole old model, the whole new one, or (unmarked) nothing a loader opens
    first; recovery then leaves the new model if it was fully staged, else the old one."""
    dest = tmp_path / "out"
    durable.publish(dest, lambda staging: _write_model(staging, 1, weights=("old.safetensors",)))
    (dest / "checkpoint-1").mkdir()  # the run's other files stay
    (dest / "checkpoint-1" / "optimizer.pt").write_text("state")

    def publish():
        durable.publish(dest, lambda staging: _write_model(staging, 2, weights))

    old = {name: 1 for name in ("config.json", "tokenizer.json", "old.safetensors")}
    new = {name: 2 for name in ("config.json", "tokenizer.json", *weights)}
    for n in range(1, _points(publish) + 1):
        durable.publish(dest, lambda staging: _write_model(staging, 1, ("old.safetensors",)))
        _killed_at(n, publish)
        versions = _versions(dest)
        marked = durable.check_complete(dest) is None
        # Unmarked, the folder may be a whole model, or one that does not load: no file a loader
        # opens first (the single weights file, or the index of the shards).
        assert (
            versions in (old, new)
            or not marked
            and not set(versions)
            & {"old.safetensors", "model.safetensors", "model.safetensors.index.json"}
        ), (n, versions)
        # Recovery finishes a move whose staging folder was sealed, and drops an unsealed one.
        staged = (durable.staging_folder(dest) / durable.MARKER).exists()
        durable.recover(dest)
        assert durable.check_complete(dest) is None and not durable.staging_folder(dest).exists()
        assert _versions(dest) == (new if staged or (marked and versions == new) else old), n
        assert (dest / "checkpoint-1" / "optimizer.pt").read_text() == "state"
        assert not list(dest.rglob("*.tmp"))


def test_recover_removes_temporaries_in_the_output_and_its_checkpoints_only(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoint-2" / "global_step2").mkdir(parents=True)
    leftovers = [
        out / ".tmpAb3xYz",
        out / ".config.json.k2_9ab.tmp",
        out / "checkpoint-2" / ".tmpQw8rTy",
        out / "checkpoint-2" / "global_step2" / ".tmp_a1b2c",
    ]
    kept = [
        out / "model.safetensors",
        out / "notes.tmp",
        out / ".tmpdir-long-name",
        out / "checkpoint-2" / "optimizer.pt",
        tmp_path / ".tmpAb3xYz",
    ]
    for path in leftovers + kept:
        path.write_text("x")
    (out / ".elbokto-staging").mkdir()  # a publish killed before its seal
    (out / ".elbokto-staging" / "config.json").write_text("{}")
    durable.recover(out)
    assert [p for p in leftovers if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert not (out / ".elbokto-staging").exists()


def test_discard_unmarks_before_removing(tmp_path):
    folder = tmp_path / "checkpoint-4"
    _write_model(folder, 1)
    durable.seal(folder)
    with armed(None) as seen:
        durable.discard(folder)
    assert not folder.exists()
    assert seen[0] == ("unlink", str(folder / durable.MARKER))


def test_resume_checkpoint_checks_a_named_folder_given_as_text_or_path(tmp_path):
    from elbokto.trainer import resume_checkpoint

    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    for named in (folder, str(folder)):
        with pytest.raises(ValueError, match="completion marker"):
            resume_checkpoint(str(tmp_path), named)
    durable.seal(folder)
    assert resume_checkpoint(str(tmp_path), folder) == str(folder)
    assert resume_checkpoint(str(tmp_path), "last") == str(folder)
    assert resume_checkpoint(str(tmp_path), None) is None
