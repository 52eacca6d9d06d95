"""Evaluation speed on CPU: lm-eval likelihoods and threshold decoding.

    python benchmarks/bench_eval.py                                  # ~15 min on 2 cores
    python benchmarks/bench_eval.py --quick                          # small shapes, seconds
    python benchmarks/bench_eval.py --readme benchmarks/README.md    # also record the tables
    python benchmarks/bench_eval.py --part sampler                   # (a) or (b) only

(a) loglikelihood requests/s of the lm-eval model ``elbokto`` (:class:`elbokto.eval.DiffusionLM`:
    mc_num = 128 copies per request through the fused LM head, 32 copies per forward, plus its one
    is_greedy forward) against the straightforward implementation that LLaDA's harness uses: the
    same copies (the same draws), 32 per forward, every copy through the full LM head into float32
    log_softmax, and a full-logits forward for is_greedy. Tiny bidirectional Gemma with LLaDA's
    vocabulary (V = 126464), D = 256, 2 layers; multiple-choice-like requests (48-token contexts,
    1..6-token continuations). Goal: >= 3x.
(b) sampler tokens/s on the demo task (reverse a string; :mod:`elbokto.demo`) with the demo's SFT
    model, greedy, low-confidence remasking: one token per step against confidence-threshold
    parallel decoding (threshold 0.9, Fast-dLLM's default), at equal accuracy (the share of
    well-formed answers, reversal or copy, and the share of reversals). Goal: >= 2x.

Method: in one process, one untimed call (the agreement / accuracy check), then the median of
``--repeats`` timed calls.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import record_in_readme  # noqa: E402

SHAPES = {
    "full": dict(
        vocab=126464,
        hidden=256,
        layers=2,
        requests=4,
        context=48,
        mc_num=128,
        prompts=512,
        sft_steps=None,
    ),
    "quick": dict(
        vocab=4000,
        hidden=64,
        layers=1,
        requests=4,
        context=16,
        mc_num=16,
        prompts=64,
        sft_steps=200,
    ),
}
MC_BATCH, THRESHOLD, SEED = 32, 0.9, 0


def timed(call, repeats: int) -> float:
    """Median seconds of ``repeats`` calls (the caller has made one untimed call first)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --- (a) likelihoods ------------------------------------------------------------------------------


def likelihood_model(shape: dict):
    from transformers import GemmaConfig, GemmaForCausalLM

    from elbokto.eval import DiffusionLM
    from elbokto.tiny import build_tiny_tokenizer

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
        mask_token_id=shape["vocab"] - 1,
        tie_word_embeddings=False,
    )
    model = GemmaForCausalLM(config).float().eval()
    return DiffusionLM(
        pretrained=model,
        tokenizer=build_tiny_tokenizer([]),
        device="cpu",
        mc_num=shape["mc_num"],
        mc_chunk_size=MC_BATCH,
        batch_size=8,
    )


@torch.no_grad()
def straightforward(lm, pairs) -> list[tuple[float, bool]]:
    """LLaDA's harness: copies through the full head, float32 log_softmax; full-logits greedy."""
    results = []
    for context, continuation in pairs:
        ids = torch.tensor([context + continuation])
        draws = lm._draws(context, continuation)
        total = 0.0
        for start in range(0, lm.mc.num_copies, MC_BATCH):
            mask = draws.mask[start : start + MC_BATCH]
            noisy = ids.expand(mask.shape[0], -1).masked_fill(mask, lm.mask_token_id)
            logp = lm.model(input_ids=noisy).logits.float().log_softmax(-1)
            picked = logp.gather(-1, ids.expand(mask.shape[0], -1)[..., None])[..., 0]
            total += float((picked * mask * draws.weight[start : start + MC_BATCH, None]).sum())
        masked = torch.tensor([context + [lm.mask_token_id] * len(continuation)])
        greedy = lm.model(input_ids=masked).logits[0, len(context) :].argmax(-1).tolist()
        results.append((total, greedy == continuation))
    return results


def bench_likelihood(shape: dict, repeats: int) -> tuple[str, float]:
    lm = likelihood_model(shape)
    g = torch.Generator().manual_seed(SEED)
    pairs = [
        (
            torch.randint(3, shape["vocab"] - 1, (shape["context"],), generator=g).tolist(),
            torch.randint(3, shape["vocab"] - 1, (int(n),), generator=g).tolist(),
        )
        for n in torch.randint(1, 7, (shape["requests"],), generator=g)
    ]
    requests = [(("", ""), c, x) for c, x in pairs]
    fused = lm._loglikelihood_tokens(requests)
    plain = straightforward(lm, pairs)
    error = max(abs(a[0] - b[0]) / max(1.0, abs(b[0])) for a, b in zip(fused, plain))
    agree = all(a[1] == b[1] for a, b in zip(fused, plain))
    seconds = {
        "straightforward (full LM head, LLaDA's harness)": timed(
            lambda: straightforward(lm, pairs), repeats
        ),
        "elbokto (fused head, shared forwards)": timed(
            lambda: lm._loglikelihood_tokens(requests), repeats
        ),
    }
    base = seconds["straightforward (full LM head, LLaDA's harness)"]
    rows = [
        f"| {name} | {s:.2f} | {len(pairs) / s:.2f} | {base / s:.2f}x |"
        for name, s in seconds.items()
    ]
    speedup = base / seconds["elbokto (fused head, shared forwards)"]
    table = "\n".join(
        [
            f"lm-eval loglikelihood, {len(pairs)} requests, mc_num = {shape['mc_num']}, "
            f"{MC_BATCH} copies per forward; tiny Gemma V = {shape['vocab']}, "
            f"D = {shape['hidden']}, "
            f"{shape['layers']} layers, {shape['context']}-token contexts, 1-6-token continuations",
            "",
            "| implementation | seconds | requests/s | speed-up |",
            "|---|---:|---:|---:|",
            *rows,
            "",
            f"Same draws in both: largest relative ELBO difference {error:.1e}; is_greedy "
            f"{'agrees' if agree else 'DIFFERS'}. Goal >= 3x: {speedup:.2f}x, "
            f"{'met' if speedup >= 3 else 'MISSED'}.",
        ]
    )
    return table, speedup


# --- (b) threshold decoding -----------------------------------------------------------------------


def _counting(forward, calls: list):
    """``forward`` that appends to ``calls`` on every call (the sampler's forward count)."""

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    return counted


def bench_sampler(shape: dict, repeats: int) -> tuple[str, float]:
    from dataclasses import replace

    from elbokto.demo import (
        DESIRABLE,
        OTHER,
        DemoConfig,
        Encoder,
        build_model,
        classify,
        sample_prompts,
        train_sft,
    )
    from elbokto.sampling import SamplingConfig, decode_responses, generate

    config = DemoConfig()
    if shape["sft_steps"]:
        config = replace(config, sft_steps=shape["sft_steps"])
    encoder = Encoder(config)
    rng = np.random.default_rng(config.seed)
    model = build_model(config, encoder.tokenizer)
    tick = time.perf_counter()
    train_sft(model, encoder, config, rng)
    sft_seconds = time.perf_counter() - tick
    prompts = sample_prompts(rng, shape["prompts"], config)
    ids = encoder.prompt_ids(prompts)
    n = config.gen_length
    rows, rates, accuracy = [], {}, {}
    for name, threshold in (("one token per step", None), (f"threshold {THRESHOLD}", THRESHOLD)):
        gen = SamplingConfig(
            gen_length=n,
            steps=n,
            block_length=n,
            threshold=threshold,
            mask_token_id=encoder.tokenizer.mask_token_id,
        )
        calls = []
        forward = model.forward
        model.forward = _counting(forward, calls)
        tokens = generate(model, ids, gen, pad_token_id=encoder.tokenizer.pad_token_id)
        model.forward = forward
        texts = decode_responses(encoder.tokenizer, tokens)
        classes = [classify(p, t, config.upper) for p, t in zip(prompts, texts)]
        valid = sum(c != OTHER for c in classes) / len(prompts)
        reverse = sum(c == DESIRABLE for c in classes) / len(prompts)
        seconds = timed(
            functools.partial(
                generate, model, ids, gen, pad_token_id=encoder.tokenizer.pad_token_id
            ),
            repeats,
        )
        rates[name] = len(prompts) * n / seconds
        accuracy[name] = (valid, reverse)
        rows.append(
            f"| {name} | {len(calls)} | {seconds:.3f} | {rates[name]:.0f} | {valid:.3f} | "
            f"{reverse:.3f} |"
        )
    fast = f"threshold {THRESHOLD}"
    speedup = rates[fast] / rates["one token per step"]
    # Equal accuracy: each share within two standard errors of the difference of two
    # proportions over len(prompts) prompts.
    equal = all(
        abs(a - b) <= 2 * (2 * max(a * (1 - a), b * (1 - b)) / len(prompts)) ** 0.5
        for a, b in zip(accuracy[fast], accuracy["one token per step"])
    )
    table = "\n".join(
        [
            f"Sampler on the demo task: the demo's SFT model ({config.sft_steps} steps, "
            f"{sft_seconds:.0f} s), {len(prompts)} held-out prompts in one batch, {n}-token "
            f"answers, greedy, low-confidence remasking",
            "",
            "| decoding | model calls | seconds | tokens/s | well-formed | reversals |",
            "|---|---:|---:|---:|---:|---:|",
            *rows,
            "",
            f"Goal >= 2x at equal accuracy: {speedup:.2f}x, accuracy "
            f"{'equal' if equal else 'NOT equal'} (both shares within two standard errors), "
            f"{'met' if speedup >= 2 and equal else 'MISSED'}.",
        ]
    )
    return table, speedup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--part", choices=("likelihood", "sampler", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--readme", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    shape = SHAPES["quick" if args.quick else "full"]
    parts = {
        "likelihood": ("Evaluation: lm-eval loglikelihood (cpu)", bench_likelihood),
        "sampler": ("Evaluation: threshold decoding (cpu)", bench_sampler),
    }
    for name, (title, bench) in parts.items():
        if args.part in (name, "all"):
            table, _ = bench(shape, args.repeats)
            print(table, "\n")
            if args.readme:
                record_in_readme(args.readme, title, table)


if __name__ == "__main__":
    main()
