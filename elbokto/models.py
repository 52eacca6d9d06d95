"""Loading policy and reference models: transformers models, LLaDA / Dream remote code, the tiny
built-in default, LoRA through peft; with the checks that keep ELBO-KTO meaningful."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM,
                          AutoTokenizer, GemmaConfig, GemmaForCausalLM)

from elbokto.block import BLOCK_MODEL_TYPES

# Mask token ids and LoRA targets of the diffusion families whose configs do not say.
KNOWN_MASK_TOKEN = {"llada": 126336, "llada_moe": 156895, "llada2_moe": 156895, "dream": 151666}
DIFFUSION_MODEL_TYPES = {"llada", "llada_moe", "dream", *BLOCK_MODEL_TYPES}
# Diffusion LMs whose forward process is not masking: the masked-diffusion ELBO does not apply.
UNIFORM_NOISE_MODEL_TYPES = {"diffusion_gemma", "diffusion_gemma_text"}
SHIFTED_MODEL_TYPES = {"dream"}
LORA_TARGETS = {"llada": ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj"]}
TINY = "tiny"


@dataclass
class ModelConfig:
    """Which models to train and how (every field is an `elbokto train` flag)."""

    model_name_or_path: str = field(default=TINY, metadata={
        "help": "Hub id or local path of a masked diffusion LM (e.g. GSAI-ML/LLaDA-8B-Instruct), "
                "or 'tiny' for a small random bidirectional Gemma (smoke tests)."})
    ref_model_name_or_path: str | None = field(default=None, metadata={
        "help": "Reference model; default: a frozen copy of the policy (or, with LoRA, the "
                "policy with its adapters disabled)."})
    trust_remote_code: bool = field(default=False, metadata={
        "help": "Allow the model's own code (needed for LLaDA and Dream)."})
    torch_dtype: str = field(default="auto", metadata={
        "help": "Weights dtype: auto, float32, bfloat16 or float16."})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "Attention kernel (eager, sdpa, flex_attention, ...); default: transformers' "
                "choice. Block-diffusion scoring (--block_size) needs eager or sdpa."})
    assume_bidirectional: bool = field(default=False, metadata={
        "help": "Accept a model whose config does not say it is bidirectional."})
    keep_dropout: bool = field(default=False, metadata={
        "help": "Keep dropout in the policy (off by default: its noise would enter the ELBO "
                "margin and undo the common random numbers)."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(default=None, metadata={
        "help": "Comma-separated module names for LoRA; default: LLaDA's q,k,v,attn_out,ff,up "
                "projections for LLaDA, all linear layers otherwise."})


def load_tokenizer(config: ModelConfig):
    return AutoTokenizer.from_pretrained(config.model_name_or_path,
                                         trust_remote_code=config.trust_remote_code)


def load_model(name_or_path: str, config: ModelConfig, *, tokenizer=None) -> nn.Module:
    """A masked diffusion LM, ready for ELBO-KTO: checked bidirectional, mask token resolved into
    ``model.config.mask_token_id``. ``tokenizer`` sizes the tiny model's vocabulary."""
    if name_or_path == TINY:
        if tokenizer is None:
            raise ValueError("the tiny model needs the tokenizer it will be used with")
        return build_tiny_model(len(tokenizer), tokenizer.mask_token_id)
    model_config = AutoConfig.from_pretrained(name_or_path,
                                              trust_remote_code=config.trust_remote_code)
    if model_config.model_type in UNIFORM_NOISE_MODEL_TYPES:
        raise ValueError(f"{name_or_path} ({model_config.model_type}) is a uniform-noise diffusion "
                         "LM: it corrupts tokens into random tokens and has no mask token, so the "
                         "masked-diffusion ELBO that ELBO-KTO estimates does not apply to it")
    _check_bidirectional(model_config, name_or_path, config.assume_bidirectional)
    # LLaDA's remote code reads config.use_cache, which transformers 5 configs no longer carry.
    if not hasattr(model_config, "use_cache"):
        model_config.use_cache = False
    auto_map = getattr(model_config, "auto_map", None) or {}
    loader = (AutoModelForMaskedLM if "AutoModelForMaskedLM" in auto_map
              else AutoModel if "AutoModel" in auto_map and "AutoModelForCausalLM" not in auto_map
              else AutoModelForCausalLM)
    dtype = config.torch_dtype if config.torch_dtype == "auto" else getattr(torch,
                                                                             config.torch_dtype)
    model = loader.from_pretrained(name_or_path, config=model_config, dtype=dtype,
                                   trust_remote_code=config.trust_remote_code,
                                   attn_implementation=config.attn_implementation)
    mask_id = resolve_mask_token_id(model.config, tokenizer)
    model.config.mask_token_id = mask_id
    return model


def resolve_mask_token_id(model_config, tokenizer=None, override: int | None = None) -> int:
    """The mask token id: the flag, else the config, else the tokenizer, else the family's."""
    for candidate in (override, getattr(model_config, "mask_token_id", None),
                      getattr(tokenizer, "mask_token_id", None),
                      KNOWN_MASK_TOKEN.get(getattr(model_config, "model_type", None))):
        if candidate is not None:
            return int(candidate)
    raise ValueError(f"no mask token id for model type {model_config.model_type!r}: the config "
                     "and tokenizer have none; pass --mask_token_id")


def uses_shifted_logits(model_config) -> bool:
    """Dream-style models score token p + 1 at position p."""
    return getattr(model_config, "model_type", None) in SHIFTED_MODEL_TYPES


def _check_bidirectional(model_config, name: str, assume: bool) -> None:
    if assume or getattr(model_config, "model_type", None) in DIFFUSION_MODEL_TYPES:
        return
    if getattr(model_config, "use_bidirectional_attention", False):
        model_config.is_causal = False  # transformers 5 honours the flag only without padding
        return
    raise ValueError(f"{name} ({model_config.model_type}) looks like a causal (autoregressive) "
                     "LM: ELBO-KTO needs a masked diffusion model with bidirectional attention "
                     "(e.g. LLaDA, Dream). If it is one, pass --assume_bidirectional")


def prepare_policy(model: nn.Module, config: ModelConfig) -> nn.Module:
    """Dropout off (unless kept) and LoRA adapters when lora_r > 0."""
    if not config.keep_dropout:
        disable_dropout(model)
    if config.lora_r <= 0:
        return model
    import peft

    model_type = getattr(model.config, "model_type", None)
    targets = (config.lora_target_modules.split(",") if config.lora_target_modules
               else LORA_TARGETS.get(model_type, "all-linear"))
    lora = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha,
                           lora_dropout=config.lora_dropout, target_modules=targets,
                           exclude_modules=None if config.lora_target_modules else ["lm_head"])
    return peft.get_peft_model(model, lora)


def frozen_reference(policy: nn.Module, config: ModelConfig, *, tokenizer=None) -> nn.Module | None:
    """The reference: the given model, or a frozen copy of the initial policy; None with LoRA
    (the policy with adapters disabled is the reference then)."""
    if config.ref_model_name_or_path is not None:
        reference = load_model(config.ref_model_name_or_path, config, tokenizer=tokenizer)
    elif config.lora_r > 0:
        return None
    else:
        reference = copy.deepcopy(policy)
    return reference.eval().requires_grad_(False)


def disable_dropout(model: nn.Module) -> None:
    """Sets every dropout probability to 0: modules and the attention's functional dropout."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop",
                 "attn_pdrop", "dropout"):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)


def build_tiny_model(vocab_size: int, mask_token_id: int, *, hidden_size: int = 64,
                     num_layers: int = 2, seed: int = 0) -> GemmaForCausalLM:
    """A small random bidirectional GemmaForCausalLM (float32) with the given vocabulary."""
    torch.manual_seed(seed)
    config = GemmaConfig(vocab_size=vocab_size, hidden_size=hidden_size,
                         intermediate_size=4 * hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         head_dim=hidden_size // 4, use_bidirectional_attention=True,
                         is_causal=False, mask_token_id=mask_token_id, tie_word_embeddings=False,
                         pad_token_id=0)
    return GemmaForCausalLM(config)
