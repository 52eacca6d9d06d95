"""Shared measurement helpers of the CPU benchmarks: time, peak memory, one process per variant.

Memory on CPU: after a warm-up step the kernel's peak resident set size is reset
(``echo 5 > /proc/self/clear_refs``); the figure is the peak during the timed steps minus the
resident size at that point: the extra memory the method needs at its worst. Large tensors come
from mmap and go back to the OS when freed, so resident size follows live tensors closely. On
CUDA the figure is torch.cuda's peak allocation over the step minus the allocation before it.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def time_and_peak(step, repeats: int, device: str = "cpu") -> tuple[float, int]:
    """(median seconds of ``repeats`` calls of ``step`` after one warm-up, peak extra bytes)."""
    import torch

    cuda = device.startswith("cuda")
    step()  # warm-up: libraries, thread pools, kernel compilation are not the method's memory
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # peak RSS := current RSS
        base = _rss_bytes("VmRSS")
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")
    return statistics.median(times), peak - base


def run_worker(script: str, argv: list[str], env: dict[str, str] | None = None) -> dict:
    """Runs ``script argv`` in a fresh Python process (``env`` added to this one's environment);
    returns the JSON of its last output line.

    A fixed mmap threshold keeps glibc from raising it after the first frees (its default), which
    would serve later large tensors from the heap and hide them from the resident-size peak."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17), **(env or {})}
    proc = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{Path(script).name} {' '.join(argv)} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def record_in_readme(path: Path, title: str, body: str) -> None:
    """Writes ``body`` under the heading ``## title`` of ``path``, replacing that section only."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda _: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    path.write_text(text)
