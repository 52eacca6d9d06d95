"""A seconds-long online ELBO-KTO run for the tests: the tiny byte-level model, a file of
prompts, the rule labeller (ASCII first character) and the trainer built from them. A module of
its own so that the two-rank script imports it as the tests do."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from elbokto.data import DataConfig
from elbokto.models import build_tiny_model
from elbokto.online import OnlineConfig, OnlineELBOKTOTrainer, load_prompts
from elbokto.tiny import SPECIAL_TOKENS, build_tiny_tokenizer


def ascii_start(prompt, response):
    """The rule: a response is desirable when its first character is ASCII. A random model's
    samples are about half and half (byte-level tokens: half the bytes are ASCII)."""
    return bool(response) and ord(response[0]) < 128


def write_prompts(path: Path, n=16, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    rows = [{"prompt": "".join(rng.choice(list("abcdefgh"), 4))} for _ in range(n // 2)]
    rows += [
        {"prompt": [{"role": "user", "content": "".join(rng.choice(list("abcdefgh"), 5))}]}
        for _ in range(n - n // 2)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def tokenizer():
    return build_tiny_tokenizer([], vocab_size=256 + len(SPECIAL_TOKENS))


def config(tmp_path, **changes):
    tok = tokenizer()
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_samples_per_prompt=2,
        learning_rate=1e-2,
        beta=1.0,
        n_t=2,
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        lr_scheduler_type="constant",
        kernel_backend="torch",
        gen_length=2,
        temperature=1.0,
        remasking="random",
        mask_token_id=tok.mask_token_id,
        max_steps=24,
        online=True,
    )
    return OnlineConfig(**{**kwargs, **changes})


def trainer(tmp_path, labeller, **changes):
    tok = tokenizer()
    prompts = load_prompts(DataConfig(dataset=str(write_prompts(tmp_path / "prompts.jsonl"))), tok)
    policy, reference = (
        build_tiny_model(
            len(tok),
            tok.mask_token_id,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        for _ in range(2)
    )
    return OnlineELBOKTOTrainer(
        policy,
        config(tmp_path, **changes),
        labeller,
        ref_model=reference,
        train_dataset=prompts,
        processing_class=tok,
    )


def samples(tmp_path, rank=0):
    path = tmp_path / "out" / "online" / f"samples-rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]
