"""A stand-in of the ELBO-KTO authors' computation (github.com/vaibhavjindal/elbo-kto), written out
as their code does it, for the tests that hold elbokto's official preset to it: the token rows of
data_utils.py, the seeds, levels and masks of precompute_bref.py (rebuilt by train.py), the ELBO
and the KTO loss of train.py. Python ints and the same torch calls, in the same order; nothing of
elbokto's draws is used."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GLOBAL_SEED = 0x1A2B3C4D5E6F7788  # precompute_bref.py


def mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = x
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
    z = z ^ (z >> 31)
    return z & 0xFFFFFFFFFFFFFFFF


def derive_seed(base_seed: int, k: int, tag: int) -> int:
    x = base_seed ^ (k * 0x9E3779B97F4A7C15) ^ (tag * 0xD1342543DE82EF95)
    return mix64(x)


def l_from_seed(seed: int, L_resp: int) -> int:
    if L_resp <= 0:
        return 0
    return 1 + (mix64(seed) % L_resp)


def make_batched_fixedl_masks(select_seeds, L, prompt_lens, comp_lens, l_values, device):
    B = len(select_seeds)
    masks = torch.zeros((B, L), dtype=torch.bool, device=device)
    for b in range(B):
        p = int(prompt_lens[b])
        c = int(comp_lens[b])
        l = int(l_values[b])  # noqa: E741 (their name)
        if c <= 0 or l <= 0:
            continue
        l = min(l, c)  # noqa: E741
        start = p
        g = torch.Generator(device=device)
        g.manual_seed(select_seeds[b] & 0xFFFFFFFFFFFFFFFF)
        r = torch.rand((c,), generator=g, device=device)
        perm = torch.argsort(r)[:l]
        masks[b, start + perm] = True
    return masks


def authors_masks(indices, prompt_lens, comp_lens, seq_len: int, K: int, device="cpu"):
    """bool [K, B, seq_len]: precompute_bref.py's draws k = 1..K of the examples at rows
    ``indices`` of their dataset (base_seed = mix64(GLOBAL_SEED ^ idx), then bref_for_batch)."""
    base_seeds = [mix64(GLOBAL_SEED ^ int(idx)) for idx in indices]
    masks = []
    for k in range(1, K + 1):
        l_values_k, select_seeds_k = [], []
        for b, base in enumerate(base_seeds):
            l_values_k.append(l_from_seed(derive_seed(base, k, tag=0), int(comp_lens[b])))
            select_seeds_k.append(derive_seed(base, k, tag=1))
        masks.append(
            make_batched_fixedl_masks(
                select_seeds_k, seq_len, prompt_lens, comp_lens, l_values_k, device
            )
        )
    return torch.stack(masks)


def authors_rows(tokenizer, rows: list[dict], max_length: int):
    """data_utils.py's build_example: the templated prompt and the completion tokenised as one
    text, cut to max_length, padded with EOS to max_length; no end-of-turn token, no attention
    mask. Returns input_ids [N, max_length], prompt and completion lengths [N], labels [N]."""
    ids, prompt_len, comp_len = [], [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=False
        )
        tokens = tokenizer(
            prompt + row["completion"][0]["content"], add_special_tokens=False
        ).input_ids
        p = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        comp_len.append(max(min(max_length, len(tokens)) - p, 0))
        prompt_len.append(p)
        ids.append(tokens[:max_length] + [tokenizer.eos_token_id] * (max_length - len(tokens)))
    labels = torch.tensor([int(row["label"]) for row in rows])
    return torch.tensor(ids), torch.tensor(prompt_len), torch.tensor(comp_len), labels


def authors_elbo(model, ids, masks, comp_len, mask_id):
    """train.py's B_theta (precompute_bref.py's B_ref): one forward per draw k, the mean
    log-probability of the masked tokens (cross-entropy of the full float logits) times the
    completion length, averaged over the draws. masks: bool [K, B, T]."""
    terms = []
    for mask in masks:
        noisy = ids.clone()
        noisy[mask] = mask_id
        logits = model(input_ids=noisy).logits
        values = []
        for b in range(ids.shape[0]):
            idx = mask[b].nonzero()[:, 0]
            values.append(
                -F.cross_entropy(logits[b, idx].float(), ids[b, idx], reduction="none").mean()
            )
        terms.append(comp_len.float() * torch.stack(values))
    return torch.stack(terms).mean(0)


def authors_loss(b_theta, b_ref, labels, beta=0.1, lambda_d=1.0, lambda_u=1.0):
    """train.py's KTO loss with z0_mode="global_mean" (one rank)."""
    r = b_theta - b_ref
    s = beta * (r - r.detach().mean())
    good = labels == 1
    v = torch.empty_like(s)
    v[good] = lambda_d * torch.sigmoid(s[good])
    v[~good] = lambda_u * torch.sigmoid(-s[~good])
    return (lambda_d * good.float() + lambda_u * (~good).float() - v).mean()
