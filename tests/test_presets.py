"""The official preset: the authors' settings, and a tiny run whose token rows, masks, ELBOs,
loss and gradients are those of a stand-in of the authors' computation (vaibhavjindal/elbo-kto:
data_utils.py, precompute_bref.py, train.py), written out in tests/authors_code.py."""

import copy
import json
from dataclasses import replace

import pytest
import torch
from authors_code import authors_elbo, authors_loss, authors_masks, authors_rows

from elbokto.cli_args import parse_flags
from elbokto.data import DataConfig, PreferenceCollator, build_dataset
from elbokto.models import ModelConfig, load_model
from elbokto.precompute import precompute_reference, reference_meta
from elbokto.presets import PresetArgs, apply_preset, preset_values
from elbokto.run import _settle_model_fields, check_draw_keys, tokenizer_for
from elbokto.tiny import CHAT_TEMPLATE
from elbokto.trainer import ELBOKTOConfig

# The preset pads every row to 4096 tokens; the stand-in comparison shortens that for the CPU.
SHORT = 48


def official(tmp_path, dataset="data.jsonl", **train_kw):
    return apply_preset(
        "official",
        ModelConfig(),
        DataConfig(dataset=str(dataset)),
        ELBOKTOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **train_kw),
    )


def settings(model_cfg, data_cfg, train_cfg) -> dict:
    """Everything the authors' run fixes, as the configs hold it."""
    return {
        "torch_dtype": model_cfg.torch_dtype,
        "uid_source": data_cfg.uid_source,
        "joined_tokenization": data_cfg.joined_tokenization,
        "draw_source": train_cfg.draw_source,
        "append_eos": data_cfg.append_eos,
        "llada_padding": data_cfg.llada_padding,
        "max_length": data_cfg.max_length,
        "pad_to_multiple_of": data_cfg.pad_to_multiple_of,
        "estimator": train_cfg.estimator,
        "n_t": train_cfg.n_t,
        "n_yt": train_cfg.n_yt,
        "antithetic": train_cfg.antithetic,
        "fixed_draws": train_cfg.fixed_draws,
        "baseline": train_cfg.baseline,
        "beta": train_cfg.beta,
        "lambda_d": train_cfg.lambda_d,
        "lambda_u": train_cfg.lambda_u,
        "head_filter": train_cfg.lm_head_filter_eps,
        "bf16": train_cfg.bf16,
        "optim": str(train_cfg.optim.value),
        "learning_rate": train_cfg.learning_rate,
        "weight_decay": train_cfg.weight_decay,
        "adam_betas": (train_cfg.adam_beta1, train_cfg.adam_beta2),
        "adam_epsilon": train_cfg.adam_epsilon,
        "max_grad_norm": train_cfg.max_grad_norm,
        "warmup": train_cfg.warmup_steps,
        "lr_scheduler_type": str(train_cfg.lr_scheduler_type.value),
        "num_train_epochs": train_cfg.num_train_epochs,
        "seed": train_cfg.seed,
    }


AUTHORS = {
    "torch_dtype": "bfloat16",
    "uid_source": "row",
    "joined_tokenization": True,
    "draw_source": "authors",
    "append_eos": False,
    "llada_padding": True,
    "max_length": 4096,
    "pad_to_multiple_of": 4096,
    "estimator": "fixed_count",
    "n_t": 8,
    "n_yt": 1,
    "antithetic": False,
    "fixed_draws": True,
    "baseline": "batch_mean",
    "beta": 0.1,
    "lambda_d": 1.0,
    "lambda_u": 1.0,
    "head_filter": 0.0,
    "bf16": True,
    "optim": "adamw_torch",
    "learning_rate": 1e-6,
    "weight_decay": 0.01,
    "adam_betas": (0.9, 0.95),
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "warmup": 0.03,
    "lr_scheduler_type": "cosine",
    "num_train_epochs": 1.0,
    "seed": 42,
}


def test_official_preset_is_the_authors_setup(tmp_path):
    base = (
        ModelConfig(),
        DataConfig(dataset="d"),
        ELBOKTOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none"),
    )
    before = settings(*base)
    assert settings(*apply_preset("official", *base)) == AUTHORS
    assert settings(*base) == before != AUTHORS  # the caller's configs are not changed
    # The command line: the same values; an explicit flag wins over the preset.
    argv = ["--dataset", "d", "--output_dir", str(tmp_path), "--use_cpu", "--preset", "official"]
    classes = [ModelConfig, DataConfig, ELBOKTOConfig, PresetArgs]
    *parsed, preset = parse_flags("train", classes, argv)
    assert preset.preset == "official" and settings(*parsed) == AUTHORS
    *parsed, _ = parse_flags(
        "train",
        [ModelConfig, DataConfig, ELBOKTOConfig, PresetArgs],
        argv + ["--weight_decay", "0.1", "--append_eos"],
    )
    assert settings(*parsed) == {**AUTHORS, "weight_decay": 0.1, "append_eos": True}
    with pytest.raises(ValueError, match="none of the given configs"):
        apply_preset("official", base[2])
    with pytest.raises(ValueError, match="--preset 'paper'"):
        preset_values("paper")


def write_rows(path, n=9, seed=0, empty=3):
    """TRL's unpaired layout with completions of 40 to 80 random letters and spaces: several
    tokens each, so that masks of different sizes and positions exist; row ``empty`` has an
    empty completion (dropped by both pipelines, yet counted in the authors' row numbers)."""
    gen = torch.Generator().manual_seed(seed)
    letters = "abcdefghijklmnopqrstuvwxyz "
    rows = []
    for i in range(n):
        size = int(torch.randint(40, 81, (), generator=gen))
        picks = torch.randint(0, len(letters), (size,), generator=gen)
        text = "".join(letters[j] for j in picks).strip() if i != empty else ""
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"write {i}"}],
                "completion": [{"role": "assistant", "content": text}],
                "label": i % 2 == 0,
            }
        )
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


# A generation prompt that ends in a space, as LLaMA-3-style templates end in "\n\n": tokenised
# with the completion, the space merges into the completion's first word.
OPEN_TEMPLATE = CHAT_TEMPLATE.replace("<|assistant|>{%", "<|assistant|>Answer: {%")


def test_official_preset_reproduces_the_authors_computation(tmp_path):
    data = write_rows(tmp_path / "data.jsonl")
    model_cfg, data_cfg, train_cfg = official(tmp_path, data)
    # float32 weights so that the two computations agree to float32 rounding; rows of SHORT.
    model_cfg.torch_dtype = "float32"
    data_cfg.max_length = data_cfg.pad_to_multiple_of = SHORT
    tokenizer = tokenizer_for(model_cfg, data_cfg)
    tokenizer.chat_template = OPEN_TEMPLATE
    dataset, _ = build_dataset(data_cfg, tokenizer)
    collate = PreferenceCollator.from_config(data_cfg, tokenizer)
    order = [5, 0, 7, 2, 3, 6, 1, 4]  # a training batch in another order than the file's
    batch = collate([dataset[i] for i in order])
    raw = [json.loads(line) for line in data.read_text().splitlines()]
    ids, prompt_len, comp_len, labels = authors_rows(tokenizer, raw, SHORT)
    # train.py keeps the rows with a masked token; an example keeps its row number in the file.
    rows = (comp_len > 0).nonzero()[:, 0][order]
    ids, prompt_len, comp_len, labels = ids[rows], prompt_len[rows], comp_len[rows], labels[rows]
    # The token rows: the uid is the row number; EOS padding to the full length, no attention
    # mask, no end-of-turn token, prompt and completion tokenised as one text.
    assert torch.equal(batch["uid"], rows)
    assert "attention_mask" not in batch
    torch.testing.assert_close(batch["input_ids"], ids, rtol=0, atol=0)
    assert torch.equal(batch["prompt_lengths"], prompt_len)
    assert torch.equal(batch["response_lengths"], comp_len)
    assert torch.equal(batch["desirable"], labels == 1)
    assert int(comp_len.min()) >= 4
    apart, _ = build_dataset(replace(data_cfg, joined_tokenization=False), tokenizer)
    assert apart["input_ids"] != dataset["input_ids"]  # the template's space merges

    reference = load_model(model_cfg.model_name_or_path, model_cfg, tokenizer=tokenizer).eval()
    train_cfg = _settle_model_fields(train_cfg, reference, tokenizer)
    policy = copy.deepcopy(reference)
    with torch.no_grad():  # a policy away from the reference, so that the margins differ
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    reference.requires_grad_(False)
    objective = train_cfg.objective(pad_token_id=tokenizer.eos_token_id)
    mask_id, k = train_cfg.mask_token_id, train_cfg.n_t * train_cfg.n_yt

    # The masks: the authors' own random calls, seeded by the row numbers; the same every epoch.
    masks = authors_masks(rows, prompt_len, comp_len, SHORT, k)  # [K, B, T]
    draws = objective.draws(batch, draw_index=0)
    assert torch.equal(draws.mask.view(len(rows), k, SHORT).transpose(0, 1), masks)
    assert torch.equal(objective.draws(batch, draw_index=3).mask, draws.mask)

    out = objective(policy, batch, reference=reference, draw_index=2)
    want_policy = authors_elbo(policy, ids, masks, comp_len, mask_id)
    want_ref = authors_elbo(reference, ids, masks, comp_len, mask_id)
    torch.testing.assert_close(out.policy_elbo, want_policy.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.ref_elbo, want_ref, rtol=1e-5, atol=1e-5)
    want_loss = authors_loss(want_policy, want_ref, labels)
    torch.testing.assert_close(out.loss, want_loss.detach(), rtol=1e-5, atol=1e-7)
    # precompute-ref: batches of three in the file's order give every example the same masks,
    # hence the values the training batch computes online.
    loader = [
        collate([dataset[i] for i in range(j, min(j + 3, len(dataset)))])
        for j in range(0, len(dataset), 3)
    ]
    table = precompute_reference(
        reference, loader, objective, reference_meta(objective, "fingerprint", epochs=1)
    )
    torch.testing.assert_close(table.lookup(batch["uid"], 0), want_ref, rtol=1e-5, atol=1e-5)
    # The gradient, the LM head's included: exact under the preset although it trains in bf16.
    out.loss.backward()
    ours = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    want_loss.backward()
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)


def test_row_uids_are_checked_where_they_key_draws_and_tables(tmp_path):
    _, data_cfg, train_cfg = official(tmp_path)
    check_draw_keys(data_cfg, train_cfg)
    content = replace(data_cfg, uid_source="content")
    with pytest.raises(ValueError, match="--draw_source authors .* add --uid_source row"):
        check_draw_keys(content, train_cfg)
    check_draw_keys(content, replace(train_cfg, draw_source="hash"))
    # Row uids of an evaluation split repeat the training split's: one table cannot hold both.
    evaluated = replace(data_cfg, eval_split="test")
    check_draw_keys(evaluated, train_cfg)
    with pytest.raises(ValueError, match="would give evaluation examples the values of training"):
        check_draw_keys(evaluated, replace(train_cfg, ref_elbo_file="ref.pt"))


def test_official_levels_are_drawn_independently(tmp_path):
    """The authors draw each level l_j ~ U{1..L} on its own; elbokto's default stratifies them
    (level j in the j-th eighth). Over 64 examples independent levels put two levels of some
    example in one stratum (each example does with probability 1 - 8!/8^8 = 0.998)."""
    _, _, train_cfg = official(tmp_path)
    length, batch = 64, 64
    batch_dict = {
        "input_ids": torch.zeros(batch, length + 1, dtype=torch.long),
        "prompt_lengths": torch.ones(batch, dtype=torch.long),
        "response_lengths": torch.full((batch,), length),
        "desirable": torch.ones(batch, dtype=torch.bool),
        "uid": torch.arange(batch),
    }
    counts = train_cfg.objective().draws(batch_dict).mask.sum(-1).view(batch, train_cfg.n_t)
    strata = ((counts - 1) * train_cfg.n_t) // length
    one_per_stratum = (strata.sort(-1).values == torch.arange(train_cfg.n_t)).all(-1)
    assert one_per_stratum.float().mean() < 0.1
