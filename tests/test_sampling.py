"""The reverse-process sampler on a tiny bidirectional Gemma, watched through a recording model."""

import math

import pytest
import torch
from tiny_models import MASK_ID, NextTokenLogits, tiny_gemma
from torch import nn
from transformers import HfArgumentParser

from elbokto import SamplingConfig, decode_responses, generate

PAD = 0


@pytest.fixture(scope="module")
def gemma():
    model = tiny_gemma()
    # transformers builds a causal mask whenever a padding mask is passed unless config.is_causal
    # is False (use_bidirectional_attention alone only covers the unpadded path).
    model.config.is_causal = False
    return model


class Recorder(nn.Module):
    """Passes calls through to ``inner`` and keeps a copy of every canvas and attention mask."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.canvases, self.masks = [], []

    def forward(self, input_ids, attention_mask=None):
        self.canvases.append(input_ids.clone())
        self.masks.append(None if attention_mask is None else attention_mask.clone())
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


class FixedLogits(nn.Module):
    """Returns the same logits [T, V] for every row of any canvas of length T (a plain tensor)."""

    def __init__(self, logits):
        super().__init__()
        self.register_buffer("logits", logits)
        self.calls = []

    def forward(self, input_ids):
        self.calls.append(input_ids.clone())
        return self.logits.expand(input_ids.shape[0], -1, -1)


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, MASK_ID, (n,), generator=g).tolist() for n in lengths]


def test_blocks_schedule_and_prompt(gemma):
    # 2 blocks of 5 with 2 steps each: LLaDA's schedule commits 3 then 2 tokens per block.
    config = SamplingConfig(gen_length=10, block_length=5, steps=4)
    prompts = prompts_of([4, 2, 6])
    model = Recorder(gemma)
    out = generate(model, prompts, config, pad_token_id=PAD)

    assert out.dtype == torch.int64 and out.shape == (3, 10)
    assert not (out == MASK_ID).any()
    assert len(model.canvases) == config.steps
    expected_prompt = torch.tensor([[PAD] * (6 - len(p)) + p for p in prompts])
    expected_mask = (torch.arange(16) >= torch.tensor([2, 4, 0])[:, None]).long()
    assert all(torch.equal(mask, expected_mask) for mask in model.masks)
    # What the model saw before each step, then the final canvas (step 4 = "block 2" of 2).
    seen = model.canvases + [torch.cat([expected_prompt, out], 1)]
    committed_per_step = []
    for step, canvas in enumerate(seen):
        block = step // 2
        assert torch.equal(canvas[:, :6], expected_prompt)
        response = canvas[:, 6:]
        masked = response == MASK_ID
        assert not masked[:, : 5 * block].any()  # earlier blocks are complete
        assert masked[:, 5 * (block + 1) :].all()  # later blocks untouched
        filled = ~masked
        # A committed token is final: it equals the output.
        assert torch.equal(response[filled], out[filled])
        committed_per_step.append(filled.sum(1))
    counts = torch.stack(committed_per_step).diff(dim=0)
    assert counts.tolist() == [[3] * 3, [2] * 3, [3] * 3, [2] * 3]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_batch_equals_each_prompt_alone(gemma, remasking):
    config = SamplingConfig(gen_length=8, block_length=4, steps=4, remasking=remasking)
    prompts = prompts_of([3, 7, 1, 5], seed=1)
    batch = generate(gemma, prompts, config, pad_token_id=PAD)
    if remasking == "low_confidence":
        alone = torch.cat([generate(gemma, [p], config, pad_token_id=PAD) for p in prompts])
        torch.testing.assert_close(batch, alone, rtol=0, atol=0)
    # Pad value is irrelevant: padding is masked out.
    other_pad = generate(gemma, prompts, config, pad_token_id=MASK_ID - 1)
    torch.testing.assert_close(batch, other_pad, rtol=0, atol=0)


def test_equal_lengths_pass_no_attention_mask(gemma):
    model = Recorder(gemma)
    generate(
        model,
        prompts_of([3, 3]),
        SamplingConfig(gen_length=4, steps=2, block_length=4),
        pad_token_id=PAD,
    )
    assert model.masks == [None, None]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_seeded_determinism(gemma, remasking):
    prompts = prompts_of([2, 5], seed=2)

    def run(seed):
        config = SamplingConfig(
            gen_length=16, block_length=8, steps=8, temperature=1.0, remasking=remasking, seed=seed
        )
        return generate(gemma, prompts, config, pad_token_id=PAD)

    first = run(0)
    torch.testing.assert_close(first, run(0), rtol=0, atol=0)
    assert not torch.equal(first, run(1))


def test_low_confidence_commits_most_probable_first():
    # Position j of the response is more peaked the larger w[j] is: commits go in order of w.
    gen, vocab = 5, 7
    weights = torch.tensor([1.0, 4.0, 0.5, 3.0, 2.0])
    logits = torch.zeros(1 + gen, vocab + 1)
    logits[1:, 2] = weights
    model = FixedLogits(logits)
    out = generate(
        model,
        [[1]],
        SamplingConfig(gen_length=gen, steps=gen, block_length=gen, mask_token_id=vocab),
        pad_token_id=PAD,
    )
    assert out.tolist() == [[2] * gen]
    masked_before = [set((c[0, 1:] == vocab).nonzero().flatten().tolist()) for c in model.calls]
    committed = [sorted(a - b) for a, b in zip(masked_before, masked_before[1:] + [set()])]
    assert committed == [[1], [3], [4], [0], [2]]


def test_temperature_samples_softmax_over_temperature():
    # Gumbel-max with temperature T draws token v with probability softmax(logits / T)[v].
    vocab, temperature, rows = 4, 2.0, 4000
    logits = torch.zeros(2, vocab + 1)
    logits[1, :vocab] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    logits[:, vocab] = -math.inf  # the mask token is never proposed
    config = SamplingConfig(
        gen_length=1, steps=1, block_length=1, temperature=temperature, mask_token_id=vocab, seed=5
    )
    out = generate(FixedLogits(logits), [[0]] * rows, config, pad_token_id=PAD)
    freq = torch.bincount(out[:, 0], minlength=vocab).double() / rows
    want = torch.softmax(logits[1, :vocab].double() / temperature, 0)
    # 4 standard errors at most.
    assert ((freq - want).abs() <= 4 * (want * (1 - want) / rows).sqrt()).all(), (freq, want)


def test_shift_logits_undoes_a_next_token_head(gemma):
    config = SamplingConfig(gen_length=6, steps=3, block_length=6, mask_token_id=MASK_ID)
    prompts = prompts_of([2, 4], seed=3)
    want = generate(gemma, prompts, config, pad_token_id=PAD)
    shifted = SamplingConfig(
        gen_length=6, steps=3, block_length=6, mask_token_id=MASK_ID, shift_logits=True
    )
    got = generate(NextTokenLogits(gemma), prompts, shifted, pad_token_id=PAD)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(gen_length=10, block_length=4), "not a multiple of block_length"),
        (dict(gen_length=8, block_length=4, steps=3), "not a multiple of the number of blocks"),
        (dict(gen_length=8, block_length=8, steps=16), "steps=16 > gen_length=8"),
        (dict(gen_length=0), "gen_length=0"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(remasking="top_k"), "remasking='top_k'"),
        (dict(mask_token_id=-3), "mask_token_id=-3"),
    ],
)
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


def test_bad_inputs():
    model = FixedLogits(torch.zeros(3, 4))
    config = SamplingConfig(gen_length=2, steps=2, block_length=2)
    with pytest.raises(ValueError, match="no mask token id"):
        generate(model, [[1]], config, pad_token_id=PAD)
    config = SamplingConfig(gen_length=2, steps=2, block_length=2, mask_token_id=3)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], config, pad_token_id=PAD)
    with pytest.raises(ValueError, match="prompts is empty"):
        generate(model, [], config, pad_token_id=PAD)


def test_config_fields_are_cli_flags():
    (config,) = HfArgumentParser(SamplingConfig).parse_args_into_dataclasses(
        [
            "--gen_length",
            "32",
            "--block_length",
            "8",
            "--steps",
            "16",
            "--remasking",
            "random",
            "--temperature",
            "0.5",
            "--mask_token_id",
            "126336",
            "--shift_logits",
        ]
    )
    assert config == SamplingConfig(
        gen_length=32,
        block_length=8,
        steps=16,
        remasking="random",
        temperature=0.5,
        mask_token_id=126336,
        shift_logits=True,
    )
    (default,) = HfArgumentParser(SamplingConfig).parse_args_into_dataclasses([])
    assert default == SamplingConfig() and default.mask_token_id is None


class CharTokenizer:
    eos_token_id = 2

    def decode(self, ids, skip_special_tokens=False):
        assert skip_special_tokens
        return "".join(chr(ord("a") + i) for i in ids)


def test_decode_responses_cuts_at_first_eos():
    tokens = torch.tensor([[0, 1, 2, 3, 2], [3, 3, 3, 3, 3], [2, 0, 0, 0, 0]])
    assert decode_responses(CharTokenizer(), tokens) == ["ab", "ddddd", ""]
    assert decode_responses(CharTokenizer(), tokens, eos_token_id=3) == ["abc", "", "caaaa"]


# --- confidence-threshold parallel decoding (Fast-dLLM) ---------------------------------------


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
        probs[-gen:, : self.vocab] = rest[:, None]
        probs[-gen:, 1] = self.probs
        return probs.log().expand(input_ids.shape[0], -1, -1)


def committed_per_call(model, mask_id):
    masked = [set((c[0, 1:] == mask_id).nonzero().flatten().tolist()) for c in model.calls]
    return [sorted(a - b) for a, b in zip(masked, masked[1:] + [set()])]


def test_commits_everything_above_the_threshold_and_at_least_one():
    probs = [0.9, 0.3, 0.95, 0.6, 0.25]
    model = PeakedLogits(probs)
    config = SamplingConfig(gen_length=5, steps=5, block_length=5, mask_token_id=6, threshold=0.5)
    out = generate(model, [[2]], config, pad_token_id=PAD)
    assert out.tolist() == [[1] * 5]
    # Step 1: 0.95, 0.9, 0.6 pass; then one per step, most confident first.
    assert committed_per_call(model, 6) == [[0, 2, 3], [1], [4]]


def test_schedule_count_is_the_floor():
    # 4 tokens in 2 steps: the schedule asks for 2 per step even when none passes.
    model = PeakedLogits([0.3, 0.2, 0.4, 0.1])
    config = SamplingConfig(gen_length=4, steps=2, block_length=4, mask_token_id=6, threshold=0.9)
    generate(model, [[2]], config, pad_token_id=PAD)
    assert committed_per_call(model, 6) == [[0, 2], [1, 3]]


def test_threshold_one_is_the_schedule(gemma):
    prompts = [[5, 9, 11], [7, 3, 8, 2, 4], [6]]
    base = SamplingConfig(gen_length=8, steps=8, block_length=4)
    strict = SamplingConfig(gen_length=8, steps=8, block_length=4, threshold=1.0)
    torch.testing.assert_close(
        generate(gemma, prompts, strict, pad_token_id=PAD),
        generate(gemma, prompts, base, pad_token_id=PAD),
        rtol=0,
        atol=0,
    )


def test_batch_with_padding_equals_each_prompt_alone(gemma):
    # Rows finish their blocks at different steps; a finished row must stay untouched.
    prompts = [[5, 9, 11], [7, 3, 8, 2, 4, 1, 1], [6]]
    config = SamplingConfig(gen_length=8, steps=8, block_length=4, threshold=0.02)
    batch = generate(gemma, prompts, config, pad_token_id=PAD)
    alone = torch.cat([generate(gemma, [p], config, pad_token_id=PAD) for p in prompts])
    torch.testing.assert_close(batch, alone, rtol=0, atol=0)
    assert not (batch == MASK_ID).any()


def test_fewer_model_calls_when_confident():
    model = PeakedLogits([0.99] * 8)
    config = SamplingConfig(gen_length=8, steps=8, block_length=4, mask_token_id=6, threshold=0.9)
    generate(model, [[2], [3]], config, pad_token_id=PAD)
    assert len(model.calls) == 2  # one per block


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(threshold=0.0), "threshold=0.0"),
        (dict(threshold=1.5), "threshold=1.5"),
        (dict(threshold=0.5, remasking="random"), "low_confidence"),
    ],
)
def test_bad_threshold(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**kwargs)


class CountingLogits(nn.Module):
    """Proposes token 1 + (number of earlier calls) everywhere, with probability ``probs[b]`` in
    row b: a token committed at call k reads k + 1 forever after, unless it is overwritten."""

    def __init__(self, probs, vocab=8):
        super().__init__()
        self.probs, self.vocab, self.calls = probs, vocab, 0

    def forward(self, input_ids, attention_mask=None):
        token = 1 + self.calls
        self.calls += 1
        rows = []
        for p in self.probs:
            probs = torch.full((self.vocab + 1,), (1 - p) / (self.vocab - 1), dtype=torch.float64)
            probs[token], probs[self.vocab] = p, 1e-30
            rows.append(probs.log().expand(input_ids.shape[1], -1))
        return torch.stack(rows)


def test_rows_that_finish_early_keep_their_tokens():
    # Row 0 fills its block at the first call; row 1 needs all four. Row 0 must keep the tokens
    # of call 0 through the calls that row 1 still needs.
    model = CountingLogits([0.99, 0.3])
    config = SamplingConfig(gen_length=4, steps=4, block_length=4, mask_token_id=8, threshold=0.9)
    out = generate(model, [[2], [3]], config, pad_token_id=PAD)
    assert model.calls == 4
    assert out[0].tolist() == [1, 1, 1, 1] and sorted(out[1].tolist()) == [1, 2, 3, 4]


@pytest.mark.parametrize("gen_length", [1, 7, 64, 100])
def test_defaults_work_with_any_gen_length(gen_length):
    config = SamplingConfig(gen_length=gen_length)
    assert (config.block_length, config.steps) == (gen_length, gen_length)
    with pytest.raises(ValueError, match="multiple"):
        SamplingConfig(gen_length=gen_length + 1, block_length=gen_length + 2)


def test_the_old_name_of_sampling_config_warns():
    import elbokto

    with pytest.warns(FutureWarning, match="now SamplingConfig"):
        assert elbokto.GenerationConfig is SamplingConfig
