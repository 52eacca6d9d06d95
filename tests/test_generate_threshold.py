"""Confidence-threshold parallel decoding (Fast-dLLM) in the sampler."""

import pytest
import torch
from torch import nn

from elbokto import GenerationConfig, generate
from tiny_models import MASK_ID, tiny_gemma

PAD = 0


@pytest.fixture(scope="module")
def gemma():
    model = tiny_gemma()
    model.config.is_causal = False
    return model


class PeakedLogits(nn.Module):
    """Response position j proposes token 1 with probability probs[j] (the rest spread evenly
    over the other tokens); counts its calls."""

    def __init__(self, probs, vocab=6):
        super().__init__()
        self.probs, self.vocab, self.calls = torch.tensor(probs, dtype=torch.float64), vocab, []

    def forward(self, input_ids):
        self.calls.append(input_ids.clone())
        gen = len(self.probs)
        rest = (1 - self.probs) / (self.vocab - 1)
        probs = torch.full((input_ids.shape[1], self.vocab + 1), 1e-30, dtype=torch.float64)
        probs[-gen:, :self.vocab] = rest[:, None]
        probs[-gen:, 1] = self.probs
        return probs.log().expand(input_ids.shape[0], -1, -1)


def committed_per_call(model, mask_id):
    masked = [set((c[0, 1:] == mask_id).nonzero().flatten().tolist()) for c in model.calls]
    return [sorted(a - b) for a, b in zip(masked, masked[1:] + [set()])]


def test_commits_everything_above_the_threshold_and_at_least_one():
    probs = [0.9, 0.3, 0.95, 0.6, 0.25]
    model = PeakedLogits(probs)
    config = GenerationConfig(gen_length=5, steps=5, block_length=5, mask_token_id=6,
                              threshold=0.5)
    out = generate(model, [[2]], config, pad_token_id=PAD)
    assert out.tolist() == [[1] * 5]
    # Step 1: 0.95, 0.9, 0.6 pass; then one per step, most confident first.
    assert committed_per_call(model, 6) == [[0, 2, 3], [1], [4]]


def test_schedule_count_is_the_floor():
    # 4 tokens in 2 steps: the schedule asks for 2 per step even when none passes.
    model = PeakedLogits([0.3, 0.2, 0.4, 0.1])
    config = GenerationConfig(gen_length=4, steps=2, block_length=4, mask_token_id=6,
                              threshold=0.9)
    generate(model, [[2]], config, pad_token_id=PAD)
    assert committed_per_call(model, 6) == [[0, 2], [1, 3]]


def test_threshold_one_is_the_schedule(gemma):
    prompts = [[5, 9, 11], [7, 3, 8, 2, 4], [6]]
    base = GenerationConfig(gen_length=8, steps=8, block_length=4)
    strict = GenerationConfig(gen_length=8, steps=8, block_length=4, threshold=1.0)
    torch.testing.assert_close(generate(gemma, prompts, strict, pad_token_id=PAD),
                               generate(gemma, prompts, base, pad_token_id=PAD), rtol=0, atol=0)


def test_batch_with_padding_equals_each_prompt_alone(gemma):
    # Rows finish their blocks at different steps; a finished row must stay untouched.
    prompts = [[5, 9, 11], [7, 3, 8, 2, 4, 1, 1], [6]]
    config = GenerationConfig(gen_length=8, steps=8, block_length=4, threshold=0.02)
    batch = generate(gemma, prompts, config, pad_token_id=PAD)
    alone = torch.cat([generate(gemma, [p], config, pad_token_id=PAD) for p in prompts])
    torch.testing.assert_close(batch, alone, rtol=0, atol=0)
    assert not (batch == MASK_ID).any()


def test_fewer_model_calls_when_confident():
    model = PeakedLogits([0.99] * 8)
    config = GenerationConfig(gen_length=8, steps=8, block_length=4, mask_token_id=6,
                              threshold=0.9)
    generate(model, [[2], [3]], config, pad_token_id=PAD)
    assert len(model.calls) == 2  # one per block


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=0.0), "threshold=0.0"),
    (dict(threshold=1.5), "threshold=1.5"),
    (dict(threshold=0.5, remasking="random"), "low_confidence"),
])
def test_bad_threshold(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(**kwargs)
