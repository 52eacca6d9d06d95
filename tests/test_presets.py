"""The official preset: the authors' settings, and a tiny run whose masks, ELBOs, loss and
gradients are those of a stand-in of the authors' computation (vaibhavjindal/elbo-kto:
data_utils.py, precompute_bref.py, train.py), written out here."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from elbokto.cli import _parse
from elbokto.data import DataConfig, PreferenceCollator, build_dataset
from elbokto.models import ModelConfig, load_model
from elbokto.presets import PresetArgs, apply_preset, preset_values
from elbokto.run import _settle_model_fields, tokenizer_for
from elbokto.trainer import ELBOKTOConfig

# The preset pads every row to 4096 tokens; the stand-in comparison shortens that for the CPU.
SHORT = 48


def official(tmp_path, dataset="data.jsonl", **train_kw):
    return apply_preset("official", ModelConfig(), DataConfig(dataset=str(dataset)),
                        ELBOKTOConfig(output_dir=str(tmp_path / "out"), use_cpu=True,
                                      report_to="none", **train_kw))


def settings(model_cfg, data_cfg, train_cfg) -> dict:
    """Everything the authors' run fixes, as the configs hold it."""
    return {"torch_dtype": model_cfg.torch_dtype, "append_eos": data_cfg.append_eos,
            "llada_padding": data_cfg.llada_padding, "max_length": data_cfg.max_length,
            "pad_to_multiple_of": data_cfg.pad_to_multiple_of, "estimator": train_cfg.estimator,
            "n_t": train_cfg.n_t, "n_yt": train_cfg.n_yt, "antithetic": train_cfg.antithetic,
            "fixed_draws": train_cfg.fixed_draws, "baseline": train_cfg.baseline,
            "beta": train_cfg.beta, "lambda_d": train_cfg.lambda_d,
            "lambda_u": train_cfg.lambda_u, "head_filter": train_cfg.lm_head_filter_eps,
            "bf16": train_cfg.bf16, "optim": str(train_cfg.optim.value),
            "learning_rate": train_cfg.learning_rate, "weight_decay": train_cfg.weight_decay,
            "adam_betas": (train_cfg.adam_beta1, train_cfg.adam_beta2),
            "adam_epsilon": train_cfg.adam_epsilon, "max_grad_norm": train_cfg.max_grad_norm,
            "warmup": train_cfg.warmup_steps,
            "lr_scheduler_type": str(train_cfg.lr_scheduler_type.value),
            "num_train_epochs": train_cfg.num_train_epochs, "seed": train_cfg.seed}


AUTHORS = {"torch_dtype": "bfloat16", "append_eos": False, "llada_padding": True,
           "max_length": 4096, "pad_to_multiple_of": 4096, "estimator": "fixed_count", "n_t": 8,
           "n_yt": 1, "antithetic": False, "fixed_draws": True, "baseline": "batch_mean",
           "beta": 0.1, "lambda_d": 1.0, "lambda_u": 1.0, "head_filter": 0.0, "bf16": True,
           "optim": "adamw_torch", "learning_rate": 1e-6, "weight_decay": 0.01,
           "adam_betas": (0.9, 0.95), "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "warmup": 0.03,
           "lr_scheduler_type": "cosine", "num_train_epochs": 1.0, "seed": 42}


def test_official_preset_is_the_authors_setup(tmp_path):
    base = (ModelConfig(), DataConfig(dataset="d"),
            ELBOKTOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"))
    before = settings(*base)
    assert settings(*apply_preset("official", *base)) == AUTHORS
    assert settings(*base) == before != AUTHORS  # the caller's configs are not changed
    # The command line: the same values; an explicit flag wins over the preset.
    argv = ["--dataset", "d", "--output_dir", str(tmp_path), "--use_cpu", "--preset", "official"]
    *parsed, preset = _parse("train", [ModelConfig, DataConfig, ELBOKTOConfig, PresetArgs], argv)
    assert preset.preset == "official" and settings(*parsed) == AUTHORS
    *parsed, _ = _parse("train", [ModelConfig, DataConfig, ELBOKTOConfig, PresetArgs],
                        argv + ["--weight_decay", "0.1", "--append_eos"])
    assert settings(*parsed) == {**AUTHORS, "weight_decay": 0.1, "append_eos": True}
    with pytest.raises(ValueError, match="none of the given configs"):
        apply_preset("official", base[2])
    with pytest.raises(ValueError, match="--preset 'paper'"):
        preset_values("paper")


# --- a stand-in of the authors' computation ------------------------------------------------------

def authors_rows(tokenizer, rows: list[dict], max_length: int):
    """data_utils.py's build_example: the templated prompt and the completion tokenised as one
    text, cut to max_length, padded with EOS to max_length; no end-of-turn token, no attention
    mask. Returns input_ids [N, max_length], prompt and completion lengths [N], labels [N]."""
    ids, prompt_len, comp_len = [], [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                               tokenize=False)
        tokens = tokenizer(prompt + row["completion"][0]["content"],
                           add_special_tokens=False).input_ids
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
            values.append(-F.cross_entropy(logits[b, idx].float(), ids[b, idx],
                                           reduction="none").mean())
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


def write_rows(path, n=8, seed=0):
    """TRL's unpaired layout with completions of 40 to 80 random letters and spaces: several
    tokens each, so that masks of different sizes and positions exist."""
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = []
    for i in range(n):
        size = int(torch.randint(40, 81, (), generator=gen))
        picks = torch.randint(0, len(letters), (size,), generator=gen)
        text = "".join(letters[j] for j in picks).strip()
        rows.append({"prompt": [{"role": "user", "content": f"write {i}"}],
                     "completion": [{"role": "assistant", "content": text}],
                     "label": i % 2 == 0})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_official_preset_reproduces_the_authors_computation(tmp_path):
    data = write_rows(tmp_path / "data.jsonl")
    model_cfg, data_cfg, train_cfg = official(tmp_path, data)
    # float32 weights so that the two computations agree to float32 rounding; rows of SHORT.
    model_cfg.torch_dtype = "float32"
    data_cfg.max_length = data_cfg.pad_to_multiple_of = SHORT
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    dataset, _ = build_dataset(data_cfg, tokenizer)
    batch = PreferenceCollator.from_config(data_cfg, tokenizer)([row for row in dataset])
    raw = [json.loads(line) for line in data.read_text().splitlines()]
    ids, prompt_len, comp_len, labels = authors_rows(tokenizer, raw, SHORT)
    # The token rows: EOS padding to the full length, no attention mask, no end-of-turn token.
    assert "attention_mask" not in batch
    torch.testing.assert_close(batch["input_ids"], ids, rtol=0, atol=0)
    assert torch.equal(batch["prompt_lengths"], prompt_len)
    assert torch.equal(batch["response_lengths"], comp_len)
    assert torch.equal(batch["desirable"], labels == 1)
    assert int(comp_len.min()) >= 4

    reference = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer).eval()
    _settle_model_fields(train_cfg, reference, tokenizer)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy away from the reference, so that the margins differ
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.requires_grad_(False)
    objective = train_cfg.objective(pad_token_id=tokenizer.eos_token_id)
    mask_id, k = train_cfg.mask_token_id, train_cfg.n_t * train_cfg.n_yt

    # The masks: the authors' recipe (exactly l_j in {1..L} response tokens, seeded by the
    # example alone, so the same in every epoch).
    draws = objective.draws(batch, step=0)
    assert torch.equal(objective.draws(batch, step=3).mask, draws.mask)
    masks = draws.mask.view(len(raw), k, SHORT).transpose(0, 1)  # [K, B, T]
    counts = masks.sum(-1)
    assert bool(((counts >= 1) & (counts <= comp_len)).all())
    columns = torch.arange(SHORT)
    window = (columns >= prompt_len[:, None]) & (columns < (prompt_len + comp_len)[:, None])
    assert not bool((masks & ~window).any())

    out = objective(policy, batch, reference=reference, step=2)
    want_policy = authors_elbo(policy, ids, masks, comp_len, mask_id)
    want_ref = authors_elbo(reference, ids, masks, comp_len, mask_id)
    torch.testing.assert_close(out.policy_elbo, want_policy.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ref_elbo, want_ref, rtol=1e-5, atol=1e-5)
    want_loss = authors_loss(want_policy, want_ref, labels)
    torch.testing.assert_close(out.loss, want_loss.detach(), rtol=1e-5, atol=1e-7)
    # The gradient, the LM head's included: exact under the preset although it trains in bf16.
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    want_loss.backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_official_levels_are_drawn_independently(tmp_path):
    """The authors draw each level l_j ~ U{1..L} on its own; elbokto's default stratifies them
    (level j in the j-th eighth). Over 64 examples independent levels put two levels of some
    example in one stratum (each example does with probability 1 - 8!/8^8 = 0.998)."""
    _, _, train_cfg = official(tmp_path)
    length, batch = 64, 64
    batch_dict = {"input_ids": torch.zeros(batch, length + 1, dtype=torch.long),
                  "prompt_lengths": torch.ones(batch, dtype=torch.long),
                  "response_lengths": torch.full((batch,), length),
                  "desirable": torch.ones(batch, dtype=torch.bool),
                  "uid": torch.arange(batch)}
    counts = train_cfg.objective().draws(batch_dict).mask.sum(-1).view(batch, train_cfg.n_t)
    strata = ((counts - 1) * train_cfg.n_t) // length
    one_per_stratum = (strata.sort(-1).values == torch.arange(train_cfg.n_t)).all(-1)
    assert one_per_stratum.float().mean() < 0.1
