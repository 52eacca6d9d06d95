"""One ELBO-KTO training step: ELBOKTOObjective against the straightforward implementation.

    python benchmarks/bench_step.py            # CPU, tiny Gemma with V = 32000
    python benchmarks/bench_step.py --quick    # small shapes
    python benchmarks/bench_step.py --readme benchmarks/README.md   # also record the table
    python benchmarks/bench_step.py --suite block   # the block-diffusion step (block size 8)

A step is loss + backward for B = 4 examples with K = 8 copies each (n_t = 8, n_yt = 1), policy
and frozen reference on the same copies. Variants:

  straightforward  one forward per draw (K forwards of B sequences, plus K reference forwards),
                   every sequence padded to a fixed length, a per-example Python loop of float32
                   log_softmax over full logits;
  objective        ELBOKTOObjective: dynamic padding, all B*K copies in one batched forward, the
                   fused LM head on the masked rows only;
  objective chunk  the same with mc_chunk_size = 8 copies (two-pass, memory flat in K); also run
                   at K = 16 and 32 to show that.

Suite ``block``: the same step for a block-diffusion model (the same Gemma, scored with the block
ELBO, block size 8; :mod:`elbokto.block`):

  block straightforward  one forward per copy and block on [clean prefix ; noisy block] under
                         the block-causal mask, full float32 logits and log_softmax;
  block objective        ELBOKTOObjective with MCConfig(block_size=8): one forward per copy over
                         [x_t ; x_0] with the block-diffusion mask, the fused LM head on the masked
                         rows of the noisy half only (and with mc_chunk_size = 8).

Suite ``llada8b``: one step (objective, backward, AdamW) of a randomly initialised LLaDA-8B-sized
bidirectional model (32 layers, hidden 4096, MLP 12288, 32 heads of 128, V = 126464; ``--quick``:
the same structure at toy size), bf16, gradient checkpointing, B = 1, K = 8, L = ``--length``:

  straightforward LoRA   K forwards of the policy (LoRA r = 16 on every linear layer but the head)
                         and K of the reference (adapters off), full logits, float32 log_softmax;
  objective LoRA         ELBOKTOObjective, mc_chunk_size = 8, the reference with adapters off;
  objective full         full fine-tuning (AdamW on every weight), the reference precomputed
                         (as ``elbokto precompute-ref`` gives it: no second 8B model in memory).

A variant that runs out of GPU memory is reported as OOM.

Method: each variant in a fresh subprocess; time = median of the timed steps after one warm-up;
memory = peak resident set size during the timed steps minus the resident size before them
(see measure.py). On a GPU (--device cuda) time is CUDA-synchronised and memory is the peak of
torch.cuda.max_memory_allocated over the step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import record_in_readme, run_worker, time_and_peak  # noqa: E402

SHAPES = {
    "full": dict(
        vocab=32000, hidden=256, layers=4, prompt=(24, 48), response=(48, 128), fixed_len=512
    ),
    "quick": dict(vocab=2000, hidden=64, layers=2, prompt=(8, 16), response=(8, 24), fixed_len=64),
}
BATCH, SEED, BLOCK_SIZE = 4, 0, 8
# suite -> {variant: (K, mc_chunk_size)}; the first variant of a suite is its baseline.
SUITES = {
    "whole": {
        "straightforward": (8, None),
        "objective": (8, None),
        "objective chunk": (8, 8),
        "objective chunk K=16": (16, 8),
        "objective chunk K=32": (32, 8),
    },
    "block": {
        "block straightforward": (8, None),
        "block objective": (8, None),
        "block objective chunk": (8, 8),
    },
}
# suite llada8b -> {variant: (K, mc_chunk_size)}; model shapes of its own.
SUITES["llada8b"] = {
    "straightforward LoRA": (8, None),
    "objective LoRA": (8, 8),
    "objective full": (8, 8),
}
LLADA_SHAPES = {
    "full": dict(vocab=126464, hidden=4096, mlp=12288, layers=32, heads=32, head_dim=128),
    "quick": dict(vocab=512, hidden=64, mlp=192, layers=2, heads=4, head_dim=16),
}
TITLES = {
    "whole": "ELBO-KTO step",
    "block": "Block-diffusion ELBO-KTO step",
    "llada8b": "LLaDA-8B-sized ELBO-KTO step",
}


def build(shape: dict, device: str):
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(SEED)
    config = GemmaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=4 * shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=shape["hidden"] // 4,
        use_bidirectional_attention=True,
        mask_token_id=shape["vocab"] - 1,
        tie_word_embeddings=False,
    )
    policy = GemmaForCausalLM(config).to(device).train()
    reference = GemmaForCausalLM(config).to(device).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(*shape["prompt"], (BATCH,), generator=g)
    response = torch.randint(*shape["response"], (BATCH,), generator=g)
    longest = int((prompt + response).max())
    ids = torch.randint(0, shape["vocab"] - 1, (BATCH, shape["fixed_len"]), generator=g)
    real = torch.arange(shape["fixed_len"]) < (prompt + response)[:, None]
    batch = {
        "input_ids": ids.masked_fill(~real, 0),
        "attention_mask": real.long(),
        "prompt_lengths": prompt,
        "response_lengths": response,
        "desirable": torch.arange(BATCH) % 2 == 0,
        "uid": torch.arange(BATCH),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    # Dynamic padding: the objective sees the batch cut to its longest sequence.
    dynamic = {
        **batch,
        "input_ids": batch["input_ids"][:, :longest],
        "attention_mask": batch["attention_mask"][:, :longest],
    }
    return policy, reference, batch, dynamic


def straightforward_step(policy, reference, batch, objective):
    """The textbook loop: K forwards, full float32 log_softmax per example, fixed padding.
    ``reference`` None: the policy with its LoRA adapters off."""
    import contextlib

    import torch

    from elbokto import elbo_kto_loss

    draws = objective.draws(batch)
    K = objective.mc.num_copies
    ids, attn = batch["input_ids"], batch["attention_mask"]
    size = ids.shape[0]
    policy_terms, ref_terms = [[] for _ in range(size)], [[] for _ in range(size)]
    frozen = policy.disable_adapter if reference is None else contextlib.nullcontext
    for k in range(K):
        copy = torch.arange(size, device=ids.device) * K + k
        mask = draws.mask[copy]
        noisy = ids.masked_fill(mask, objective.mask_token_id)
        logits = policy(input_ids=noisy, attention_mask=attn).logits
        with torch.no_grad(), frozen():
            scorer = policy if reference is None else reference
            ref_logits = scorer(input_ids=noisy, attention_mask=attn).logits
        for b in range(size):
            target = ids[b][mask[b]]
            w = draws.weight[copy[b]]
            lp = torch.log_softmax(logits[b].float(), -1)[mask[b]]
            policy_terms[b].append(w * lp.gather(1, target[:, None]).sum())
            rlp = torch.log_softmax(ref_logits[b].float(), -1)[mask[b]]
            ref_terms[b].append(w * rlp.gather(1, target[:, None]).sum())
    policy_elbo = torch.stack([sum(terms) for terms in policy_terms])
    ref_elbo = torch.stack([sum(terms) for terms in ref_terms])
    loss, _ = elbo_kto_loss(policy_elbo, ref_elbo, batch["desirable"])
    loss.backward()


def per_block_elbo(model, batch, draws, mask_token_id: int, dtype=None):
    """The block ELBO the straightforward way: for every copy and every block holding a masked
    token, one forward on [clean prefix ; noisy block], cut to the example's real tokens, under
    the block-causal mask of block-by-block generation (boolean for sdpa, additive for eager),
    then log_softmax of the full logits in ``dtype`` (default float32), gather, weighted sum.

    Returns the per-example ELBO [B] in ``dtype``; tests/test_block.py uses it in float64 as the
    reference that the one-pass forward must equal.
    """
    import torch

    from elbokto.estimate import noisy_copies

    dtype = dtype or torch.float32
    ids, b = batch["input_ids"], draws.block_size
    noisy = noisy_copies(ids, draws, mask_token_id)
    lengths = (batch["prompt_lengths"] + batch["response_lengths"]).tolist()
    eager = model.config._attn_implementation == "eager"
    terms = [[] for _ in range(ids.shape[0])]
    for c, s in enumerate(draws.sample_index.tolist()):
        for lo in range(0, lengths[s], b):
            hi = min(lo + b, lengths[s])
            if not draws.mask[c, lo:hi].any():
                continue
            scored = draws.mask[c, lo:hi] * draws.weight[c, lo:hi].to(dtype)
            blocks = torch.arange(hi, device=ids.device) // b
            allowed = (blocks[None, :] <= blocks[:, None])[None, None]
            mask = (
                torch.zeros(allowed.shape, device=ids.device).masked_fill(~allowed, -1e30)
                if eager
                else allowed
            )
            logits = model(
                input_ids=torch.cat([ids[s, :lo], noisy[c, lo:hi]])[None],
                attention_mask=mask,
                position_ids=torch.arange(hi, device=ids.device)[None],
            ).logits
            logp = (
                torch.log_softmax(logits[0, lo:hi].to(dtype), -1)
                .gather(-1, ids[s, lo:hi, None])
                .squeeze(-1)
            )
            terms[s].append((logp * scored).sum())
    return torch.stack(
        [sum(t) if t else torch.zeros((), dtype=dtype, device=ids.device) for t in terms]
    )


def block_straightforward_step(policy, reference, batch, objective):
    """The textbook block-diffusion step: per-block forwards for policy and reference."""
    import torch

    from elbokto import elbo_kto_loss

    draws = objective.draws(batch)
    policy_elbo = per_block_elbo(policy, batch, draws, objective.mask_token_id)
    with torch.no_grad():
        ref_elbo = per_block_elbo(reference, batch, draws, objective.mask_token_id)
    loss, _ = elbo_kto_loss(policy_elbo, ref_elbo, batch["desirable"])
    loss.backward()


BASELINE_STEPS = {
    "straightforward": straightforward_step,
    "block straightforward": block_straightforward_step,
}


def build_llada8b(shape: dict, device: str, length: int, lora: bool):
    """(policy, batch): the LLaDA-8B-sized bidirectional model in bf16 with gradient
    checkpointing (LoRA-wrapped or not), and one example of ``length`` tokens, a quarter prompt."""
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(SEED)
    config = GemmaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        head_dim=shape["head_dim"],
        max_position_embeddings=max(length, 4096),
        use_bidirectional_attention=True,
        is_causal=False,
        mask_token_id=shape["vocab"] - 1,
        tie_word_embeddings=False,
    )
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy of 8B weights
    try:
        with torch.device(device):
            policy = GemmaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    if lora:
        import peft

        policy = peft.get_peft_model(
            policy, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        )
    prompt = length // 4
    g = torch.Generator().manual_seed(SEED)
    batch = {
        "input_ids": torch.randint(0, shape["vocab"] - 1, (1, length), generator=g),
        "attention_mask": torch.ones(1, length, dtype=torch.long),
        "prompt_lengths": torch.tensor([prompt]),
        "response_lengths": torch.tensor([length - prompt]),
        "desirable": torch.tensor([True]),
        "uid": torch.tensor([0]),
    }
    return policy, {k: v.to(device) for k, v in batch.items()}


def llada8b_worker(variant: str, shape_name: str, device: str, repeats: int, length: int) -> dict:
    import torch

    from elbokto import ELBOKTOObjective, MCConfig

    shape = LLADA_SHAPES[shape_name]
    n_t, chunk = SUITES["llada8b"][variant]
    try:
        policy, batch = build_llada8b(shape, device, length, lora="LoRA" in variant)
        objective = ELBOKTOObjective(
            mc=MCConfig(n_t=n_t), mc_chunk_size=chunk, mask_token_id=shape["vocab"] - 1
        )
        optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-6)
        # Full fine-tuning scores against precomputed reference ELBOs (any values will do).
        ref_elbo = None if "LoRA" in variant else torch.full((1,), -2.0 * length, device=device)

        def step():
            optimizer.zero_grad(set_to_none=True)
            if variant.startswith("straightforward"):
                straightforward_step(policy, None, batch, objective)
            else:
                objective(policy, batch, ref_elbo=ref_elbo).loss.backward()
            optimizer.step()

        seconds, peak = time_and_peak(step, repeats, device)
    except torch.OutOfMemoryError:
        return {"oom": True}
    return {"seconds": seconds, "peak_mib": peak / 2**20, "tokens_per_s": length / seconds}


def llada8b_table(results: dict, shape: dict, length: int, device: str) -> str:
    base = results["straightforward LoRA"]
    lines = [
        f"{TITLES['llada8b']}: {shape['layers']} layers, hidden {shape['hidden']}, MLP "
        f"{shape['mlp']}, V = {shape['vocab']}, bf16, gradient checkpointing, B = 1, K = 8, "
        f"L = {length}, device {device}; speed-up against the straightforward LoRA step",
        "",
        "| variant | step s | tokens/s | speed-up | peak extra GiB |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if r.get("oom"):
            lines.append(f"| {name} | OOM | | | |")
            continue
        speed = "" if base.get("oom") else f"{base['seconds'] / r['seconds']:.2f}x"
        lines.append(
            f"| {name} | {r['seconds']:.3f} | {r['tokens_per_s']:.0f} | {speed} | "
            f"{r['peak_mib'] / 1024:.2f} |"
        )
    return "\n".join(lines)


def worker(suite: str, variant: str, shape_name: str, device: str, repeats: int) -> dict:
    import torch

    from elbokto import ELBOKTOObjective, MCConfig

    torch.manual_seed(SEED)
    shape = SHAPES[shape_name]
    policy, reference, fixed, dynamic = build(shape, device)
    n_t, chunk = SUITES[suite][variant]
    mc = MCConfig(n_t=n_t, block_size=BLOCK_SIZE if suite == "block" else None)
    objective = ELBOKTOObjective(mc=mc, mc_chunk_size=chunk, mask_token_id=shape["vocab"] - 1)

    def step():
        policy.zero_grad(set_to_none=True)
        if variant in BASELINE_STEPS:
            BASELINE_STEPS[variant](policy, reference, fixed, objective)
        else:
            objective(policy, dynamic, reference=reference).loss.backward()

    seconds, peak = time_and_peak(step, repeats, device)
    return {"seconds": seconds, "peak_mib": peak / 2**20, "examples_per_s": BATCH / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--suite", choices=sorted(SUITES), default="whole")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--length",
        type=int,
        default=None,
        help="suite llada8b: tokens per example (default 1024; --quick 64)",
    )
    p.add_argument("--readme", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape_name = "quick" if args.quick else "full"
    length = args.length or (64 if args.quick else 1024)
    if args.worker:
        import json

        if args.suite == "llada8b":
            result = llada8b_worker(args.worker, shape_name, args.device, args.repeats, length)
        else:
            result = worker(args.suite, args.worker, shape_name, args.device, args.repeats)
        print(json.dumps(result))
        return
    base = [
        "--suite",
        args.suite,
        "--device",
        args.device,
        "--repeats",
        str(args.repeats),
        "--length",
        str(length),
    ] + (["--quick"] if args.quick else [])
    variants = SUITES[args.suite]
    results = {v: run_worker(__file__, ["--worker", v, *base]) for v in variants}
    if args.suite == "llada8b":
        table = llada8b_table(results, LLADA_SHAPES[shape_name], length, args.device)
        print(table)
        if args.readme:
            record_in_readme(
                args.readme, f"{TITLES['llada8b']}, L = {length} ({args.device})", table
            )
        return
    baseline = next(iter(variants))
    ref = results[baseline]
    shape = SHAPES[shape_name]
    block = f", block size {BLOCK_SIZE}" if args.suite == "block" else ""
    lines = [
        f"{TITLES[args.suite]}, B = {BATCH}, tiny Gemma V = {shape['vocab']}, "
        f"D = {shape['hidden']}, {shape['layers']} layers{block}, device {args.device}; "
        f"speed-up and memory are against the {baseline} step at K = 8",
        "",
        f"| variant | K | step s | examples/s | speed-up | peak extra MiB | memory vs {baseline} |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {variants[name][0]} | {r['seconds']:.3f} | "
            f"{r['examples_per_s']:.2f} | {ref['seconds'] / r['seconds']:.2f}x | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.readme:
        record_in_readme(args.readme, f"{TITLES[args.suite]} ({args.device})", table)


if __name__ == "__main__":
    main()
