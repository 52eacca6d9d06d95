"""Loading policy and reference models: transformers models, LLaDA / Dream remote code, the tiny
built-in default, LoRA through peft; with the checks that keep ELBO-KTO meaningful.

Everything that differs between model families (mask token, logit shift, LoRA targets, Auto class,
transformers 5 fix-ups) is read from the table in :mod:`elbokto.families`."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GemmaConfig, GemmaForCausalLM
from transformers.dynamic_module_utils import get_class_from_dynamic_module

from elbokto.families import (
    ALL_LINEAR,
    FAMILIES,
    ModelFamily,
    check_transformers,
    family_of,
    transformers_version,
)
from elbokto_kernels.versions import release

# Diffusion LMs whose forward process is not masking: the masked-diffusion ELBO does not apply.
UNIFORM_NOISE_MODEL_TYPES = {"diffusion_gemma", "diffusion_gemma_text"}
TINY = "tiny"
TRANSFORMERS = release(transformers_version())
TRANSFORMERS_5 = TRANSFORMERS >= (5,)
# from_pretrained's dtype argument: "dtype" from transformers 4.56 on; before, "torch_dtype" (an
# unknown "dtype" would reach the model's __init__).
DTYPE_KWARG = "dtype" if TRANSFORMERS >= (4, 56) else "torch_dtype"
# The tiny model is a transformers-native bidirectional Gemma.
FAMILY_OF_TINY = next(family for family in FAMILIES if family.name == "bidirectional")
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class ModelConfig:
    """Which models to train and how (every field is an `elbokto train` flag)."""

    model_name_or_path: str = field(
        default=TINY,
        metadata={
            "help": "Hub id or local path of a masked diffusion LM (e.g. "
            "GSAI-ML/LLaDA-8B-Instruct), a LoRA adapter folder saved by `elbokto train --lora_r` "
            "(its base with the adapter merged in), or 'tiny' for a small random bidirectional "
            "Gemma (smoke tests)."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Reference model; default: a frozen copy of the policy (or, with LoRA, the "
            "policy with its adapters disabled)."
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow the model's own code (needed for LLaDA and Dream)."}
    )
    torch_dtype: str = field(
        default="auto", metadata={"help": "Weights dtype: auto, float32, bfloat16 or float16."}
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "Attention kernel (eager, sdpa, flex_attention, ...); default: transformers' "
            "choice. Block-diffusion scoring (--block_size) needs eager or sdpa."
        },
    )
    assume_bidirectional: bool = field(
        default=False,
        metadata={"help": "Accept a model whose config does not say it is bidirectional."},
    )
    keep_dropout: bool = field(
        default=False,
        metadata={
            "help": "Keep dropout in the policy (off by default: its noise would enter the ELBO "
            "margin and undo the common random numbers)."
        },
    )
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 trains all weights."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names for LoRA; default: the model family's (LLaDA: "
            "q,k,v,attn_out,ff,up projections; LLaDA-MoE: attention q,k,v,o), all linear "
            "layers otherwise."
        },
    )


def load_tokenizer(config: ModelConfig):
    """The tokenizer of --model_name_or_path; for an adapter folder without one, its base's."""
    source = local_or_hub(config.model_name_or_path, "--model_name_or_path")
    base = adapter_base(source)
    if base is not None and not (Path(source) / "tokenizer_config.json").is_file():
        source = base
    return AutoTokenizer.from_pretrained(source, trust_remote_code=config.trust_remote_code)


def local_or_hub(name: str, flag: str) -> str:
    """``name`` for transformers: a hub id as given, a local path made absolute.

    A name that reads as a local path (it starts with '.', '/' or '~', has more than one '/',
    or its first part exists here, like runs/ of runs/my-model) and does not exist raises
    FileNotFoundError naming ``flag``, instead of going to the hub (a minute of retries)."""
    path = Path(name).expanduser()
    reads_as_path = (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or (len(path.parts) > 1 and Path(path.parts[0]).exists())
    )
    if not reads_as_path:
        return name
    if not path.exists():
        raise FileNotFoundError(
            f"{flag} {name}: no such local model folder (a hub id reads owner/name)"
        )
    return str(path.resolve())


def adapter_base(path: str) -> str | None:
    """The base model of a saved PEFT adapter folder (``base_model_name_or_path`` of its
    adapter_config.json), or None when ``path`` is not one."""
    adapter_config = Path(path) / ADAPTER_CONFIG
    if not adapter_config.is_file():
        return None
    base = json.loads(adapter_config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(
            f"{adapter_config} names no base_model_name_or_path: set it to the "
            "model the adapter was trained on"
        )
    return local_or_hub(base, f"{adapter_config}: base_model_name_or_path")


def load_model(name_or_path: str, config: ModelConfig, *, tokenizer=None) -> nn.Module:
    """A masked diffusion LM, ready for ELBO-KTO: checked bidirectional, loaded with its family's
    Auto class and fix-ups, mask token resolved into ``model.config.mask_token_id``.
    A LoRA adapter folder loads as its base model with the adapter merged in.
    ``tokenizer`` sizes the tiny model's vocabulary."""
    if name_or_path == TINY:
        return _tiny_model(tokenizer)
    flag = (
        "--ref_model_name_or_path"
        if name_or_path == config.ref_model_name_or_path
        else "--model_name_or_path"
    )
    name_or_path = local_or_hub(name_or_path, flag)
    base = adapter_base(name_or_path)
    if base is not None:
        return _merged_adapter(name_or_path, load_model(base, config, tokenizer=tokenizer))
    model_config = AutoConfig.from_pretrained(
        name_or_path, trust_remote_code=config.trust_remote_code
    )
    if model_config.model_type in UNIFORM_NOISE_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path} ({model_config.model_type}) is a uniform-noise diffusion "
            "LM: it corrupts tokens into random tokens and has no mask token, so the "
            "masked-diffusion ELBO that ELBO-KTO estimates does not apply to it"
        )
    family = _accepted_family(model_config, name_or_path, config.assume_bidirectional)
    # The fix-ups repair what transformers 5 broke; transformers 4 runs the code as published.
    for fix in family.config_fixups if TRANSFORMERS_5 else ():
        fix(model_config)
    if family.class_fixups and config.trust_remote_code and TRANSFORMERS_5:
        model_class = _remote_class(family, model_config, name_or_path)
        for fix in family.class_fixups:
            fix(model_class)
    dtype = (
        config.torch_dtype if config.torch_dtype == "auto" else getattr(torch, config.torch_dtype)
    )
    # The Auto class resolves the remote class again: the same (fixed) class object, as long as
    # its code is unchanged, and it registers the class so that save_pretrained copies the code.
    loader = getattr(transformers, family.auto_class)
    model = loader.from_pretrained(
        name_or_path,
        config=model_config,
        **{DTYPE_KWARG: dtype},
        trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation,
    )
    model.config.mask_token_id = resolve_mask_token_id(model.config, tokenizer)
    return model


def _tiny_model(tokenizer) -> nn.Module:
    """The tiny model for ``tokenizer``; named "tiny", so that a LoRA adapter trained on it
    records "tiny" as its base and loads by rebuilding the same weights."""
    if tokenizer is None:
        raise ValueError("the tiny model needs the tokenizer it will be used with")
    model = build_tiny_model(
        len(tokenizer),
        tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model.name_or_path = TINY
    return model


def _merged_adapter(folder: str, base: nn.Module) -> nn.Module:
    """``base`` with the PEFT adapter saved in ``folder`` merged into its weights."""
    import peft

    return peft.PeftModel.from_pretrained(base, folder).merge_and_unload()


def _accepted_family(model_config, name: str, assume_bidirectional: bool) -> ModelFamily:
    """The model's family; a model outside the table only with --assume_bidirectional."""
    family = family_of(model_config)
    if family is not None:
        check_transformers(family)
        return family
    if assume_bidirectional:
        return _outside_table(model_config)
    raise ValueError(
        f"{name} ({model_config.model_type}) looks like a causal (autoregressive) "
        "LM: ELBO-KTO needs a masked diffusion model with bidirectional attention "
        "(e.g. LLaDA, Dream). If it is one, pass --assume_bidirectional"
    )


def _outside_table(model_config) -> ModelFamily:
    """A record for a model accepted with --assume_bidirectional: no mask token, shift or fix-ups
    of its own; loaded with the Auto class its remote code registers (a masked LM first), else as
    a causal-LM class."""
    auto_map = getattr(model_config, "auto_map", None) or {}
    auto_class = next(
        (
            name
            for name in ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel")
            if name in auto_map
        ),
        "AutoModelForCausalLM",
    )
    return ModelFamily(name=str(model_config.model_type), auto_class=auto_class)


def _remote_class(family: ModelFamily, model_config, name_or_path: str) -> type:
    """The class the model's own code registers for the family's Auto class."""
    auto_map = getattr(model_config, "auto_map", None) or {}
    reference = auto_map.get(family.auto_class)
    if reference is None:
        raise ValueError(
            f"{name_or_path}: the {family.name} family loads with "
            f"{family.auto_class}, but the config's auto_map names only "
            f"{sorted(auto_map)}"
        )
    repo, _, reference = reference.rpartition("--")
    return get_class_from_dynamic_module(reference, repo or name_or_path)


def resolve_mask_token_id(model_config, tokenizer=None, override: int | None = None) -> int:
    """The mask token id: the flag, else the config, else the tokenizer, else the family's."""
    family = family_of(model_config)
    for candidate in (
        override,
        getattr(model_config, "mask_token_id", None),
        getattr(tokenizer, "mask_token_id", None),
        family.mask_token_id if family else None,
    ):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        f"no mask token id for model type {model_config.model_type!r}: the config "
        "and tokenizer have none; pass --mask_token_id"
    )


def uses_shifted_logits(model_config) -> bool:
    """Dream-style models score token p + 1 at position p (the family says)."""
    family = family_of(model_config)
    return family is not None and family.shifted_logits


def prepare_policy(model: nn.Module, config: ModelConfig) -> nn.Module:
    """Dropout off (unless kept) and LoRA adapters when lora_r > 0, on the --lora_target_modules
    or else the family's default targets."""
    if not config.keep_dropout:
        disable_dropout(model)
    if config.lora_r <= 0:
        return model
    import peft

    lora = peft.LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=lora_targets(model.config, config.lora_target_modules),
        exclude_modules=None if config.lora_target_modules else ["lm_head"],
    )
    return peft.get_peft_model(model, lora)


def lora_targets(model_config, override: str | None = None) -> list[str] | str:
    """peft ``target_modules``: the comma-separated override, else the family's default, else
    every linear layer ("all-linear")."""
    if override:
        return override.split(",")
    family = family_of(model_config)
    targets = family.lora_targets if family else ALL_LINEAR
    return targets if isinstance(targets, str) else list(targets)


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
            # torch types Module.__setattr__ for tensors and modules; a float attribute is fine.
            module.attention_dropout = 0.0  # type: ignore[assignment]
    for name in (
        "attention_dropout",
        "hidden_dropout",
        "resid_pdrop",
        "embd_pdrop",
        "attn_pdrop",
        "dropout",
    ):
        if isinstance(getattr(model.config, name, None), float):
            setattr(model.config, name, 0.0)


def build_tiny_model(
    vocab_size: int,
    mask_token_id: int,
    *,
    hidden_size: int = 64,
    intermediate_size: int | None = None,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 8192,
    pad_token_id: int | None = 0,
    eos_token_id: int | None = None,
    seed: int = 0,
) -> GemmaForCausalLM:
    """A small random bidirectional GemmaForCausalLM, float32, with the given vocabulary.

    ``intermediate_size`` defaults to 4 x ``hidden_size``; the head size is
    ``hidden_size // num_heads``; no BOS token. The weights are a function of ``seed`` and the
    shapes; the global torch RNG is left as it was."""
    check_transformers(FAMILY_OF_TINY)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(
            f"hidden_size {hidden_size}, num_heads {num_heads}, num_kv_heads "
            f"{num_kv_heads}: heads must divide hidden_size and kv heads the heads"
        )
    # transformers 5's dataclass-style config signature leaves out the extra attributes it still
    # takes as keyword arguments (is_causal, mask_token_id).
    config = GemmaConfig(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        # use_bidirectional_attention alone turns causal again when an attention
        # mask is passed (transformers 5): is_causal=False too.
        use_bidirectional_attention=True,
        is_causal=False,
        mask_token_id=mask_token_id,
        tie_word_embeddings=False,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):  # transformers initialises from the global RNG
        torch.manual_seed(seed)
        return GemmaForCausalLM(config).float()
