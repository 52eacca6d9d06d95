"""The demo's task on a tiny block-diffusion model: SFT and ELBO-KTO with the block ELBO (the demo's
own training functions), then block-by-block sampling with the KV cache
(:func:`elbokto.block_sampling.block_generate`): the desirable rate must rise."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from tiny_models import small_demo_config

from elbokto.block_sampling import block_generate
from elbokto.demo import (
    DESIRABLE,
    Encoder,
    build_model,
    classify,
    kto_rows,
    sample_prompts,
    train_kto,
    train_sft,
)
from elbokto.draws import MCConfig
from elbokto.sampling import SamplingConfig, decode_responses

# Three letters: prompts of 6 tokens and answers of 4, in blocks of 2.
BLOCK = 2
CONFIG = small_demo_config(
    sft_mc=MCConfig(n_t=1, block_size=BLOCK), mc=MCConfig(n_t=4, block_size=BLOCK)
)


def rates(model, encoder, prompts) -> Counter:
    gen = SamplingConfig(
        gen_length=CONFIG.gen_length,
        steps=CONFIG.gen_length,
        block_length=BLOCK,
        temperature=1.0,
        remasking="random",
        seed=CONFIG.seed,
        mask_token_id=encoder.tokenizer.mask_token_id,
    )
    tokens = block_generate(
        model, encoder.prompt_ids(prompts), gen, pad_token_id=encoder.tokenizer.pad_token_id
    )
    texts = decode_responses(encoder.tokenizer, tokens)
    return Counter(classify(p, t, CONFIG.upper) for p, t in zip(prompts, texts))


@pytest.mark.slow
def test_block_model_learns_the_demo_task():
    torch.manual_seed(0)
    encoder = Encoder(CONFIG)
    rng = np.random.default_rng(CONFIG.seed)
    held_out = sample_prompts(rng, CONFIG.eval_prompts, CONFIG)
    rows = kto_rows(
        encoder, CONFIG, sample_prompts(rng, CONFIG.kto_examples, CONFIG, exclude=set(held_out))
    )
    model = build_model(CONFIG, encoder.tokenizer)
    train_sft(model, encoder, CONFIG, rng)
    reference = copy.deepcopy(model).requires_grad_(False)
    before = rates(model, encoder, held_out)
    history = train_kto(model, reference, encoder, rows, CONFIG)
    after = rates(model, encoder, held_out)
    assert history["margins"][-1] > history["margins"][0]
    assert after[DESIRABLE] - before[DESIRABLE] >= 0.2 * CONFIG.eval_prompts, (before, after)
