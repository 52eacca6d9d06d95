"""One ELBO-KTO training step: ELBOKTOObjective against the straightforward implementation.

    python benchmarks/bench_step.py            # CPU, tiny Gemma with V = 32000
    python benchmarks/bench_step.py --quick    # small shapes
    python benchmarks/bench_step.py --readme benchmarks/README.md   # also record the table

A step is loss + backward for B = 4 examples with K = 8 copies each (n_t = 8, n_yt = 1), policy
and frozen reference on the same copies. Variants:

  straightforward  one forward per draw (K forwards of B sequences, plus K reference forwards),
                   every sequence padded to a fixed length, a per-example Python loop of float32
                   log_softmax over full logits;
  objective        ELBOKTOObjective: dynamic padding, all B*K copies in one batched forward, the
                   fused LM head on the masked rows only;
  objective chunk  the same with mc_chunk_size = 8 copies (two-pass, memory flat in K); also run
                   at K = 16 and 32 to show that.

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
    "full": dict(vocab=32000, hidden=256, layers=4, prompt=(24, 48), response=(48, 128),
                 fixed_len=512),
    "quick": dict(vocab=2000, hidden=64, layers=2, prompt=(8, 16), response=(8, 24),
                  fixed_len=64),
}
BATCH, SEED = 4, 0
VARIANTS = {"straightforward": (8, None), "objective": (8, None), "objective chunk": (8, 8),
            "objective chunk K=16": (16, 8), "objective chunk K=32": (32, 8)}


def build(shape: dict, device: str):
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(SEED)
    config = GemmaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                         intermediate_size=4 * shape["hidden"], num_hidden_layers=shape["layers"],
                         num_attention_heads=4, num_key_value_heads=2,
                         head_dim=shape["hidden"] // 4, use_bidirectional_attention=True,
                         mask_token_id=shape["vocab"] - 1, tie_word_embeddings=False)
    policy = GemmaForCausalLM(config).to(device).train()
    reference = GemmaForCausalLM(config).to(device).eval().requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    g = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(*shape["prompt"], (BATCH,), generator=g)
    response = torch.randint(*shape["response"], (BATCH,), generator=g)
    longest = int((prompt + response).max())
    ids = torch.randint(0, shape["vocab"] - 1, (BATCH, shape["fixed_len"]), generator=g)
    real = torch.arange(shape["fixed_len"]) < (prompt + response)[:, None]
    batch = {"input_ids": ids.masked_fill(~real, 0), "attention_mask": real.long(),
             "prompt_lengths": prompt, "response_lengths": response,
             "desirable": torch.arange(BATCH) % 2 == 0, "uid": torch.arange(BATCH)}
    batch = {k: v.to(device) for k, v in batch.items()}
    # Dynamic padding: the objective sees the batch cut to its longest sequence.
    dynamic = {**batch, "input_ids": batch["input_ids"][:, :longest],
               "attention_mask": batch["attention_mask"][:, :longest]}
    return policy, reference, batch, dynamic


def straightforward_step(policy, reference, batch, objective):
    """The textbook loop: K forwards, full float32 log_softmax per example, fixed padding."""
    import torch

    from elbokto import elbo_kto_loss

    draws = objective.draws(batch)
    K = objective.mc.num_copies
    ids, attn = batch["input_ids"], batch["attention_mask"]
    policy_terms, ref_terms = [[] for _ in range(BATCH)], [[] for _ in range(BATCH)]
    for k in range(K):
        copy = torch.arange(BATCH, device=ids.device) * K + k
        mask = draws.mask[copy]
        noisy = ids.masked_fill(mask, objective.mask_token_id)
        logits = policy(input_ids=noisy, attention_mask=attn).logits
        with torch.no_grad():
            ref_logits = reference(input_ids=noisy, attention_mask=attn).logits
        for b in range(BATCH):
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


def worker(variant: str, shape_name: str, device: str, repeats: int) -> dict:
    import torch

    from elbokto import ELBOKTOObjective, MCConfig

    torch.manual_seed(SEED)
    shape = SHAPES[shape_name]
    policy, reference, fixed, dynamic = build(shape, device)
    n_t, chunk = VARIANTS[variant]
    objective = ELBOKTOObjective(mc=MCConfig(n_t=n_t), mc_chunk_size=chunk,
                                 mask_token_id=shape["vocab"] - 1)

    def step():
        policy.zero_grad(set_to_none=True)
        if variant == "straightforward":
            straightforward_step(policy, reference, fixed, objective)
        else:
            objective(policy, dynamic, reference=reference).loss.backward()

    seconds, peak = time_and_peak(step, repeats, device)
    return {"seconds": seconds, "peak_mib": peak / 2 ** 20, "examples_per_s": BATCH / seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--readme", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    shape_name = "quick" if args.quick else "full"
    if args.worker:
        import json
        print(json.dumps(worker(args.worker, shape_name, args.device, args.repeats)))
        return
    base = ["--device", args.device, "--repeats", str(args.repeats)] + (["--quick"] if args.quick
                                                                           else [])
    results = {v: run_worker(__file__, ["--worker", v, *base]) for v in VARIANTS}
    ref = results["straightforward"]
    shape = SHAPES[shape_name]
    lines = [f"ELBO-KTO step, B = {BATCH}, tiny Gemma V = {shape['vocab']}, D = {shape['hidden']}, "
             f"{shape['layers']} layers, device {args.device}; speed-up and memory are against the "
             "straightforward step at K = 8, so the K = 16 and 32 rows show growth in K", "",
             "| variant | K | step s | examples/s | speed-up | peak extra MiB | memory vs "
             "straightforward |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {VARIANTS[name][0]} | {r['seconds']:.3f} | "
                     f"{r['examples_per_s']:.2f} | {ref['seconds'] / r['seconds']:.2f}x | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if args.readme:
        record_in_readme(args.readme, f"ELBO-KTO step ({args.device})", table)


if __name__ == "__main__":
    main()
