"""The kernels inside an adopter's training step: an MDLM (masked-diffusion SFT) loss step,
forward + backward, three ways.

    python benchmarks/bench_integration.py            # CPU, Gemma-style model with V = 32000
    python benchmarks/bench_integration.py --quick    # small shapes
    python benchmarks/bench_integration.py --readme benchmarks/README.md   # also record the table

Variants (the same loss, token-normalised, weights 1 / t per sequence):

  adopter          the loss as a trainer writes it (dllm's MDLMTrainer): the model's full
                   [B, L, V] logits, cross-entropy in float32 over every position, masked;
  masked rows      the strongest plain-PyTorch alternative: the model body's hidden states, the
                   masked rows only through the head, float32 log_softmax, gather;
  fused_lm_head    examples/mdlm_loss.py: the model's own forward with the head scored by
                   fused_linear_elbo (no logits beyond one vocabulary chunk of the masked rows).

Method: each variant in a fresh subprocess; time = median of the timed steps after one warm-up;
memory = peak resident set size during the timed steps minus the resident size before them
(measure.py); on CUDA the peak of torch.cuda.max_memory_allocated over the step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from measure import record_in_readme, run_worker, time_and_peak  # noqa: E402

SHAPES = {
    "full": dict(vocab=32000, hidden=256, layers=2, batch=4, length=256),
    "quick": dict(vocab=2000, hidden=64, layers=2, batch=4, length=64),
}
VARIANTS = ("adopter", "masked rows", "fused_lm_head")
SEED = 0


def build(shape: dict, device: str):
    """(model, noised, ids, masked, weights, maskable): a random bidirectional Gemma and an SFT
    batch, a quarter of each sequence prompt, responses masked at t ~ U(0.1, 0.9)."""
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
        is_causal=False,
        tie_word_embeddings=False,
    )
    model = GemmaForCausalLM(config).to(device).train()
    batch, length = shape["batch"], shape["length"]
    ids = torch.randint(0, shape["vocab"] - 1, (batch, length), device=device)
    maskable = (torch.arange(length, device=device) >= length // 4).expand(batch, length)
    t = torch.rand(batch, device=device) * 0.8 + 0.1
    masked = (torch.rand(batch, length, device=device) < t[:, None]) & maskable
    noised = ids.masked_fill(masked, shape["vocab"] - 1)
    return model, noised, ids, masked, 1 / t, maskable


def worker(variant: str, shape_name: str, device: str, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F
    from mdlm_loss import mdlm_loss

    model, noised, ids, masked, weights, maskable = build(SHAPES[shape_name], device)
    norm = maskable.sum().clamp_min(1)

    def loss():
        if variant == "adopter":
            logits = model(input_ids=noised).logits
            nll = F.cross_entropy(logits.transpose(1, 2).float(), ids, reduction="none")
            return (nll * weights[:, None] * masked).sum() / norm
        if variant == "masked rows":
            hidden = model.model(input_ids=noised).last_hidden_state[masked]
            logp = torch.log_softmax(model.lm_head(hidden).float(), -1)
            nll = -logp.gather(1, ids[masked][:, None])[:, 0]
            rows = weights[:, None].expand_as(masked)[masked]
            return (nll * rows).sum() / norm
        return mdlm_loss(model, noised, ids, masked, weights, maskable)

    def step():
        model.zero_grad(set_to_none=True)
        loss().backward()

    seconds, peak = time_and_peak(step, repeats, device)
    return {"seconds": seconds, "peak_mib": peak / 2**20, "loss": loss().item()}


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
    base = ["--device", args.device, "--repeats", str(args.repeats)] + (
        ["--quick"] if args.quick else []
    )
    results = {v: run_worker(__file__, ["--worker", v, *base]) for v in VARIANTS}
    losses = [r["loss"] for r in results.values()]
    if max(losses) - min(losses) > 1e-4 * max(abs(x) for x in losses):
        raise SystemExit(f"the variants disagree on the loss: {losses}")
    shape = SHAPES[shape_name]
    ref = results["adopter"]
    lines = [
        f"MDLM loss step (forward + backward), B = {shape['batch']}, L = {shape['length']}, "
        f"Gemma-style model V = {shape['vocab']}, D = {shape['hidden']}, {shape['layers']} "
        f"layers, float32, device {args.device}; against the adopter's full-logits loss",
        "",
        "| variant | step s | speed-up | peak extra MiB | memory vs adopter |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['seconds']:.3f} | {ref['seconds'] / r['seconds']:.2f}x | "
            f"{r['peak_mib']:.0f} | {r['peak_mib'] / ref['peak_mib']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.readme:
        record_in_readme(
            args.readme, f"The kernels in an adopter's MDLM step ({args.device})", table
        )


if __name__ == "__main__":
    main()
