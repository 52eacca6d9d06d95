"""A tiny LM whose head takes each form ``fused_lm_head`` handles (a biased ``nn.Linear``, a tied
embedding applied with ``F.linear``, a peft LoRA layer, logit transforms from its config), shared
by test_lm_head.py and its FSDP2 worker. Needs torch alone (peft where asked)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from devices import on_device
from torch import nn


class _Config(SimpleNamespace):
    def to_dict(self):  # what peft reads of a model's config
        return dict(vars(self))


class TinyLM(nn.Module):
    """Embedding, one mixing layer, a (biased) linear head: logits [C, L, V]. ``tied``: the head
    is the input embedding's weight applied with ``F.linear`` (LLaDA's weight_tying), and
    ``get_output_embeddings`` returns the embedding, as LLaDA's does. ``config``: the logit
    transforms the model applies after its head, as transformers' families declare them."""

    def __init__(self, vocab=29, width=16, tied=False, **config):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = None if tied else nn.Linear(width, vocab, bias=True)
        self.config = _Config(d_model=width, **config)

    def get_output_embeddings(self):
        return self.embed if self.head is None else self.head

    def forward(self, ids):
        hidden = torch.tanh(self.mix(self.embed(ids)))
        logits = F.linear(hidden, self.embed.weight) if self.head is None else self.head(hidden)
        if getattr(self.config, "scale_logits", False):
            logits.mul_(self.config.d_model**-0.5)  # in place, as LLaDA does
        if getattr(self.config, "logits_scaling", None):
            logits = logits / self.config.logits_scaling
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if cap is None else cap * torch.tanh(logits / cap)


def lora_tiny_lm(peft, tied=False, **lora):
    """TinyLM (scaled logits) with peft LoRA adapters on its mixing layer and its head, B
    initialised at random (peft's default zero B would hide a wrong adapter path)."""
    config = peft.LoraConfig(
        r=3, lora_alpha=6, target_modules=["mix", "head"], init_lora_weights=False, **lora
    )
    return peft.get_peft_model(TinyLM(tied=tied, scale_logits=True), config)


def case(seed, shape=(3, 6), vocab=29):
    """(ids int64 [C, L], targets with -100 where unmasked, weights float32 [C]) on the test
    device, from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.5
    weights = torch.rand(shape[0], generator=g) + 0.5
    ids, mask, weights = on_device(ids, mask, weights)
    return ids, ids.masked_fill(~mask, -100), weights
