"""Fault injection for the durability tests: stop a process at its n-th write.

A write point is a call that changes the file system: opening a file for writing, os.replace /
rename, unlinking, fsync, rmtree, torch.save and the safetensors writer transformers uses (the
last two write from C++ / Rust, past Python's ``open``). ``armed(n)`` makes the n-th such call
(counted from 1), or the first for which ``n(function, path)`` is true, stop the process *before*
it runs: in-process it raises :class:`Killed` (a
BaseException, so no ``except Exception`` catches it; only ``finally`` blocks run after it), and
with ``sigkill=True`` (a subprocess's trial, ``python kill_points.py N argv...``) the process
SIGKILLs itself. ``armed(None)`` only records the points, as (function, path) pairs.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import shutil
import signal
import sys
from collections.abc import Callable

import torch
import transformers.modeling_utils as modeling_utils


class Killed(BaseException):
    """The process stopped at a write point (in-process stand-in for SIGKILL)."""


# (owner, attribute, name, the argument that names the path).
_POINTS = [
    (os, "replace", "replace", 1),
    (os, "rename", "rename", 1),
    (os, "unlink", "unlink", 0),
    (os, "fsync", "fsync", 0),
    (shutil, "rmtree", "rmtree", 0),
    (torch, "save", "save", 1),
    (modeling_utils, "safe_save_file", "safetensors", 1),
    (builtins, "open", "open", 0),
    (io, "open", "open", 0),
    (os, "open", "open", 0),
]


def _writes(name: str, args: tuple, kwargs: dict) -> bool:
    """Whether the call changes files (an open only in a writing mode)."""
    if name != "open":
        return True
    mode = args[1] if len(args) > 1 else kwargs.get("mode", kwargs.get("flags", "r"))
    if isinstance(mode, int):
        return bool(mode & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    return any(c in mode for c in "wax+")


def _path_of(value) -> str:
    if isinstance(value, int):  # a file descriptor
        with contextlib.suppress(OSError):
            return os.readlink(f"/proc/self/fd/{value}")
    return str(value) if isinstance(value, (str, os.PathLike)) else type(value).__name__


@contextlib.contextmanager
def armed(n: int | Callable[[str, str], bool] | None, sigkill: bool = False):
    """Stops at the n-th write point, or the first one ``n`` accepts (None: never); yields the
    list of points seen so far."""
    seen: list[tuple[str, str]] = []
    originals = [(owner, attr, getattr(owner, attr)) for owner, attr, _, _ in _POINTS]

    def wrap(function, name, which):
        def point(*args, **kwargs):
            if not _writes(name, args, kwargs):
                return function(*args, **kwargs)
            seen.append((name, _path_of(args[which] if len(args) > which else None)))
            if len(seen) == n or callable(n) and n(*seen[-1]):
                for owner, attr, original in originals:
                    setattr(owner, attr, original)  # the cleanup that follows runs unhindered
                if sigkill:
                    os.kill(os.getpid(), signal.SIGKILL)
                raise Killed(f"stopped at write {n}: {seen[-1]}")
            return function(*args, **kwargs)

        return point

    for (owner, attr, name, which), (_, _, original) in zip(_POINTS, originals):
        setattr(owner, attr, wrap(original, name, which))
    try:
        yield seen
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


@contextlib.contextmanager
def torn_torch_save():
    """torch.save writes the first half of its bytes, then the process stops (Killed): a kill in
    the middle of a write, where the write points above stop before it."""
    save = torch.save

    def half(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()[: len(buffer.getvalue()) // 2]
        if isinstance(f, (str, os.PathLike)):
            with builtins.open(f, "wb") as out:
                out.write(data)
        else:
            f.write(data)
        raise Killed("stopped half-way through torch.save")

    torch.save = half
    try:
        yield
    finally:
        torch.save = save


if __name__ == "__main__":
    # python kill_points.py N elbokto-argv...: the CLI, SIGKILLed at its N-th write point.
    from elbokto.cli import main

    with armed(int(sys.argv[1]), sigkill=True):
        code = main(sys.argv[2:])
    sys.exit(code)
