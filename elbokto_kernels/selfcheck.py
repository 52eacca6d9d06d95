"""Self-check: every backend usable here against the float64 oracle, as a small table.

    python -m elbokto_kernels.selfcheck [device]     (or: elbokto selfcheck)

Without CUDA the Triton kernels run under the interpreter (TRITON_INTERPRET=1), so the shapes stay
small. The interpreter is decided when triton is first imported: ``run`` turns it on when triton
is not imported yet, and otherwise checks in a fresh process (``elbokto selfcheck`` has imported
transformers, which imports triton). A TRITON_INTERPRET already set is left as it is.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import torch

from .backends import Backend, usable_backends
from .elbo import fused_elbo
from .linear_elbo import fused_linear_elbo
from .oracle import elbo_oracle, linear_elbo_oracle, relative_error, tolerances


def _case(dtype: torch.dtype, device: torch.device, seed: int):
    C, L, D, V, B = 8, 16, 32, 1000, 2
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(C, L, generator=g) < 0.5
    args = dict(
        targets=torch.randint(0, V, (C, L), generator=g).masked_fill(~mask, -100),
        mask=mask,
        weights=torch.rand(C, generator=g) + 0.5,
        sample_index=torch.arange(C) // (C // B),
        num_samples=B,
    )
    args = {k: v.to(device) if torch.is_tensor(v) else v for k, v in args.items()}
    hidden = torch.randn(C, L, D, generator=g).to(device, dtype)
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(device, dtype)
    logits = (torch.randn(C, L, V, generator=g) * 3).to(device, dtype)
    upstream = torch.randn(B, generator=g).to(device)
    return args, hidden, weight, logits, upstream


def _check(op: str, backend: Backend, dtype: torch.dtype, device: torch.device):
    args, hidden, weight, logits, upstream = _case(dtype, device, seed=0)
    inputs = (logits,) if op == "fused_elbo" else (hidden, weight)
    leaves = [t.detach().requires_grad_() for t in inputs]
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    start = time.perf_counter()
    if op == "fused_elbo":
        out = fused_elbo(*leaves, **args, backend=backend)
    else:
        out = fused_linear_elbo(*leaves, **args, softcap=30.0, backend=backend)
    grads = torch.autograd.grad(out, leaves, upstream)
    ms = (time.perf_counter() - start) * 1e3
    if op == "fused_elbo":
        ref = elbo_oracle(*leaves64, **args)
    else:
        hidden, weight = leaves64
        ref = linear_elbo_oracle(hidden, weight, None, 30.0, **args)
    ref_grads = torch.autograd.grad(ref, leaves64, upstream.double())
    value_err = relative_error(out, ref)
    grad_err = max(relative_error(g, r) for g, r in zip(grads, ref_grads, strict=True))
    value_tol, grad_tol = tolerances(dtype)
    ok = value_err <= value_tol and grad_err <= grad_tol
    return value_err, grad_err, ms, ok


def run(device: str | None = None) -> bool:
    """Prints the table; True when every backend is within DESIGN.md §4's tolerances."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and "TRITON_INTERPRET" not in os.environ:
        if "triton" in sys.modules:  # too late for the interpreter in this process
            sys.stdout.flush()
            child = subprocess.run(
                [sys.executable, "-m", "elbokto_kernels.selfcheck", str(dev)],
                env={**os.environ, "TRITON_INTERPRET": "1"},
            )
            return child.returncode == 0
        os.environ["TRITON_INTERPRET"] = "1"
    print(
        f"elbokto_kernels self-check on {dev} (C=8 copies x L=16, V=1000, D=32; errors are "
        "relative to the float64 oracle)"
    )
    print(f"{'op':<18}{'backend':<8}{'dtype':<10}{'value err':>11}{'grad err':>11}{'ms':>9}  ok")
    all_ok = True
    backends = usable_backends(dev)
    for op in ("fused_elbo", "fused_linear_elbo"):
        for backend in backends:
            for dtype in (torch.float32, torch.bfloat16):
                value_err, grad_err, ms, ok = _check(op, backend, dtype, dev)
                all_ok &= ok
                print(
                    f"{op:<18}{backend:<8}{str(dtype)[6:]:<10}{value_err:>11.1e}"
                    f"{grad_err:>11.1e}{ms:>9.1f}  {'yes' if ok else 'NO'}"
                )
    print("all backends within tolerance" if all_ok else "SOME BACKEND IS OUT OF TOLERANCE")
    return all_ok


if __name__ == "__main__":
    raise SystemExit(0 if run(*sys.argv[1:2]) else 1)
