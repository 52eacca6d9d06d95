"""Block-by-block sampling: with the KV cache it gives the tokens of the cache-free computation,
the cache-free computation gives those of the plain sampler made block-causal, the layout and the
cache are as documented, and `elbokto generate` uses it for block models."""

import json

import pytest
import torch
from tiny_models import MASK_ID, Wrapper, tiny_block_model
from torch import nn

from elbokto.block_sampling import block_generate, check_block_cache
from elbokto.cli import main
from elbokto.data import prompt_token_ids
from elbokto.models import ModelConfig, build_tiny_model, load_model, load_tokenizer
from elbokto.sampling import SamplingConfig, decode_responses, generate
from elbokto.tiny import build_tiny_tokenizer

PAD, BLOCK = 0, 4


def prompts_of(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, MASK_ID, (n,), generator=g).tolist() for n in lengths]


class Recorder:
    """Records the model's calls: input ids, position ids, 4D mask and cached positions."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        cache = kwargs.get("cache")
        self.calls.append(
            {
                "ids": kwargs["input_ids"].clone(),
                "positions": kwargs["position_ids"].clone(),
                "mask": kwargs["attention_mask"].clone(),
                "cached": None if cache is None else cache.get_seq_length(),
            }
        )


class BlockCausal(nn.Module):
    """The plain sampler's whole-canvas call made block-causal, written out independently of
    :mod:`elbokto.block_sampling`: canvas column block k attends to itself and the column blocks
    before it (whole-block left padding keeps columns and positions in the same blocks),
    padding keys excluded, positions counted from each row's first token."""

    def __init__(self, inner, block_size):
        super().__init__()
        self.inner, self.config, self.block_size = inner, inner.config, block_size

    def forward(self, input_ids, attention_mask=None):
        n = input_ids.shape[1]
        real = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        block = torch.arange(n) // self.block_size
        allowed = (block[None, :] <= block[:, None]) & real[:, None, :] | torch.eye(n).bool()
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        return self.inner(
            input_ids=input_ids,
            attention_mask=allowed[:, None],
            position_ids=positions,
            use_cache=False,
        )


@pytest.fixture(scope="module")
def model():
    # float64: the cached and the cache-free logits then differ by ~1e-15, far below any gap
    # between two proposals' confidences, so the tokens must agree exactly.
    return tiny_block_model(seed=3).double()


SAMPLERS = {
    "greedy": dict(),
    "seeded": dict(temperature=1.0, remasking="random", seed=7),
    "threshold": dict(temperature=0.5, threshold=0.02, seed=1),
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cache_gives_the_cache_free_tokens(attn, sampler):
    """Prompts of 5, 9, 2 and 8 tokens: ends inside a block, shorter than a block, aligned."""
    model = tiny_block_model(seed=3, attn_implementation=attn).double()
    config = SamplingConfig(gen_length=8, steps=4, block_length=BLOCK, **SAMPLERS[sampler])
    prompts = prompts_of([5, 9, 2, 8])
    calls = Recorder(model).calls
    cached = block_generate(model, prompts, config, pad_token_id=PAD)
    assert cached.shape == (4, 8) and not (cached == MASK_ID).any()
    # One prefill of the 2 prompt blocks; then every call is one block of b columns against a
    # cache that holds exactly the columns before it (row 3 is unpadded: position = column).
    assert calls[0]["ids"].shape[1] == 2 * BLOCK and calls[0]["cached"] == 0
    assert all(c["ids"].shape[1] == BLOCK for c in calls[1:])
    assert all(c["cached"] == c["positions"][3, 0] for c in calls[1:])
    assert calls[-1]["positions"][3, 0] == 4 * BLOCK  # 3 response blocks: one more than 8 / b
    calls.clear()
    free = block_generate(model, prompts, config, pad_token_id=PAD, use_cache=False)
    assert all(c["cached"] is None for c in calls)
    torch.testing.assert_close(cached, free, rtol=0, atol=0)


@pytest.mark.parametrize("sampler", ["greedy", "seeded"])
def test_aligned_prompts_give_the_plain_sampler_made_block_causal(model, sampler):
    """Prompts of whole blocks: the plain sampler's left-padded canvas and blocks are the block
    sampler's, so through :class:`BlockCausal` it must give the same tokens."""
    config = SamplingConfig(gen_length=8, steps=8, block_length=BLOCK, **SAMPLERS[sampler])
    prompts = prompts_of([4, 12, 8], seed=1)
    want = generate(BlockCausal(model, BLOCK), prompts, config, pad_token_id=PAD)
    got = block_generate(model, prompts, config, pad_token_id=PAD)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_equals_each_prompt_alone(model):
    config = SamplingConfig(gen_length=8, steps=8, block_length=BLOCK)
    prompts = prompts_of([6, 1, 11, 4], seed=2)
    batch = block_generate(model, prompts, config, pad_token_id=PAD)
    alone = torch.cat([block_generate(model, [p], config, pad_token_id=PAD) for p in prompts])
    torch.testing.assert_close(batch, alone, rtol=0, atol=0)
    other_pad = block_generate(model, prompts, config, pad_token_id=MASK_ID - 1)
    torch.testing.assert_close(batch, other_pad, rtol=0, atol=0)


def test_layout_of_prompts_that_end_inside_a_block(model):
    """Prompts of 5 and 2 tokens, b = 4: row 0 keeps position 0..3 in block 0 and shares block 1
    with its response; row 1 is padded by one block and shares block 1 too."""
    prompts = prompts_of([5, 2], seed=4)
    config = SamplingConfig(gen_length=4, steps=4, block_length=BLOCK)
    calls = Recorder(model).calls
    out = block_generate(model, prompts, config, pad_token_id=PAD)
    prefill, first = calls[0], calls[1]
    assert prefill["ids"].tolist() == [prompts[0][:4], [PAD] * 4]
    assert prefill["positions"].tolist() == [[0, 1, 2, 3], [0, 0, 0, 0]]
    assert first["cached"] == 4
    assert first["ids"].tolist() == [[prompts[0][4]] + [MASK_ID] * 3, prompts[1] + [MASK_ID] * 2]
    assert first["positions"].tolist() == [[4, 5, 6, 7], [0, 1, 2, 3]]
    mask = first["mask"][:, 0]  # sdpa: True = attend; keys are the 4 cached columns and the block
    assert mask[0].all() and not mask[1, :, :4].any() and mask[1, :, 4:].all()
    # Block 1 has 3 and 2 masks over 4 steps: 3 calls, then block 2 (4 masks, 4 calls) after
    # the append of block 1; row 0's response is columns 5..8, row 1's columns 6..9.
    assert [c["cached"] for c in calls[1:]] == [4] * 3 + [4] + [8] * 4
    final = calls[4]["ids"]  # block 1 as appended
    assert out[0, :3].tolist() == final[0, 1:].tolist()
    assert out[1, :2].tolist() == final[1, 2:].tolist()


class OwnCache(Wrapper):
    """A model whose code ignores the transformers cache it is passed (keeps its own)."""

    def forward(self, input_ids, attention_mask, position_ids, use_cache, cache=None):
        return self.inner(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )


class OwnMaskWithCache(OwnCache):
    """A model that builds its own (causal) mask whenever a cache is passed."""

    def forward(self, input_ids, attention_mask, position_ids, use_cache, cache=None):
        return self.inner(
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            attention_mask=None if cache is not None else attention_mask,
        )


def test_models_whose_cache_is_not_exact_are_refused():
    check_block_cache(tiny_block_model(), BLOCK)
    with pytest.raises(ValueError, match="holds 0 positions.*use_cache=False"):
        check_block_cache(OwnCache(tiny_block_model()), BLOCK)
    with pytest.raises(ValueError, match="scores a block differently"):
        check_block_cache(OwnMaskWithCache(tiny_block_model()), BLOCK)
    config = SamplingConfig(gen_length=4, steps=4, block_length=BLOCK)
    with pytest.raises(ValueError, match="holds 0 positions"):
        block_generate(OwnCache(tiny_block_model()), prompts_of([5]), config, pad_token_id=PAD)
    block_generate(
        OwnCache(tiny_block_model()), prompts_of([5]), config, pad_token_id=PAD, use_cache=False
    )
    shifted = SamplingConfig(gen_length=4, block_length=BLOCK, shift_logits=True)
    with pytest.raises(ValueError, match="shift_logits"):
        block_generate(tiny_block_model(), prompts_of([5]), shifted, pad_token_id=PAD)


def test_elbokto_generate_samples_block_models_block_by_block(tmp_path, capsys):
    """A tiny bidirectional Gemma with --block_size: the CLI's responses are the block sampler's
    (which differ from the plain sampler's here); a --block_length that is not the model's
    block size is refused."""
    tokenizer = build_tiny_tokenizer(["reverse abc", "reverse hello", "cba olleh"])
    tokenizer.save_pretrained(tmp_path)
    build_tiny_model(
        len(tokenizer),
        tokenizer.mask_token_id,
        hidden_size=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).save_pretrained(tmp_path)
    prompts = ["reverse abc", "reverse hello"]
    flags = [
        "--gen_length",
        "8",
        "--steps",
        "4",
        "--temperature",
        "1.0",
        "--block_size",
        str(BLOCK),
    ]
    assert (
        main(["generate", "--model_name_or_path", str(tmp_path), "--prompt", *prompts, *flags]) == 0
    )
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    model_cfg = ModelConfig(model_name_or_path=str(tmp_path))
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(str(tmp_path), model_cfg, tokenizer=tokenizer).eval()
    ids = prompt_token_ids(tokenizer, [[{"role": "user", "content": p}] for p in prompts])
    config = SamplingConfig(
        gen_length=8,
        steps=4,
        block_length=BLOCK,
        temperature=1.0,
        mask_token_id=tokenizer.mask_token_id,
    )
    block = block_generate(model, ids, config, pad_token_id=tokenizer.pad_token_id)
    assert [line["response"] for line in lines] == decode_responses(tokenizer, block)
    assert not torch.equal(block, generate(model, ids, config, pad_token_id=tokenizer.pad_token_id))

    assert (
        main(
            [
                "generate",
                "--model_name_or_path",
                str(tmp_path),
                "--prompt",
                prompts[0],
                *flags,
                "--block_length",
                "2",
            ]
        )
        == 2
    )
    assert "differs from the model's block size 4" in capsys.readouterr().err
