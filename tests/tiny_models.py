"""Tiny bidirectional transformers models for tests (random weights, nothing downloaded)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

VOCAB = 97
MASK_ID = 96


def tiny_gemma(seed: int = 0, *, softcap: bool = False):
    """GemmaForCausalLM (or Gemma2 with final-logit soft-capping), bidirectional, dropout off.

    transformers 5 honours use_bidirectional_attention only without a padding mask; is_causal=False
    keeps the attention bidirectional when an attention mask is passed too."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        use_bidirectional_attention=True,
        is_causal=False,
        mask_token_id=MASK_ID,
        tie_word_embeddings=False,
    )
    if softcap:
        model = Gemma2ForCausalLM(
            Gemma2Config(**common, final_logit_softcapping=3.0, attn_logit_softcapping=None)
        )
    else:
        model = GemmaForCausalLM(GemmaConfig(**common))
    return model.float().eval()


def tiny_block_model(seed: int = 0, attn_implementation: str = "sdpa"):
    """A Qwen3ForCausalLM (SDAR's architecture) for block-diffusion scoring: causal by default,
    it takes the custom 4D mask and position ids of :mod:`elbokto.block`."""
    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        mask_token_id=MASK_ID,
        tie_word_embeddings=False,
        attn_implementation=attn_implementation,
    )
    return Qwen3ForCausalLM(config).float().eval()


def tiny_batch(seed: int = 0, batch: int = 4, seq_len: int = 12):
    """Batch dict with prompts of 3..5 tokens, responses of 2..6, right padding."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 6, (batch,), generator=g)
    response = torch.randint(2, 7, (batch,), generator=g)
    ids = torch.randint(0, MASK_ID, (batch, seq_len), generator=g)
    pos = torch.arange(seq_len)
    real = pos < (prompt + response)[:, None]
    return {
        "input_ids": ids.masked_fill(~real, 0),
        "attention_mask": real.long(),
        "prompt_lengths": prompt,
        "response_lengths": response,
        "desirable": torch.arange(batch) % 2 == 0,
        "uid": torch.arange(batch) * 7919 + seed,
    }


class NextTokenLogits(nn.Module):
    """A Dream-like model: its output at p is ``inner``'s output at p + 1 (a plain tensor)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None):
        logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
        return torch.cat([logits[:, 1:], logits[:, -1:]], dim=1)


def small_demo_config(**changes):
    """The demo's task at a size where alignment shows within minutes on 2 cores: three-letter
    strings, a model of width 32. 600 SFT steps give a ~50/50 base (after 300 most samples were
    malformed); at kto_lr 1e-3 the samples collapsed into malformed ones."""
    from elbokto.demo import DemoConfig
    from elbokto.draws import MCConfig

    small = dict(
        min_letters=3,
        max_letters=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        sft_steps=600,
        sft_batch_size=32,
        sft_lr=3e-3,
        mc=MCConfig(n_t=4),
        kto_examples=128,
        kto_batch_size=32,
        kto_epochs=2,
        kto_lr=4e-4,
        eval_prompts=200,
        eval_checkpoints=0,
    )
    return DemoConfig(**{**small, **changes})


class Wrapper(nn.Module):
    """An inner model behind a forward of a test's own (to play a model whose code misbehaves):
    the inner model's config and input embeddings, no forward of its own."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()
