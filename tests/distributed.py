"""Multi-process tests: a script run on two gloo ranks under torchrun, as users launch training."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def torchrun(
    script: Path, *args: str, nproc: int = 2, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node nproc script *args`` with one thread per
    rank and tests/ importable; fails the test with the ranks' stderr unless every rank exits 0."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
        *args,
    ]
    # Output to files, not pipes: a rank outliving the launcher would hold a pipe open. On a
    # hang, SIGTERM makes torchrun stop its ranks (they run in sessions of their own); then the
    # launcher goes.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        launcher = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        hung = False
        try:
            launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            hung = True
            launcher.terminate()
            try:
                launcher.wait(timeout=60)
            except subprocess.TimeoutExpired:
                launcher.kill()
                launcher.wait()
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert not hung, f"the ranks hung past {timeout} s: {stderr[-3000:]}"
    result = subprocess.CompletedProcess(cmd, launcher.returncode, stdout, stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def assert_every_rank_matched(result: subprocess.CompletedProcess, nproc: int = 2) -> None:
    """The workers print ``rank r: match`` or ``rank r: MISMATCH``."""
    assert result.stdout.count("match") == nproc and "MISMATCH" not in result.stdout, (
        result.stdout + result.stderr[-3000:]
    )


# --- inside a rank -------------------------------------------------------------------------------


def fsdp2_gradients_differ(sharded, plain) -> list[str]:
    """The names of the trainable parameters whose FSDP2 gradient (a sharded DTensor) is not the
    mean over ranks of the unsharded model's. FSDP2 averages with an AVG reduce-scatter, which
    gloo computes as a sum before some torch release (2.7 does): the expected gradient follows
    what this gloo does."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    probe = torch.empty(1)
    dist.reduce_scatter_tensor(probe, torch.ones(world), op=dist.ReduceOp.AVG)
    scale = probe.item() / world  # 1 / world where gloo averages, 1 where it sums
    trained = [(n, p) for n, p in sharded.named_parameters() if p.requires_grad]
    expected = [q for q in plain.parameters() if q.requires_grad]
    assert len(trained) == len(expected) > 0
    differ = []
    for (name, p), q in zip(trained, expected):
        mean_grad = q.grad.clone()
        dist.all_reduce(mean_grad)
        if not torch.allclose(p.grad.full_tensor(), mean_grad * scale, rtol=1e-4, atol=1e-6):
            differ.append(name)
    return differ


def report_and_exit(ok: bool, problems: list[str]) -> None:
    """Prints ``rank r: match`` / ``MISMATCH`` (read by :func:`assert_every_rank_matched`) and
    the problems, waits for every rank, and exits without interpreter teardown: gloo's threads
    under FSDP2 sometimes abort at exit after all the work is done ("terminate called without an
    active exception"), which would fail the run at random."""
    import torch.distributed as dist

    rank = dist.get_rank()
    for problem in problems:
        print(f"rank {rank}: {problem}", file=sys.stderr)
    print(f"rank {rank}: {'match' if ok and not problems else 'MISMATCH'}", flush=True)
    dist.barrier()
    os._exit(0)
