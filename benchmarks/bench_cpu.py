"""CPU benchmark of the "cpu" backend against eager PyTorch, the torch backend and
``torch.nn.functional.linear_cross_entropy``: forward + backward time and peak extra memory.

    python benchmarks/bench_cpu.py                 # the goal shapes
    python benchmarks/bench_cpu.py --quick         # small shapes; checks the script runs
    python benchmarks/bench_cpu.py --readme benchmarks/README.md   # also record the table there
    python benchmarks/bench_cpu.py --case fused_linear_elbo_filter  # gradient filtering only

Cases (float32, 2048 masked rows, per-copy weights, 4 samples of 2 copies each):
  fused_elbo         logits [8, 512, 32000], 2048 of the 4096 positions masked; gradient to logits.
  fused_linear_elbo  hidden [8, 512, 512], weight [32000, 512], same mask; gradients to hidden and
                     weight. The comparators get the 2048 masked rows gathered
                     (``hidden[mask]``), so none of them spends GEMMs on unmasked rows; they do 3
                     GEMMs of 2*M*D*V FLOPs, the fused op 4 (its backward recomputes the logits), 3
                     with keep_logits=True.
  fused_linear_elbo_filter  the same shapes with ``filter_eps=2**-12``, at the logit
                     distributions of ``comparators.ZIPF_DISTRIBUTIONS``, against the fastest
                     comparators (eager, F.linear_cross_entropy) and the exact op. Each
                     distribution comes with its density (share of entries of softmax - onehot
                     >= 2^-12), the share of 128 x 128 tiles (masked rows in order x 128 columns)
                     holding such an entry, with the columns in vocabulary order and sorted by
                     mean logit, and the share of the op's own tiles (one row x one chunk of the
                     sorted walk) it computes.

Logit distributions (``comparators.zipf_hidden_states``): a token's frequency follows a Zipf law
(rank r has probability ~ r^-1.1) over a shuffled vocabulary, so frequent tokens are scattered
over the ids and only sorting gathers them. Masked row i mixes k tokens t_1..t_k drawn from that
law, h_i = s * sum_j W[t_j] / sqrt(k) + sigma * N(0, I_D), and its target is t_1: the more tokens
and the more isotropic noise, the more entries the softmax spreads over. "uniform" has no tokens,
sigma = 2: i.i.d. N(0, 4) logits, ~2% of the entries above 2^-12 spread evenly, so no tile can be
skipped.

Huge pages: the fused ops ask for transparent huge pages behind their large CPU buffers
(``elbokto_kernels/memory.py``), which PyTorch gives every tensor only under
``THP_MEM_ALLOC_ENABLE=1``. The goals are judged in the default environment, as users run eager
PyTorch; the "+ THP" rows rerun the fused op and eager with ``THP_MEM_ALLOC_ENABLE=1`` for every
tensor, so the table also shows the ratio when eager gets huge pages too.

Method (helpers in ``measure.py``). Each variant runs in fresh processes, so allocator caches and
the peaks of other variants cannot leak into its figures; ``--rounds`` processes per variant are
interleaved with the other variants', so a change in the load of a shared machine hits all alike.
Time: median over the rounds of each process's median of ``--repeats`` forward + backward passes
(``torch.autograd.grad``) after one warm-up pass. Memory: peak resident set size during the timed
passes minus the resident size before them, the largest over the rounds: the extra memory the
method needs at its worst, outputs and gradients included (the logits gradient alone is 500 MiB
in fused_elbo, the same for every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from comparators import zipf_hidden_states
from measure import record_in_readme, run_worker, time_and_peak

SHAPES = {
    "full": dict(C=8, L=512, V=32000, D=512, masked=2048),
    "quick": dict(C=4, L=256, V=8000, D=256, masked=512),
}
VARIANTS = {
    "fused_elbo": ["cpu", "torch", "eager", "cpu+thp", "eager+thp"],
    "fused_linear_elbo": [
        "cpu",
        "eager",
        "lce",
        "lce_chunked",
        "lce_chunked_ar1",
        "cpu_keep",
        "cpu+thp",
        "eager+thp",
    ],
    # "variant@distribution"; the default chunked linear_cross_entropy, slowest on CPU by far,
    # is left to the case above.
    "fused_linear_elbo_filter": [
        "eager@half",
        "lce@half",
        "lce_chunked_ar1@half",
        "cpu@half",
        "cpu@uniform",
        "cpu_filter@very sparse",
        "cpu_filter@half",
        "cpu_filter@sparse",
        "cpu_filter@dense",
        "cpu_filter@uniform",
    ],
}
FILTER_EPS = 2.0**-12
TILE = 128  # rows and columns of the tiles the sparsity figures count
THP = "+thp"  # variant suffix: the process runs with THP_MEM_ALLOC_ENABLE=1
VARIANT_LABELS = {
    "cpu": "fused, backend='cpu'",
    "torch": "fused, backend='torch'",
    "eager": "eager PyTorch",
    "lce": "F.linear_cross_entropy (options=None)",
    "lce_chunked": "F.linear_cross_entropy (LinearCrossEntropyOptions())",
    "lce_chunked_ar1": "F.linear_cross_entropy (chunking_method='aspect_ratio')",
    "cpu_keep": "fused, backend='cpu', keep_logits=True",
    "cpu_filter": "fused, backend='cpu', filter_eps=2**-12",
    "cpu+thp": "fused, backend='cpu' + THP for every tensor",
    "eager+thp": "eager PyTorch + THP for every tensor",
}
# (comparators the "cpu" variant is compared with, minimum speed-up, maximum memory vs eager)
GOALS = {
    "fused_elbo": (["eager", "torch"], 3.0, 0.4),
    "fused_linear_elbo": (["eager", "lce", "lce_chunked", "lce_chunked_ar1"], 1.3, 0.3),
    "fused_linear_elbo_filter": (["eager@half", "lce@half", "lce_chunked_ar1@half"], 1.3, 0.3),
}
MIB = 1 << 20


# ---------------------------------------------------------------- worker (one variant, one process)


def _inputs(shape: dict, case: str, distribution: str | None = None):
    import torch

    torch.manual_seed(0)
    C, L, V, D = shape["C"], shape["L"], shape["V"], shape["D"]
    mask = torch.zeros(C * L, dtype=torch.bool)
    mask[torch.randperm(C * L)[: shape["masked"]]] = True
    mask = mask.view(C, L)
    targets = torch.randint(0, V, (C, L)).masked_fill(~mask, -100)
    weights = torch.rand(C) + 0.5
    sample_index = torch.arange(C) // 2
    num_samples = C // 2
    grad_out = torch.randn(num_samples)
    common = (targets, mask, weights, sample_index, num_samples, grad_out)
    if case == "fused_elbo":
        return (torch.randn(C, L, V, requires_grad=True),) + common
    weight = torch.randn(V, D) / D**0.5
    if distribution is None:
        hidden = torch.randn(C, L, D)
    else:
        hidden, tokens = zipf_hidden_states(weight, C * L, distribution)
        hidden = hidden.view(C, L, D)
        if tokens is not None:
            targets = tokens.view(C, L).masked_fill(~mask, -100)
            common = (targets,) + common[1:]
    return (hidden.requires_grad_(), weight.requires_grad_()) + common


def sparsity(shape: dict, distribution: str) -> dict:
    """The distribution's figures over the masked rows: density (share of entries of
    |softmax - onehot| >= FILTER_EPS), the share of TILE x TILE tiles holding such an entry with
    the columns in vocabulary order and sorted by mean logit, and the share of the filtered op's
    tiles (one row x one chunk of its sorted walk) it computes, by its own rule
    (``elbokto_kernels.grad_filter``: an entry of softmax >= FILTER_EPS, or the target)."""
    import torch

    from elbokto_kernels.vocab_walk import chunk_columns, mean_logit_order

    hidden, weight, targets, mask, *_ = _inputs(shape, "fused_linear_elbo", distribution)
    h, target = hidden.detach()[mask], targets[mask]
    rows, vocab = h.shape[0], weight.shape[0]
    prob = torch.softmax(h @ weight.detach().t(), dim=1)
    above = prob >= FILTER_EPS
    on_target = torch.zeros_like(above)
    on_target[torch.arange(rows), target] = True
    entries = torch.where(on_target, (1 - prob) >= FILTER_EPS, above)
    order = mean_logit_order(h, weight.detach(), None)

    def tile_share(grid, tile_rows, tile_cols):
        pad_r, pad_c = -rows % tile_rows, -vocab % tile_cols
        grid = torch.nn.functional.pad(grid, (0, pad_c, 0, pad_r))
        tiles = grid.view(grid.shape[0] // tile_rows, tile_rows, -1, tile_cols).any(3).any(1)
        return tiles.float().mean().item()

    chunk = chunk_columns(vocab, rows, 0, torch.device("cpu"), filtered=True)
    return {
        "density": entries.float().mean().item(),
        "tiles_unsorted": tile_share(entries, TILE, TILE),
        "tiles_sorted": tile_share(entries[:, order], TILE, TILE),
        "live": tile_share((above | on_target)[:, order], 1, chunk),
    }


def backend_of(variant: str) -> str | None:
    """The backend of a fused variant ("cpu_keep", "cpu_filter" -> "cpu"); None for a comparator.
    Variants reach the worker without their "+thp" suffix and "@distribution"."""
    from elbokto_kernels import BACKENDS

    name = variant.removesuffix("_keep").removesuffix("_filter")
    return name if name in BACKENDS else None


def _step(case: str, variant: str, inputs):
    """One forward + backward; returns the gradients."""
    import torch
    import torch.nn.functional as F

    from elbokto_kernels import fused_elbo, fused_linear_elbo

    backend = backend_of(variant)
    if case == "fused_elbo":
        logits, targets, mask, weights, sample_index, num_samples, grad_out = inputs
        if backend:
            out = fused_elbo(
                logits, targets, mask, weights, sample_index, num_samples, backend=backend
            )
        else:
            logp = torch.log_softmax(logits.float(), dim=-1)
            token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            per_copy = (token * mask * weights[:, None]).sum(1)
            out = torch.zeros(num_samples).index_add_(0, sample_index, per_copy)
        return torch.autograd.grad(out, (logits,), grad_out)

    hidden, weight, targets, mask, weights, sample_index, num_samples, grad_out = inputs
    if backend:
        out = fused_linear_elbo(
            hidden,
            weight,
            targets,
            mask,
            weights,
            sample_index,
            num_samples,
            keep_logits=variant.endswith("_keep"),
            filter_eps=FILTER_EPS if variant.endswith("_filter") else None,
            backend=backend,
        )
        return torch.autograd.grad(out, (hidden, weight), grad_out)
    L = mask.shape[1]
    flat = mask.reshape(-1).nonzero().squeeze(1)
    h, tgt = hidden.reshape(-1, hidden.shape[-1])[flat], targets.reshape(-1)[flat]
    copy = flat // L
    if variant == "eager":
        logp = torch.log_softmax(h @ weight.t(), dim=-1)
        token = logp.gather(1, tgt[:, None]).squeeze(1)
    else:
        options = {
            "lce": None,
            "lce_chunked": torch.nn.LinearCrossEntropyOptions(),
            "lce_chunked_ar1": torch.nn.LinearCrossEntropyOptions(chunking_method="aspect_ratio"),
        }[variant]
        token = -F.linear_cross_entropy(h, weight, tgt, reduction="none", options=options)
    out = torch.zeros(num_samples).index_add_(0, sample_index[copy], token * weights[copy])
    return torch.autograd.grad(out, (hidden, weight), grad_out)


def worker(case: str, variant: str, shape: dict, repeats: int) -> dict:
    import torch

    from elbokto_kernels import usable_backends

    variant, _, distribution = variant.partition("@")
    backend = backend_of(variant)
    if backend and backend not in usable_backends("cpu"):
        raise SystemExit(f"backend {backend!r} does not work here")
    inputs = _inputs(shape, case, distribution or None)
    case = case.removesuffix("_filter")
    seconds, peak = time_and_peak(lambda: _step(case, variant, inputs), repeats)
    return {"time_s": seconds, "peak_extra_mib": peak / MIB, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------- driver


def run_variant(case: str, variant: str, args) -> dict:
    argv = ["--worker", case, variant.removesuffix(THP), "--repeats", str(args.repeats)]
    env = {"THP_MEM_ALLOC_ENABLE": "1"} if variant.endswith(THP) else None
    return run_worker(__file__, argv + (["--quick"] if args.quick else []), env)


def table(results: dict, shape: dict) -> str:
    lines = []
    for case, rows in results.items():
        if case == "fused_linear_elbo_filter":
            lines += filter_table(rows, shape)
            continue
        comparators, speedup_goal, memory_goal = GOALS[case]
        cpu, eager = rows["cpu"], rows["eager"]
        fastest = min(comparators, key=lambda v: rows[v]["time_s"])
        hidden = f", D={shape['D']}" if "linear" in case else ""
        lines += [
            f"{case} (V={shape['V']}{hidden}, {shape['masked']} masked of "
            f"{shape['C'] * shape['L']} rows, float32, forward + backward)",
            "",
            "| variant | time (s) | peak extra memory (MiB) | cpu speed-up | cpu memory ratio |",
            "|---|---:|---:|---:|---:|",
        ]
        for variant, r in rows.items():
            lines.append(
                f"| {VARIANT_LABELS[variant]} | {r['time_s']:.3f} | "
                f"{r['peak_extra_mib']:.0f} | {r['time_s'] / cpu['time_s']:.2f}x | "
                f"{cpu['peak_extra_mib'] / r['peak_extra_mib']:.2f} |"
            )
        speedup = rows[fastest]["time_s"] / cpu["time_s"]
        memory = cpu["peak_extra_mib"] / eager["peak_extra_mib"]
        lines += [
            "",
            f"Goal: >= {speedup_goal}x faster than the fastest comparator "
            f"({VARIANT_LABELS[fastest]}): {speedup:.2f}x, "
            f"{'met' if speedup >= speedup_goal else 'MISSED'}; peak memory <= "
            f"{memory_goal}x eager's: {memory:.2f}x, "
            f"{'met' if memory <= memory_goal else 'MISSED'}.",
        ]
        if "cpu_keep" in rows:
            keep = rows["cpu_keep"]
            lines.append(
                f"With keep_logits=True: {rows[fastest]['time_s'] / keep['time_s']:.2f}x "
                f"faster than the fastest comparator, at "
                f"{keep['peak_extra_mib'] / eager['peak_extra_mib']:.2f}x eager's peak "
                "memory."
            )
        if "cpu" + THP in rows:
            thp = rows["eager" + THP]["time_s"] / rows["cpu" + THP]["time_s"]
            lines.append(
                f"With huge pages for every tensor (`THP_MEM_ALLOC_ENABLE=1`): "
                f"{thp:.2f}x faster than eager."
            )
        lines.append("")
    return "\n".join(lines)


def filter_table(rows: dict, shape: dict) -> list[str]:
    """The gradient-filtering table: comparators, then the filtered op per distribution with its
    sparsity figures, speed-up against the fastest comparator and memory against eager's."""
    comparators, speedup_goal, memory_goal = GOALS["fused_linear_elbo_filter"]
    fastest = min(comparators, key=lambda v: rows[v]["time_s"])
    best, eager = rows[fastest]["time_s"], rows["eager@half"]["peak_extra_mib"]
    lines = [
        f"fused_linear_elbo with filter_eps=2**-12 (V={shape['V']}, D={shape['D']}, "
        f"{shape['masked']} masked of {shape['C'] * shape['L']} rows, float32, forward + "
        "backward); density: share of entries of |softmax - onehot| >= 2^-12; tiles: share "
        f"of {TILE} x {TILE} tiles holding one, columns in vocabulary order / sorted by "
        "mean logit; computed: share of the op's (row x chunk) tiles it computes",
        "",
        "| variant | logits | density | tiles unsorted | tiles sorted | computed | "
        "time (s) | peak extra memory (MiB) | speed-up vs fastest comparator | memory vs "
        "eager |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, r in rows.items():
        variant, distribution = key.split("@")
        f = r.get("sparsity")
        figures = (
            f"{f['density']:.3%} | {f['tiles_unsorted']:.0%} | {f['tiles_sorted']:.0%} | "
            f"{f['live']:.1%}"
            if f and variant.endswith("_filter")
            else " | | | "
        )
        lines.append(
            f"| {VARIANT_LABELS[variant]} | {distribution} | {figures} | "
            f"{r['time_s']:.3f} | {r['peak_extra_mib']:.0f} | "
            f"{best / r['time_s']:.2f}x | {r['peak_extra_mib'] / eager:.2f} |"
        )
    goal = rows["cpu_filter@half"]
    speedup, memory = best / goal["time_s"], goal["peak_extra_mib"] / eager
    uniform = rows["cpu@uniform"]["time_s"] / rows["cpu_filter@uniform"]["time_s"]
    lines += [
        "",
        f'Goal at "half" (about half of the sorted {TILE} x {TILE} tiles hold an '
        f"entry): >= {speedup_goal}x faster than the fastest comparator "
        f"({VARIANT_LABELS[fastest.split('@')[0]]}): {speedup:.2f}x, "
        f"{'met' if speedup >= speedup_goal else 'MISSED'}; peak memory <= {memory_goal}x "
        f"eager's: {memory:.2f}x, {'met' if memory <= memory_goal else 'MISSED'}. At "
        f"uniform logits, no slower than the exact op: {uniform:.2f}x its speed, "
        f"{'met' if uniform >= 1.0 else 'MISSED'}.",
        "",
    ]
    return lines


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, to check the script")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per process")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="fresh processes per variant, interleaved with the other variants",
    )
    parser.add_argument(
        "--case", choices=list(VARIANTS), action="append", help="run only this case (repeatable)"
    )
    parser.add_argument(
        "--readme", type=Path, help="write the table into this file's '## CPU (N-core)' section"
    )
    parser.add_argument("--worker", nargs=2, metavar=("CASE", "VARIANT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = SHAPES["quick" if args.quick else "full"]
    if args.worker:
        print(json.dumps(worker(*args.worker, shape, args.repeats)))
        return

    import torch

    # Rounds interleave the variants, so a drift in the load of a shared machine hits all alike.
    load_before = os.getloadavg()[0]
    runs = {case: {variant: [] for variant in VARIANTS[case]} for case in args.case or VARIANTS}
    for round_ in range(args.rounds):
        for case, variants in runs.items():
            for variant, done in variants.items():
                done.append(r := run_variant(case, variant, args))
                print(
                    f"round {round_}  {case:18s} {variant:28s} {r['time_s']:8.3f} s "
                    f"{r['peak_extra_mib']:8.0f} MiB",
                    flush=True,
                )
    results = {
        case: {
            variant: {
                "time_s": statistics.median(r["time_s"] for r in done),
                "peak_extra_mib": max(r["peak_extra_mib"] for r in done),
            }
            for variant, done in variants.items()
        }
        for case, variants in runs.items()
    }
    filtered = results.get("fused_linear_elbo_filter", {})
    figures = {d: sparsity(shape, d) for d in {v.split("@")[1] for v in filtered}}
    for variant, r in filtered.items():
        r["sparsity"] = figures[variant.split("@")[1]]
    threads = next(iter(next(iter(runs.values())).values()))[0]["threads"]
    load = f"load average {load_before:.1f} before the runs, {os.getloadavg()[0]:.1f} after"
    body = (
        f"{_cpu_model()}, {os.cpu_count()} cores, shared with other work ({load}); torch "
        f"{torch.__version__}, {threads} threads, {torch.backends.cpu.get_cpu_capability()}; "
        f"`python benchmarks/bench_cpu.py{' --quick' if args.quick else ''}` "
        f"(median of {args.rounds} rounds x {args.repeats} passes; peak: the largest of the "
        f"rounds; method in the script's docstring).\n\n" + table(results, shape)
    )
    print("\n" + body)
    if args.readme:
        title = f"CPU ({os.cpu_count()}-core)"
        if args.case == ["fused_linear_elbo_filter"]:
            title += ": gradient filtering"
        record_in_readme(args.readme, title, body)


if __name__ == "__main__":
    main()
