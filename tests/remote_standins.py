"""Stand-ins for the families' published remote code (nothing downloaded).

Each stand-in is a model folder (config.json with ``auto_map``, a modeling file, weights) whose code
uses the transformers 4 idioms of the family's published code that break under transformers 5:

* Dream: ``ROPE_INIT_FUNCTIONS["default"]``, ``_tied_weights_keys`` as a list, an ``_init_weights``
  that skips the rotary module, a GenerationConfig subclass with ``validate(self, is_init=False)``
  read by a ``from_pretrained`` override; model_type "Dream", logits shifted.
* LLaDA: no ``post_init()``, ``tie_weights(self)``, ``config.use_cache`` read in the forward;
  OLMo-style module names (q_proj ... attn_out, ff_proj, up_proj, ff_out); its head as published:
  ``weight_tying`` applies the input embedding with ``F.linear`` (and ``get_output_embeddings``
  returns the embedding), ``scale_logits`` multiplies the logits by 1 / sqrt(d_model) in place.
* LLaDA-MoE: ``transformers.modeling_attn_mask_utils.AttentionMaskConverter``, the RoPE and tied
  weights idioms of Dream; its published config says model_type "llada" and has no mask token.

The models are tiny (vocabulary 32, width 8) but real: positions enter through RoPE frequencies,
tokens mix through attention under the padding mask, so a wrong fix shows in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

import torch
from safetensors.torch import save_file

VOCAB, WIDTH, HEADS, THETA = 32, 8, 2, 10000.0

# What Dream and LLaDA-MoE share, as their published code does (both derive from transformers 4's
# Qwen2 / OLMoE code): the rotary module, the PreTrainedModel with its transformers 4
# _init_weights, then the family's own classes (BODY), then the LM class around the base model.
_QWEN_STYLE = Template("""
class ${P}RotaryEmbedding(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.rope_type = "default"
        self.rope_init_fn = ROPE_INIT_FUNCTIONS[self.rope_type]
        inv_freq, self.attention_scaling = self.rope_init_fn(config, None)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.original_inv_freq = self.inv_freq

    def forward(self, hidden):
        positions = torch.arange(hidden.shape[1], dtype=torch.float32)
        angles = positions[:, None] * self.inv_freq[None, :]
        heads = hidden.shape[-1] // (2 * angles.shape[-1])
        return hidden * torch.cat([angles.cos(), angles.sin()], -1).repeat(1, heads)


class ${P}PreTrainedModel(PreTrainedModel):
    config_class = ${P}Config
    base_model_prefix = "model"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=0.02)

${BODY}
class ${LM}(${P}PreTrainedModel):
    _tied_weights_keys = ["lm_head.weight"]

    def __init__(self, config):
        super().__init__(config)
        self.model = ${BASE}(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return MaskedLMOutput(logits=self.lm_head(self.model(input_ids, attention_mask)))
${LM_EXTRA}""")

_DREAM_FROM_PRETRAINED = """
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model.generation_config = DreamGenerationConfig.from_pretrained(
            pretrained_model_name_or_path)
        return model
"""

_DREAM_CONFIG = """
from transformers import PretrainedConfig


class DreamConfig(PretrainedConfig):
    model_type = "Dream"

    def __init__(self, vocab_size=32, hidden_size=8, num_attention_heads=2, rope_theta=10000.0,
                 rope_scaling=None, mask_token_id=31, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        super().__init__(**kwargs)
        self.mask_token_id = mask_token_id
"""

_DREAM_BODY = """
class DreamBaseModel(DreamPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = DreamRotaryEmbedding(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        hidden = self.rotary_emb(self.embed_tokens(input_ids))
        keep = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        scores = (hidden @ hidden.transpose(1, 2)).masked_fill(~keep[:, None, :].bool(), -1e9)
        return hidden + scores.softmax(-1) @ hidden
"""

_DREAM = """
import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_dream import DreamConfig


class DreamGenerationConfig(GenerationConfig):
    def validate(self, is_init=False):
        pass
""" + _QWEN_STYLE.substitute(
    P="Dream",
    BASE="DreamBaseModel",
    LM="DreamModel",
    BODY=_DREAM_BODY,
    LM_EXTRA=_DREAM_FROM_PRETRAINED,
)

_LLADA_CONFIG = """
from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"

    def __init__(self, use_cache=False, d_model=8, vocab_size=32, **kwargs):
        self.d_model = d_model
        self.vocab_size = vocab_size
        super().__init__(**{**kwargs, "use_cache": use_cache})
"""

_LLADA = """
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_llada import LLaDAConfig


class LLaDABlock(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.attn_out = (
            nn.Linear(width, width, bias=False) for _ in range(4))
        self.ff_proj = nn.Linear(width, 2 * width, bias=False)
        self.up_proj = nn.Linear(width, 2 * width, bias=False)
        self.ff_out = nn.Linear(2 * width, width, bias=False)

    def forward(self, x, keep):
        scores = self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5
        x = x + self.attn_out(scores.masked_fill(~keep[:, None, :], -1e9).softmax(-1)
                              @ self.v_proj(x))
        return x + self.ff_out(nn.functional.silu(self.ff_proj(x)) * self.up_proj(x))


class LLaDATransformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList([LLaDABlock(config.d_model)])
        self.ff_out = nn.Linear(config.d_model, config.vocab_size, bias=False)


class LLaDAModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.transformer = LLaDATransformer(config)


class LLaDAModelLM(PreTrainedModel):
    config_class = LLaDAConfig
    base_model_prefix = "model"

    def __init__(self, config):
        super().__init__(config)
        self.model = LLaDAModel(config)

    def forward(self, input_ids, attention_mask=None, use_cache=None, **kwargs):
        if use_cache is None:
            use_cache = self.config.use_cache
        keep = (torch.ones_like(input_ids) if attention_mask is None else attention_mask).bool()
        x = self.model.transformer.wte(input_ids)
        for block in self.model.transformer.blocks:
            x = block(x, keep)
        if getattr(self.config, "weight_tying", False):
            logits = F.linear(x, self.model.transformer.wte.weight, None)
        else:
            logits = self.model.transformer.ff_out(x)
        if getattr(self.config, "scale_logits", False):
            logits.mul_(1 / math.sqrt(self.config.d_model))
        return CausalLMOutputWithPast(logits=logits)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def get_output_embeddings(self):
        if getattr(self.config, "weight_tying", False):
            return self.model.transformer.wte
        return self.model.transformer.ff_out

    def tie_weights(self):
        pass
"""

_LLADA_MOE_CONFIG = """
from transformers import PretrainedConfig


class LLaDAMoEConfig(PretrainedConfig):
    model_type = "lladamoe"

    def __init__(self, vocab_size=32, hidden_size=8, num_attention_heads=2, rope_theta=10000.0,
                 partial_rotary_factor=1.0, num_experts=2, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.rope_theta = rope_theta
        self.partial_rotary_factor = partial_rotary_factor
        self.num_experts = num_experts
        super().__init__(**kwargs)
"""

_LLADA_MOE_BODY = """
class LLaDAMoEAttention(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(width, width, bias=False) for _ in range(4))

    def forward(self, x, attention_mask):
        scores = self.q_proj(x) @ self.k_proj(x).transpose(1, 2) / x.shape[-1] ** 0.5
        if attention_mask is not None:
            converter = AttentionMaskConverter(is_causal=False)
            scores = scores + converter.to_4d(attention_mask, x.shape[1], dtype=scores.dtype)[:, 0]
        return self.o_proj(scores.softmax(-1) @ self.v_proj(x))


class LLaDAMoEExpert(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.up_proj = nn.Linear(width, 2 * width, bias=False)
        self.down_proj = nn.Linear(2 * width, width, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.up_proj(x)))


class LLaDAMoEBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.self_attn = LLaDAMoEAttention(config.hidden_size)
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = nn.ModuleList([LLaDAMoEExpert(config.hidden_size)
                                      for _ in range(config.num_experts)])

    def forward(self, x, attention_mask):
        x = x + self.self_attn(x, attention_mask)
        weights = self.gate(x).softmax(-1)
        return x + sum(weights[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))


class LLaDAMoEModel(LLaDAMoEPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = LLaDAMoERotaryEmbedding(config)
        self.layers = nn.ModuleList([LLaDAMoEBlock(config)])
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        x = self.rotary_emb(self.embed_tokens(input_ids))
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x
"""

_LLADA_MOE = """
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_attn_mask_utils import AttentionMaskConverter
from transformers.modeling_outputs import MaskedLMOutput
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .configuration_lladamoe import LLaDAMoEConfig
""" + _QWEN_STYLE.substitute(
    P="LLaDAMoE", BASE="LLaDAMoEModel", LM="LLaDAMoEModelLM", BODY=_LLADA_MOE_BODY, LM_EXTRA=""
)


def _block_shapes(prefix: str, names: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.{name}.weight": shape for name, shape in names.items()}


_W, _V, _E = WIDTH, VOCAB, 2
STANDINS = {
    "dream": dict(
        files={"configuration_dream": _DREAM_CONFIG, "modeling_dream": _DREAM},
        config={
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "auto_map": {
                "AutoConfig": "configuration_dream.DreamConfig",
                "AutoModel": "modeling_dream.DreamModel",
            },
            "vocab_size": _V,
            "hidden_size": _W,
            "num_attention_heads": HEADS,
            "rope_theta": THETA,
            "mask_token_id": 31,
            "tie_word_embeddings": False,
        },
        weights={"model.embed_tokens.weight": (_V, _W), "lm_head.weight": (_V, _W)},
        generation_config={"temperature": 0.0},
    ),
    "llada": dict(
        files={"configuration_llada": _LLADA_CONFIG, "modeling_llada": _LLADA},
        config={
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "auto_map": {
                "AutoConfig": "configuration_llada.LLaDAConfig",
                "AutoModel": "modeling_llada.LLaDAModelLM",
                "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
            },
            "d_model": _W,
            "vocab_size": _V,
            "mask_token_id": 30,
            "use_cache": False,
        },
        weights={
            "model.transformer.wte.weight": (_V, _W),
            "model.transformer.ff_out.weight": (_V, _W),
            **_block_shapes(
                "model.transformer.blocks.0",
                {
                    "q_proj": (_W, _W),
                    "k_proj": (_W, _W),
                    "v_proj": (_W, _W),
                    "attn_out": (_W, _W),
                    "ff_proj": (2 * _W, _W),
                    "up_proj": (2 * _W, _W),
                    "ff_out": (_W, 2 * _W),
                },
            ),
        },
    ),
    "llada_moe": dict(
        files={"configuration_lladamoe": _LLADA_MOE_CONFIG, "modeling_lladamoe": _LLADA_MOE},
        # As published: model_type "llada", no mask_token_id.
        config={
            "architectures": ["LLaDAMoEModelLM"],
            "model_type": "llada",
            "auto_map": {
                "AutoConfig": "configuration_lladamoe.LLaDAMoEConfig",
                "AutoModel": "modeling_lladamoe.LLaDAMoEModelLM",
                "AutoModelForCausalLM": "modeling_lladamoe.LLaDAMoEModelLM",
            },
            "vocab_size": _V,
            "hidden_size": _W,
            "num_attention_heads": HEADS,
            "rope_theta": THETA,
            "partial_rotary_factor": 1.0,
            "num_experts": _E,
            "tie_word_embeddings": False,
        },
        weights={
            "model.embed_tokens.weight": (_V, _W),
            "lm_head.weight": (_V, _W),
            "model.layers.0.gate.weight": (_E, _W),
            **_block_shapes(
                "model.layers.0.self_attn",
                {name: (_W, _W) for name in ("q_proj", "k_proj", "v_proj", "o_proj")},
            ),
            **{
                k: v
                for e in range(_E)
                for k, v in _block_shapes(
                    f"model.layers.0.experts.{e}",
                    {"up_proj": (2 * _W, _W), "down_proj": (_W, 2 * _W)},
                ).items()
            },
        },
    ),
}


def write_standin(folder: Path, family: str, seed: int = 0) -> Path:
    """Writes the stand-in model folder of ``family`` (a key of STANDINS) and returns it.

    The folder's path goes into the code as a comment: transformers caches remote modules by
    content, so each folder gets a fresh module (and class) that no earlier test has fixed."""
    spec = STANDINS[family]
    folder.mkdir(parents=True, exist_ok=True)
    for module, source in spec["files"].items():
        (folder / f"{module}.py").write_text(f"# stand-in written at {folder}\n{source}")
    (folder / "config.json").write_text(json.dumps(spec["config"]))
    if "generation_config" in spec:
        (folder / "generation_config.json").write_text(json.dumps(spec["generation_config"]))
    g = torch.Generator().manual_seed(seed)
    save_file(
        {name: torch.randn(shape, generator=g) * 0.5 for name, shape in spec["weights"].items()},
        str(folder / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return folder


def standard_inv_freq(head_dim: int, theta: float = THETA) -> torch.Tensor:
    """RoPE inverse frequencies written out: theta ** (-2i / head_dim), i < head_dim / 2."""
    return torch.tensor([theta ** (-2 * i / head_dim) for i in range(head_dim // 2)])
