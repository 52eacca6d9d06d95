"""The model families elbokto knows, one record each: how to recognise a member, its mask token,
whether its logits are shifted, its default LoRA targets, the Auto class that loads it and the
fix-ups its published code needs under transformers 5.

The table has its own module so that a reader finds every family fact in one place and
:mod:`elbokto.models` (loading, checks, LoRA, the reference) holds no per-family branch.

Adding a family:

1. one :class:`ModelFamily` record in :data:`FAMILIES`: how its configs are recognised, its mask
   token, logit shift, LoRA targets and the Auto class its model card loads it with;
2. if its published code fails (or loads wrong) under transformers 5: one function per break in
   :mod:`elbokto.fixups`, named in the record's ``config_fixups`` / ``class_fixups``;
3. a stand-in of that code in ``tests/remote_standins.py`` (the break reproduced) and its name in
   the parametrised loading tests of ``tests/test_models.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import transformers

from elbokto import fixups
from elbokto_kernels.versions import installed, release

ALL_LINEAR = "all-linear"  # peft's shorthand: every linear layer but the output head


@dataclass(frozen=True)
class ModelFamily:
    """One family of masked diffusion LMs.

    A config belongs to the family when one of its ``architectures`` is listed (checked first: a
    published LLaDA-MoE config says model_type "llada"), else when its ``model_type`` (compared
    in lower case: Dream's says "Dream") is listed, else when its attribute named ``flag`` is
    true (the transformers-native bidirectional models)."""

    name: str
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    flag: str | None = None
    mask_token_id: int | None = None
    """Used when neither the --mask_token_id flag, the config nor the tokenizer names one."""
    shifted_logits: bool = False
    """The output at position p scores token p + 1 (Dream, an autoregressive model adapted)."""
    lora_targets: tuple[str, ...] | str = ALL_LINEAR
    """peft ``target_modules`` when --lora_target_modules is not given."""
    auto_class: str = "AutoModelForCausalLM"
    """The transformers Auto class that loads the model, as its model card does."""
    config_fixups: tuple[Callable[..., None], ...] = ()
    """``fix(model_config)``, run after the config is loaded, before the model code is imported."""
    class_fixups: tuple[Callable[[type[Any]], None], ...] = ()
    """``fix(model_class)``, run on the model class (remote code) before it is instantiated."""
    min_transformers: tuple[str, str] | None = None
    """(version, why): the oldest transformers that builds the family right, and the reason."""
    block_diffusion: bool = False
    """Trained on the block ELBO: scored block by block (``MCConfig.block_size``), never with the
    whole-response ELBO (:func:`elbokto.block.resolve_block_size`)."""
    block_size_field: str | None = None
    """Block diffusion: the config attribute that holds the block size (None: the config has
    none, so --block_size must name it)."""
    trained_block_size: int | None = None
    """Block diffusion without ``block_size_field``: the block size it was trained with, named in
    the error that asks for --block_size."""


def transformers_version() -> str:
    """The installed transformers' version: its distribution's, else (a source tree on the path
    has no distribution metadata) the module's ``__version__``."""
    return installed("transformers") or transformers.__version__


def check_transformers(family: ModelFamily) -> None:
    """ValueError, in one line, when the installed transformers predates the family's floor."""
    if family.min_transformers is None:
        return
    minimum, why = family.min_transformers
    found = transformers_version()
    if release(found) < release(minimum):
        raise ValueError(
            f"{family.name} models need transformers >= {minimum} ({why}); found "
            f"{found}: pip install 'transformers>={minimum}'"
        )


FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="llada_moe",
        model_types=("lladamoe", "llada_moe"),
        architectures=("LLaDAMoEModelLM", "LLaDAMoEModel"),
        mask_token_id=156895,
        # Attention only: LoRA on every expert multiplies the adapters by the expert count, and
        # the router (a linear layer named "gate") must not move.
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj"),
        auto_class="AutoModel",
        config_fixups=(fixups.attention_mask_converter,),
        class_fixups=(
            fixups.default_rope,
            fixups.rope_buffers_on_load,
            fixups.tied_weights_mapping,
        ),
    ),
    ModelFamily(
        name="llada",
        model_types=("llada",),
        architectures=("LLaDAModelLM",),
        mask_token_id=126336,
        # OLMo-style names: attention q/k/v and output, the feed-forward's gate and up projections.
        lora_targets=("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj"),
        auto_class="AutoModel",
        config_fixups=(fixups.default_use_cache,),
        class_fixups=(fixups.tied_weights_bookkeeping, fixups.tie_weights_signature),
    ),
    ModelFamily(
        name="dream",
        model_types=("dream",),
        architectures=("DreamModel",),
        mask_token_id=151666,
        shifted_logits=True,
        auto_class="AutoModel",
        class_fixups=(
            fixups.default_rope,
            fixups.rope_buffers_on_load,
            fixups.tied_weights_mapping,
            fixups.generation_config_validate,
        ),
    ),
    # Block-diffusion LMs (scored with MCConfig.block_size). They take a custom 4D attention mask,
    # checked end to end before training.
    ModelFamily(
        name="llada2",
        model_types=("llada2_moe",),
        mask_token_id=156895,
        lora_targets=("query_key_value", "dense"),
        block_diffusion=True,
        # Its config holds no block size; it was trained with 32, dFactory's default.
        trained_block_size=32,
    ),
    ModelFamily(
        name="sdar",
        model_types=("sdar",),
        block_diffusion=True,
        block_size_field="block_size",
    ),
    ModelFamily(
        name="bidirectional",
        flag="use_bidirectional_attention",
        config_fixups=(fixups.not_causal,),
        min_transformers=(
            "5.0",
            "earlier releases ignore use_bidirectional_attention and build the model causal",
        ),
    ),
)


def family_of(model_config) -> ModelFamily | None:
    """The family of a transformers config, or None for a model outside the table (e.g. a causal
    LM). See :class:`ModelFamily` for the order in which members are recognised."""
    architectures = set(getattr(model_config, "architectures", None) or ())
    model_type = str(getattr(model_config, "model_type", "") or "").lower()
    for family in FAMILIES:
        if architectures & set(family.architectures):
            return family
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    for family in FAMILIES:
        if family.flag is not None and getattr(model_config, family.flag, False):
            return family
    return None
