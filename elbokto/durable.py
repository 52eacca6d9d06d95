"""Writes that survive a kill or a power cut: a file or folder is either the old one or the new one.

Every file elbokto writes goes through here (DESIGN.md §3, "Durability"):

- :func:`atomic_write`: one file, written to a temporary name beside it, fsynced, renamed over
  the destination, the folder fsynced.
- :func:`seal` / :func:`check_complete`: a folder counts as complete only once its marker,
  ``elbokto-complete.json``, exists and the files it lists have the sizes it records. The marker
  is written last, after every file has been fsynced, so a kill at any point leaves either no
  marker or a folder whose every file is whole. Checkpoints are sealed this way.
- :func:`publish`: a model folder (the final model of ``train``, ``merge``) is written into a
  staging folder inside the destination, sealed, then moved in file by file (the old weights are
  removed before any new file arrives, the new weights arrive last), so a cut-short move never
  leaves old weights beside a new config. :func:`recover` finishes such a move (or drops an
  unsealed staging folder) and removes leftover temporaries; ``train`` runs it at start.
- :func:`append_lines`: the append-only caches (responses, judgments) start a fresh line after
  a torn one and fsync what they add.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

MARKER = "elbokto-complete.json"
STAGING = ".elbokto-staging"
# The manifest of the folder a publish replaces, kept in the staging folder while it moves in:
# a move resumed after a kill still knows which old files to remove.
_PREVIOUS = ".elbokto-previous.json"
# Temporaries: ours (".<name>.<random>.tmp", the random part from tempfile's alphabet) and
# safetensors' (".tmp" + 6 characters, written beside the file it replaces).
_OURS = r"\.{name}\.[a-z0-9_]+\.tmp"
_TEMPORARY = re.compile(rf"{_OURS.format(name='.+')}|\.tmp[A-Za-z0-9_]{{6}}")
_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth")

__all__ = [
    "MARKER",
    "append_lines",
    "atomic_write",
    "check_complete",
    "commit",
    "discard",
    "fsync_dir",
    "publish",
    "recover",
    "seal",
    "staging_folder",
]


def fsync_dir(folder: str | os.PathLike) -> None:
    """Makes the entries of ``folder`` (created, renamed, removed files) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[IO[bytes]], None]) -> None:
    """Writes ``path`` so that it is either its old content or the whole new one, even after a
    kill or a power cut.

    ``data``: bytes, text (UTF-8) or a function that writes into the binary file it is given
    (``lambda f: torch.save(obj, f)``). The bytes go to ``.<name>.<random>.tmp`` in the same
    folder (a rename across file systems would copy), are fsynced, renamed over ``path``, and the
    folder is fsynced. Temporaries left by an earlier write of ``path`` that was killed are
    removed first; one of this write is removed if it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(path.parent, re.compile(_OURS.format(name=re.escape(path.name))))
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Appends ``lines`` (each without its newline) to a JSON-lines file and fsyncs it.

    A line cut short by a kill ends without a newline; the appended lines then start on a line
    of their own, so that only the torn line is lost (its reader skips it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(line + "\n" for line in lines)
    with path.open("a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())


def _files(folder: Path) -> dict[str, int]:
    """Relative path -> size of every file under ``folder``, the marker and temporaries aside."""
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in (MARKER, _PREVIOUS) and not _TEMPORARY.fullmatch(p.name)
    }


def seal(folder: str | os.PathLike) -> None:
    """Marks ``folder`` complete: fsyncs every file and subfolder under it, then writes the
    marker listing each file with its size. Call it once every file of the folder is written
    (by every process)."""
    folder = Path(folder)
    files = _files(folder)
    for name in files:
        with (folder / name).open("rb") as f:
            os.fsync(f.fileno())
    for sub in {(folder / name).parent for name in files}:
        fsync_dir(sub)
    atomic_write(folder / MARKER, json.dumps({"files": files}, indent=1))


def _manifest(folder: Path, name: str = MARKER) -> dict[str, int] | None:
    """The files the marker of ``folder`` (or its copy ``name``) lists; None without a readable
    one."""
    try:
        return json.loads((folder / name).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def check_complete(folder: str | os.PathLike) -> str | None:
    """None when ``folder`` was sealed and every file its marker lists is there with its size;
    else what is wrong, in words ("optimizer.pt is missing")."""
    folder = Path(folder)
    files = _manifest(folder)
    if files is None:
        state = "unreadable" if (folder / MARKER).exists() else "missing"
        return f"its completion marker {MARKER} is {state} (the save did not finish)"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its save wrote {size}"
    return None


def discard(folder: str | os.PathLike) -> None:
    """Removes ``folder``, its marker first: a removal cut short leaves an unmarked folder."""
    folder = Path(folder)
    if not folder.exists():
        return
    (folder / MARKER).unlink(missing_ok=True)
    fsync_dir(folder)
    shutil.rmtree(folder)
    fsync_dir(folder.parent)


def publish(dest: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Replaces the model folder ``dest`` by what ``write(staging)`` writes, durably.

    Files of ``dest`` that the old version did not write (checkpoints, other outputs) stay."""
    dest = Path(dest)
    recover(dest)
    staging = staging_folder(dest)
    discard(staging)
    staging.mkdir(parents=True)
    write(staging)
    commit(staging, dest)


def staging_folder(dest: str | os.PathLike) -> Path:
    """Where :func:`publish` writes the new version of ``dest`` before moving it in."""
    return Path(dest) / STAGING


def commit(staging: Path, dest: Path) -> None:
    """Seals ``staging`` and moves it into ``dest`` (:func:`publish`'s second half, for writers
    that fill the staging folder from several processes and commit from one)."""
    seal(staging)
    _move_in(staging, dest)


def _move_in(staging: Path, dest: Path) -> None:
    """Moves the sealed ``staging`` folder's files into ``dest``; resumable after a kill.

    Order: the old marker goes (into staging, so that a resumed move still knows the old files),
    then the old files that the new version drops or replaces, weights first, then the new
    files, weights last, then the new marker. Until the marker, ``dest`` is unmarked and holds
    the whole old model, or no weights, or the whole new model: never a mix that loads."""
    files = _manifest(staging)
    if files is None:
        raise RuntimeError(f"{staging}: no readable {MARKER}; only a sealed folder is moved in")
    if (dest / MARKER).exists():
        os.replace(dest / MARKER, staging / _PREVIOUS)
        fsync_dir(staging)
        fsync_dir(dest)
    previous = _manifest(staging, _PREVIOUS) or {}
    for name in sorted(set(previous) | set(files), key=_install_order, reverse=True):
        if (staging / name).exists() or name not in files:
            (dest / name).unlink(missing_ok=True)
    fsync_dir(dest)
    for name in sorted(files, key=_install_order):
        if (staging / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, dest / name)
            fsync_dir((dest / name).parent)
    atomic_write(dest / MARKER, json.dumps({"files": files}, indent=1))
    shutil.rmtree(staging)
    fsync_dir(dest)


def _install_order(name: str) -> tuple[bool, bool, str]:
    """Weights after everything else, and a weights index (what loaders look for) after them."""
    weights = name.endswith(_WEIGHTS)
    index = name.endswith(".index.json")
    return weights or index, index, name


def recover(folder: str | os.PathLike) -> None:
    """Brings ``folder`` (an output folder) back to a state that needs no hand: finishes a
    :func:`publish` whose staging folder was sealed, drops one that was not, and removes the
    temporaries that killed writes left in it and in its ``checkpoint-*`` folders."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    staging = staging_folder(folder)
    if staging.is_dir():
        if _manifest(staging) is not None:
            logger.warning("%s: finishing the save that a kill cut short", folder)
            _move_in(staging, folder)
        else:
            logger.warning("%s: removing the unfinished save %s", folder, staging)
            discard(staging)
    _remove_temporaries(folder)
    for checkpoint in folder.glob("checkpoint-*"):
        for sub in [checkpoint, *(p for p in checkpoint.rglob("*") if p.is_dir())]:
            _remove_temporaries(sub)


def _remove_temporaries(folder: Path, pattern: re.Pattern = _TEMPORARY) -> None:
    """Removes the temporaries of killed writes in ``folder`` (those of one file: ``pattern``)."""
    for path in folder.iterdir():
        if pattern.fullmatch(path.name) and path.is_file():
            logger.info("removing %s, left by a write that was cut short", path)
            path.unlink(missing_ok=True)
