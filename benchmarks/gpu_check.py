"""The prepared GPU check: correctness at real shapes, then forward+backward timings of every
variant.

    python benchmarks/gpu_check.py            # on a CUDA GPU (run time: benchmarks/README.md)
    python benchmarks/gpu_check.py --dry-run  # tiny shapes on CPU (Triton interpreter)

The backends are every one that works on the device (``usable_backends``): on a GPU triton and
the torch path. Step 1 checks each against a float64 oracle (a slice of rows) and against the
torch path at LLaDA shapes. Step 2 measures the bf16 GEMM rate and the device-to-device copy
bandwidth, the two hardware limits the kernels are judged against (DESIGN.md §5). Step 3 times
forward + backward (median of triton.testing.do_bench) of:

  fused_linear_elbo: each backend, "auto"'s also with keep_logits and with filter_eps="auto"
      (gradient filtering), eager (masked rows -> matmul -> float32 log_softmax -> gather ->
      index_add), torch.compile(eager), F.linear_cross_entropy (reference and chunked), Liger's
      fused linear cross-entropy and Apple's Cut Cross-Entropy (when importable); and "auto"
      exact, filtered, and Cut Cross-Entropy again on hidden states of a trained-looking head
      ("zipf": comparators.zipf_hidden_states, the "half" distribution of bench_cpu.py, where about
      half of the sorted 128 x 128 tiles hold an entry above 2^-12), the kind of logits
      filtering is for;
  fused_elbo: each backend, eager (full float32 log_softmax + gather + index_add),
      torch.compile(eager).

Inputs: [C, L] = 2M positions of which M are masked (the masked rows are half of all rows), D =
4096, V in {126464 (LLaDA), 151936 (Dream)}, M in {2048, 8192, 16384}, bf16. TFLOP/s count 6MDV;
"floor" is 6MDV at the measured GEMM rate; "peak GB" is the workspace of one step: peak memory
beyond its inputs and the gradients it returns.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    p.add_argument("--vocab", type=int, nargs="*", default=None, help="override vocabulary sizes")
    p.add_argument("--rows", type=int, nargs="*", default=None, help="override masked-row counts")
    p.add_argument("--skip-compile", action="store_true", help="leave torch.compile out")
    return p.parse_args()


ARGS = parse_args()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch
import torch.nn.functional as F
from comparators import (
    cce_linear,
    eager_elbo,
    eager_linear,
    liger_linear,
    make_inputs,
    torch_lce_linear,
    zipf_hidden_states,
)

from elbokto_kernels import fused_elbo, fused_linear_elbo, usable_backends
from elbokto_kernels.backends import resolve_backend
from elbokto_kernels.oracle import (
    elbo_oracle,
    filter_bounds,
    linear_elbo_oracle,
    relative_error,
)

if ARGS.dry_run:
    DEVICE, HIDDEN, VOCABS, ROWS, SEQ = torch.device("cpu"), 64, (1000, 1503), (32, 64), 16
else:
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --dry-run for the CPU smoke test")
    DEVICE, HIDDEN, VOCABS, ROWS, SEQ = (
        torch.device("cuda"),
        4096,
        (126464, 151936),
        (2048, 8192, 16384),
        512,
    )
VOCABS = ARGS.vocab or VOCABS
ROWS = ARGS.rows or ROWS
DTYPE = torch.bfloat16
BACKENDS = usable_backends(DEVICE)
AUTO = resolve_backend("auto", DEVICE)
# bf16 gradients: 1e-2 (DESIGN.md §4); the interpreter truncates float32 -> bf16 stores instead of
# rounding them, which biases every element towards zero and doubles the error.
GRAD_TOL = 2e-2 if ARGS.dry_run else 1e-2


# ---- measurement -------------------------------------------------------------------------------


def median_ms(fn) -> float:
    fn()  # compile / warm caches outside the measurement
    if DEVICE.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_extra_gb(fn, grad_bytes: int) -> float:
    """Workspace of one step: peak memory beyond its inputs and the gradients it returns."""
    if DEVICE.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base - grad_bytes) / 1e9


def gemm_tflops(m: int, d: int, v: int) -> float:
    a = torch.randn(m, d, device=DEVICE, dtype=DTYPE)
    b = torch.randn(v, d, device=DEVICE, dtype=DTYPE)
    return 2 * m * d * v / median_ms(lambda: a @ b.T) / 1e9


def copy_gbps(nbytes: int = 1 << 32) -> float:
    n = (nbytes if DEVICE.type == "cuda" else 1 << 24) // 2
    src = torch.randn(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / median_ms(lambda: dst.copy_(src)) / 1e6


def label(backend: str) -> str:
    return "torch path" if backend == "torch" else backend


def linear_variants():
    v = {}
    for backend in BACKENDS:
        v[label(backend)] = lambda h, w, a, b=backend: fused_linear_elbo(h, w, **a, backend=b)
        if backend == AUTO:
            v[f"{backend} keep_logits"] = lambda h, w, a, b=backend: fused_linear_elbo(
                h, w, **a, keep_logits=True, backend=b
            )
            v.update(filter_variants())
    v["eager"] = eager_linear
    if not ARGS.dry_run and not ARGS.skip_compile:
        v["compile(eager)"] = torch.compile(eager_linear, dynamic=True)
    if hasattr(F, "linear_cross_entropy"):
        v["F.linear_cross_entropy"] = lambda h, w, a: torch_lce_linear(h, w, a, chunked=False)
        v["F.linear_cross_entropy chunked"] = lambda h, w, a: torch_lce_linear(h, w, a, True)
    if not ARGS.dry_run:
        try:
            import liger_kernel  # noqa: F401

            v["liger flce"] = liger_linear
        except ImportError:
            pass
        v.update({k: f for k, f in filter_variants().items() if k == "cut cross-entropy"})
    return v


def filter_variants():
    """The filtered op and Cut Cross-Entropy (on a GPU, when importable)."""
    v = {
        f"{AUTO} filter_eps=auto": lambda h, w, a: fused_linear_elbo(
            h, w, **a, filter_eps="auto", backend=AUTO
        )
    }
    if not ARGS.dry_run:
        try:
            import cut_cross_entropy  # noqa: F401

            v["cut cross-entropy"] = cce_linear
        except ImportError:
            pass
    return v


def zipf_inputs(a: dict, w):
    """The hidden states and targets of the "zipf" timings: a's mask, weights and samples."""
    g = torch.Generator(device=DEVICE).manual_seed(2)
    h, tokens = zipf_hidden_states(w.detach(), a["mask"].numel(), "half", g)
    targets = tokens.view(a["mask"].shape).masked_fill(~a["mask"], -100)
    return h.view(*a["mask"].shape, -1).requires_grad_(), {**a, "targets": targets}


def elbo_variants():
    v = {
        label(backend): lambda x, a, b=backend: fused_elbo(x, **a, backend=b)
        for backend in BACKENDS
    }
    v["eager"] = eager_elbo
    if not ARGS.dry_run and not ARGS.skip_compile:
        v["compile(eager)"] = torch.compile(eager_elbo, dynamic=True)
    return v


# ---- step 1: correctness -----------------------------------------------------------------------


def check_correctness() -> None:
    v, m, D = VOCABS[0], min(ROWS), HIDDEN
    a, up = make_inputs(m, v, DEVICE, SEQ, seed=1)
    h = (torch.randn(*a["mask"].shape, D, device=DEVICE) * 2).to(DTYPE).requires_grad_()
    w = (torch.randn(v, D, device=DEVICE) / D**0.5).to(DTYPE).requires_grad_()
    results = {}
    for backend in BACKENDS:
        out = fused_linear_elbo(h, w, **a, softcap=30.0, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, (h, w), up))
    # The float64 oracle on the first copy alone: its rows fit in float64 at full vocabulary.
    first = {k: t[:1] if torch.is_tensor(t) else t for k, t in a.items()}
    h1, w1 = h[:1].detach(), w.detach()
    ref = linear_elbo_oracle(h1.double(), w1.double(), None, 30.0, **first)
    for backend in BACKENDS:
        if backend != "torch":
            errs = [relative_error(x, y) for x, y in zip(results[backend], results["torch"])]
            print(
                f"linear {backend} vs torch path (M={m}, V={v}, softcap 30): value "
                f"{errs[0]:.1e}, dH {errs[1]:.1e}, dW {errs[2]:.1e}"
            )
            assert errs[0] < 1e-4 and max(errs[1:]) < GRAD_TOL, (
                f"linear {backend} disagrees with torch path"
            )
        out = fused_linear_elbo(h1, w1, **first, softcap=30.0, backend=backend)
        err = relative_error(out, ref)
        print(f"linear {backend} vs float64 oracle: value {err:.1e}")
        assert err < 1e-4, f"linear {backend} disagrees with the float64 oracle"
        check_filtered(backend, h1, w1, first, up)
    x = (torch.randn(*a["mask"].shape, v, device=DEVICE) * 4).to(DTYPE).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = elbo_oracle(x64, **a)
    (ref_grad,) = torch.autograd.grad(ref, x64, up.double())
    for backend in BACKENDS:
        out = fused_elbo(x, **a, backend=backend)
        (grad,) = torch.autograd.grad(out, x, up)
        errs = relative_error(out, ref), relative_error(grad, ref_grad)
        print(f"elbo {backend} vs float64 oracle: value {errs[0]:.1e}, grad {errs[1]:.1e}")
        assert errs[0] < 1e-4 and errs[1] < GRAD_TOL, f"fused_elbo ({backend}) disagrees"


def check_filtered(backend: str, h, w, a: dict, up) -> None:
    """filter_eps="auto" on one copy: each gradient within DESIGN.md §4's filtered bound of the
    float64 oracle (plus the bf16 gradient tolerance)."""
    leaves = [t.detach().requires_grad_() for t in (h, w)]
    out = fused_linear_elbo(*leaves, **a, softcap=30.0, filter_eps="auto", backend=backend)
    grads = torch.autograd.grad(out, leaves, up)
    leaves64 = [t.detach().double().requires_grad_() for t in (h, w)]
    ref = linear_elbo_oracle(*leaves64, None, 30.0, **a)
    exact = torch.autograd.grad(ref, leaves64, up.double())
    eps = torch.finfo(DTYPE).eps / 32
    bounds = filter_bounds(
        *leaves64, None, 30.0, a["targets"], a["mask"], a["weights"], a["sample_index"], up, eps
    )
    excess = [
        ((g.double() - e).abs() - b).max().item() / e.abs().max().item()
        for g, e, b in zip(grads, exact, bounds)
    ]
    print(
        f"linear {backend} filter_eps=auto vs float64 oracle: dH, dW beyond the filtered bound "
        f"{max(excess[0], 0):.1e}, {max(excess[1], 0):.1e}"
    )
    assert max(excess) < GRAD_TOL, f"filtered linear {backend} exceeds the filtered bound"


# ---- step 3: timings ---------------------------------------------------------------------------


def measure(name, fn, inputs, upstream):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        torch.autograd.grad(fn(*inputs), leaves, upstream)

    try:
        return median_ms(step), peak_extra_gb(step, sum(t.nbytes for t in leaves))
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return float("nan"), float("inf")
    except Exception as err:  # a third-party variant that does not run here is reported, not fatal
        print(f"  {name}: {type(err).__name__}: {str(err)[:120]}")
        return float("nan"), float("nan")


def main() -> None:
    device_name = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "CPU (dry run)"
    print(f"device: {device_name}; torch {torch.__version__}")
    check_correctness()
    bandwidth = copy_gbps()
    print(f"device-to-device copy: {bandwidth:.0f} GB/s")
    header = (
        f"{'op':<7}{'V':>7}{'M':>6}  {'variant':<31}{'ms':>9}{'TFLOP/s':>9}{'vs limit':>10}"
        f"{'peak GB':>9}"
    )
    rows = []
    for v in VOCABS:
        for m in ROWS:
            a, up = make_inputs(m, v, DEVICE, SEQ)
            D = HIDDEN
            flops = 6 * m * D * v
            rate = gemm_tflops(m, D, v)
            floor_ms = flops / rate / 1e9
            h = (torch.randn(*a["mask"].shape, D, device=DEVICE)).to(DTYPE).requires_grad_()
            w = (torch.randn(v, D, device=DEVICE) / D**0.5).to(DTYPE).requires_grad_()
            for name, fn in linear_variants().items():
                ms, gb = measure(name, fn, (h, w, a), up)
                rows.append(("linear", v, m, name, ms, flops / ms / 1e9, ms / floor_ms, gb))
            rows.append(
                (
                    "linear",
                    v,
                    m,
                    f"GEMM floor ({rate:.0f} TFLOP/s)",
                    floor_ms,
                    rate,
                    1.0,
                    float("nan"),
                )
            )
            h_zipf, a_zipf = zipf_inputs(a, w)
            zipf = {f"{AUTO} (zipf)": lambda h, w, a: fused_linear_elbo(h, w, **a, backend=AUTO)}
            for name, fn in {**zipf, **filter_variants()}.items():
                ms, gb = measure(name, fn, (h_zipf, w, a_zipf), up)
                rows.append(
                    (
                        "linear",
                        v,
                        m,
                        name.removesuffix(" (zipf)") + " (zipf)",
                        ms,
                        flops / ms / 1e9,
                        ms / floor_ms,
                        gb,
                    )
                )
            del h, w, h_zipf
            x = torch.randn(*a["mask"].shape, v, device=DEVICE).to(DTYPE).requires_grad_()
            # Bytes the op must move: masked rows read once, their gradient written once.
            must_move = m * v * x.element_size() * 2
            for name, fn in elbo_variants().items():
                ms, gb = measure(name, fn, (x, a), up)
                rows.append(
                    ("elbo", v, m, name, ms, float("nan"), must_move / ms / 1e6 / bandwidth, gb)
                )
            del x
            if DEVICE.type == "cuda":
                torch.cuda.empty_cache()
    print(header)
    for op, v, m, name, ms, tflops, ratio, gb in rows:
        limit = f"{ratio:.2f}x" if op == "linear" else f"{ratio:.0%} BW"
        print(f"{op:<7}{v:>7}{m:>6}  {name:<31}{ms:>9.2f}{tflops:>9.1f}{limit:>10}{gb:>9.2f}")
    print(
        "vs limit: linear = time / GEMM floor (lower is better); elbo = must-move bytes "
        "(masked rows read once + gradient written once) / time / copy bandwidth; (zipf): "
        "hidden states of a trained-looking head, where filtering skips most tiles"
    )


if __name__ == "__main__":
    main()
