"""Huge-page advice for the ops' large CPU buffers (elbokto_kernels/memory.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from devices import on_device

from elbokto_kernels import fused_elbo, memory
from elbokto_kernels.oracle import assert_close, elbo_oracle, tolerances

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux")
    or not THP_MODE.exists()
    or "[never]" in THP_MODE.read_text(),
    reason="needs Linux with transparent huge pages",
)


@pytest.fixture(autouse=True)
def fresh_setting(monkeypatch):
    """Each test reads the environment afresh (the setting is cached per process)."""
    monkeypatch.delenv(memory.ENV_VAR, raising=False)
    memory._madvise.cache_clear()
    yield
    memory._madvise.cache_clear()


def thp_eligible(address: int) -> bool:
    """Whether the mapping holding ``address`` may get huge pages (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "THPeligible:":
            return line.split()[1] == "1"
    raise AssertionError(f"no mapping holds {address:#x}")


@needs_thp
def test_large_buffer_is_advised():
    t = memory.empty((memory.MIN_BYTES,), torch.float32, torch.device("cpu"))
    inner = -(-t.data_ptr() // (2 << 20)) * (2 << 20)
    assert thp_eligible(inner)
    t.fill_(1.5)  # the advice does not change what the tensor holds or its size
    assert t.shape == (memory.MIN_BYTES,) and bool((t == 1.5).all())


@needs_thp
def test_small_buffers_and_opt_out_are_not_advised(monkeypatch):
    assert memory.advise_huge_pages(torch.empty(memory.MIN_BYTES // 4))  # float32: MIN_BYTES
    assert not memory.advise_huge_pages(torch.empty(memory.MIN_BYTES // 8))
    monkeypatch.setenv(memory.ENV_VAR, "0")
    memory._madvise.cache_clear()
    assert not memory.advise_huge_pages(torch.empty(memory.MIN_BYTES // 4))


def test_bad_setting_is_an_error(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "yes")
    with pytest.raises(ValueError, match=memory.ENV_VAR):
        memory.empty((4,), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize("setting", ["0", "1"])
def test_gradient_is_the_same_either_way(monkeypatch, backend, setting):
    """fused_elbo's logits gradient (a buffer over MIN_BYTES, which every backend writes into)
    with and without the advice."""
    monkeypatch.setenv(memory.ENV_VAR, setting)
    gen = torch.Generator().manual_seed(0)
    C, L, V = 2, 64, 20000
    logits = torch.randn(C, L, V, generator=gen)
    mask = torch.rand(C, L, generator=gen) < 0.5
    targets = torch.randint(0, V, (C, L), generator=gen).masked_fill(~mask, -100)
    weights = torch.rand(C, generator=gen) + 0.5
    sample_index = torch.tensor([0, 0])
    logits, mask, targets, weights, sample_index = on_device(
        logits, mask, targets, weights, sample_index
    )
    logits.requires_grad_()
    out = fused_elbo(logits, targets, mask, weights, sample_index, 1, backend=backend)
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert grad.numel() * 4 >= memory.MIN_BYTES
    x = logits.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(elbo_oracle(x, targets, mask, weights, sample_index, 1).sum(), x)
    assert_close(grad, want, tolerances(torch.float32)[1], "gradient")
