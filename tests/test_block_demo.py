"""The demo's task on a tiny block-diffusion model: SFT and ELBO-KTO with the block ELBO (the demo's
own training functions), then block-by-block sampling: the desirable rate must rise."""

import copy
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from elbokto.block import block_diffusion_mask
from elbokto.demo import (DESIRABLE, DemoConfig, Encoder, build_model, classify, kto_rows,
                          sample_prompts, train_kto, train_sft)
from elbokto.draws import MCConfig
from elbokto.generate import GenerationConfig, decode_responses, generate

# Three letters: prompts of 6 tokens and answers of 4, so blocks of 2 from position 0 put the
# response in whole blocks, which the sampler below fills one after the other.
BLOCK = 2
CONFIG = DemoConfig(min_letters=3, max_letters=3, hidden_size=32, intermediate_size=64,
                    num_heads=2, sft_steps=300, sft_batch_size=32, sft_lr=3e-3,
                    sft_mc=MCConfig(n_t=1, block_size=BLOCK),
                    mc=MCConfig(n_t=4, block_size=BLOCK), kto_examples=128, kto_batch_size=32,
                    kto_epochs=2, kto_lr=1e-3, eval_prompts=200, eval_checkpoints=0)


class BlockCausal(nn.Module):
    """Test-only block sampling without a KV cache: every call attends block-causally (the
    clean-clean quadrant of the training mask), so with the sampler's blocks on the model's
    blocks, the block being filled sees the finished blocks before it and itself."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, **kwargs):
        n = input_ids.shape[1]
        causal = block_diffusion_mask(n, BLOCK, input_ids.device)[n:, n:]
        return self.inner(input_ids=input_ids, attention_mask=causal[None, None],
                          position_ids=torch.arange(n, device=input_ids.device)[None])


def rates(model, encoder, prompts) -> Counter:
    gen = GenerationConfig(gen_length=CONFIG.gen_length, steps=CONFIG.gen_length,
                           block_length=BLOCK, temperature=1.0, remasking="random",
                           seed=CONFIG.seed, mask_token_id=encoder.tokenizer.mask_token_id)
    tokens = generate(BlockCausal(model), encoder.prompt_ids(prompts), gen,
                      pad_token_id=encoder.tokenizer.pad_token_id)
    texts = decode_responses(encoder.tokenizer, tokens)
    return Counter(classify(p, t, CONFIG.upper) for p, t in zip(prompts, texts))


@pytest.mark.slow
def test_block_model_learns_the_demo_task():
    torch.manual_seed(0)
    encoder = Encoder(CONFIG)
    assert len(encoder.prompt_ids(["abc"])[0]) % BLOCK == 0
    rng = np.random.default_rng(CONFIG.seed)
    held_out = sample_prompts(rng, CONFIG.eval_prompts, CONFIG)
    rows = kto_rows(encoder, CONFIG, sample_prompts(rng, CONFIG.kto_examples, CONFIG,
                                                    exclude=set(held_out)))
    model = build_model(CONFIG, encoder.tokenizer)
    train_sft(model, encoder, CONFIG, rng)
    reference = copy.deepcopy(model).requires_grad_(False)
    before = rates(model, encoder, held_out)
    history = train_kto(model, reference, encoder, rows, CONFIG)
    after = rates(model, encoder, held_out)
    assert history["margins"][-1] > history["margins"][0]
    assert after[DESIRABLE] - before[DESIRABLE] >= 0.2 * CONFIG.eval_prompts, (before, after)
