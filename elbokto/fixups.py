"""What the families' published remote code needs to load, and load right, under transformers 5.

LLaDA, LLaDA-MoE and Dream ship their modeling code with their checkpoints (``trust_remote_code``);
it was written against transformers 4 and reaches for names transformers 5 removed or changed. Each
function here repairs one such break; a family record in :mod:`elbokto.families` lists the ones
its code needs, in two kinds:

* a config fix-up ``fix(model_config) -> None`` runs after the config is loaded and before the
  model's code is imported: it completes the config or puts back a module the code imports;
* a class fix-up ``fix(model_class) -> None`` runs on the model class (its code imported, no
  instance yet): it adapts the class, or the names of its module, to what transformers 5 calls.

Each fix-up is idempotent and leaves transformers' own tables alone (native models never see
them). The breaks were found by loading copies of the published code under transformers 5.24;
``tests/test_models.py`` reproduces each with a stand-in module and checks its fix-up.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import sys
import types
from typing import Any

import torch
from transformers import GenerationConfig

ATTN_MASK_UTILS = "transformers.modeling_attn_mask_utils"


# --- config fix-ups -------------------------------------------------------------------------------


def default_use_cache(model_config) -> None:
    """LLaDA reads ``config.use_cache`` in its forward; transformers 5's configs no longer carry
    it."""
    if not hasattr(model_config, "use_cache"):
        model_config.use_cache = False


def not_causal(model_config) -> None:
    """transformers 5 honours ``use_bidirectional_attention`` only when no attention mask is
    passed; ``is_causal=False`` keeps the attention bidirectional with a padding mask too."""
    model_config.is_causal = False


def attention_mask_converter(model_config) -> None:
    """LLaDA-MoE imports ``AttentionMaskConverter`` from ``transformers.modeling_attn_mask_utils``,
    a module transformers 5 removed: ModuleNotFoundError when its code is imported. Registers a
    stand-in module with the one converter it uses (non-causal 2-D padding mask to 4-D)."""
    if ATTN_MASK_UTILS in sys.modules or importlib.util.find_spec(ATTN_MASK_UTILS) is not None:
        return
    module = types.ModuleType(
        ATTN_MASK_UTILS,
        "elbokto stand-in for the module transformers 5 removed (see elbokto.fixups)",
    )
    vars(module)["AttentionMaskConverter"] = AttentionMaskConverter
    sys.modules[ATTN_MASK_UTILS] = module


def standard_rope_parameters(
    config,
    device=None,
    seq_len=None,
    layer_type=None,
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies of plain RoPE, ``base ** (-2i / dim)`` for i < dim / 2, with
    ``dim = head_dim * partial_rotary_factor``: [dim // 2] float32, and attention scaling 1.0.

    The signature of transformers' rope init functions; ``seq_len`` and ``layer_type`` are unused
    (plain RoPE neither grows with the length nor varies by layer)."""
    base = getattr(config, "rope_theta", None)
    if base is None:
        base = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if base is None:
        raise ValueError(f"{type(config).__name__} has no rope_theta: cannot build RoPE")
    partial = getattr(config, "partial_rotary_factor", None) or 1.0
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    dim = int(head_dim * partial)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (base**exponents), 1.0


class AttentionMaskConverter:
    """The part of transformers 4.x's converter that LLaDA-MoE calls: ``to_4d`` of a padding mask,
    non-causal only (its attention is bidirectional)."""

    def __init__(self, is_causal: bool, sliding_window: int | None = None):
        if is_causal or sliding_window is not None:
            raise NotImplementedError(
                "elbokto's stand-in AttentionMaskConverter converts "
                "non-causal masks only (is_causal=False, no sliding window)"
            )
        self.is_causal = is_causal

    def to_4d(
        self,
        attention_mask_2d: torch.Tensor,
        query_length: int,
        dtype: torch.dtype,
        key_value_length: int | None = None,
    ) -> torch.Tensor:
        """[B, K] with 1 = attend, 0 = padding -> additive [B, 1, query_length, K] in ``dtype``:
        0 where attended, the dtype's minimum where the key is padding."""
        keep = attention_mask_2d[:, None, None, :].to(torch.bool)
        shape = (keep.shape[0], 1, query_length, keep.shape[-1])
        blocked = torch.full(
            shape, torch.finfo(dtype).min, dtype=dtype, device=attention_mask_2d.device
        )
        return blocked.masked_fill(keep, 0.0)


# --- class fix-ups --------------------------------------------------------------------------------


def default_rope(model_class: type[Any]) -> None:
    """Dream and LLaDA-MoE build their rotary embedding with ``ROPE_INIT_FUNCTIONS["default"]``,
    which transformers 5 removed (plain RoPE moved into each model's own code): KeyError at model
    construction. The model's module gets its own copy of the table with a "default" entry
    (:func:`standard_rope_parameters`); transformers' table stays as it is, since transformers 5
    lets that table's "default" override the native models' own RoPE code when it initialises
    their buffers."""
    module = sys.modules[model_class.__module__]
    table = getattr(module, "ROPE_INIT_FUNCTIONS", None)
    if isinstance(table, dict) and "default" not in table:
        vars(module)["ROPE_INIT_FUNCTIONS"] = {**table, "default": standard_rope_parameters}


def tied_weights_bookkeeping(model_class: type[Any]) -> None:
    """LLaDA's model never calls ``post_init()``, where transformers 5 sets the
    ``all_tied_weights_keys`` that ``from_pretrained`` reads after loading (AttributeError). Its
    ``__init__`` now sets the attribute when missing, as post_init would; nothing else of post_init
    runs (its weight init would touch a model that was not written for it)."""
    init = model_class.__init__
    if getattr(init, "_sets_tied_weights_keys", False):
        return

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if not hasattr(self, "all_tied_weights_keys"):
            self.all_tied_weights_keys = self.get_expanded_tied_weights_keys(all_submodels=False)

    vars(__init__)["_sets_tied_weights_keys"] = True
    model_class.__init__ = __init__


def tie_weights_signature(model_class: type[Any]) -> None:
    """LLaDA overrides ``tie_weights(self)``; transformers 5 calls it with ``missing_keys`` and
    ``recompute_mapping`` (TypeError). The override now accepts and ignores them: LLaDA ties by
    its own ``weight_tying`` flag, not by transformers' mapping."""
    owner = _definer(model_class, "tie_weights")
    if owner is None:
        return
    tie = owner.__dict__["tie_weights"]
    if "missing_keys" in inspect.signature(tie, follow_wrapped=False).parameters:
        return

    @functools.wraps(tie)
    def tie_weights(self, missing_keys=None, recompute_mapping=True):
        return tie(self)

    owner.tie_weights = tie_weights


def tied_weights_mapping(model_class: type[Any]) -> None:
    """Dream and LLaDA-MoE declare ``_tied_weights_keys = ["lm_head.weight"]``, transformers 4's
    list of parameters tied to the input embeddings; transformers 5 reads a ``{tied: source}``
    mapping (AttributeError: 'list' object has no attribute 'keys', in save_pretrained). The list
    becomes that mapping, with the input embeddings where both families keep them:
    ``<base_model_prefix>.embed_tokens.weight``. Whether to tie stays the config's
    ``tie_word_embeddings`` (false in their published checkpoints)."""
    owner = _definer(model_class, "_tied_weights_keys")
    if owner is None:
        return
    keys = owner.__dict__["_tied_weights_keys"]
    if isinstance(keys, (list, tuple)):
        source = f"{model_class.base_model_prefix}.embed_tokens.weight"
        owner._tied_weights_keys = {key: source for key in keys}


def generation_config_validate(model_class: type[Any]) -> None:
    """Dream's ``DreamGenerationConfig`` overrides ``validate(self, is_init=False)``; transformers
    5 calls ``validate(strict=..., user_set_attributes=...)`` (TypeError when Dream's
    ``from_pretrained`` reads its generation config). The GenerationConfig subclasses of the
    model's module now accept the new arguments and pass on only those their override takes."""
    module = sys.modules[model_class.__module__]
    for value in list(vars(module).values()):
        if (
            isinstance(value, type)
            and issubclass(value, GenerationConfig)
            and "validate" in value.__dict__
            and not _in_transformers(value)
        ):
            _accept_any_arguments(value, "validate")


def _accept_any_arguments(cls: type[Any], name: str) -> None:
    method = cls.__dict__[name]
    if getattr(method, "_accepts_any_arguments", False):
        return
    accepted = inspect.signature(method).parameters

    @functools.wraps(method)
    def wrapper(self, **kwargs):
        return method(self, **{k: v for k, v in kwargs.items() if k in accepted})

    vars(wrapper)["_accepts_any_arguments"] = True
    setattr(cls, name, wrapper)


def rope_buffers_on_load(model_class: type[Any]) -> None:
    """transformers 5 builds a model on the meta device, loads the checkpoint, re-creates the
    non-persistent buffers *empty* and leaves refilling them to ``_init_weights``. Dream's and
    LLaDA-MoE's ``_init_weights`` predate that and skip their rotary modules, so the RoPE inverse
    frequencies stay uninitialised memory: the model loads and runs, with wrong positions. Their
    ``_init_weights`` now also recomputes the frequencies of every module that carries a
    ``rope_init_fn`` (the rotary modules of both)."""
    # Patched where it is defined, so that sub-models (Dream's DreamBaseModel, which owns the
    # rotary modules and initialises them itself) run it too.
    owner = _definer(model_class, "_init_weights")
    if owner is None:  # transformers' own _init_weights refills rotary buffers itself
        return
    init_weights = owner.__dict__["_init_weights"]
    if getattr(init_weights, "_recomputes_rope", False):
        return

    @functools.wraps(init_weights)
    def _init_weights(self, module):
        init_weights(self, module)
        if callable(getattr(module, "rope_init_fn", None)) and isinstance(
            getattr(module, "inv_freq", None), torch.Tensor
        ):
            inv_freq, module.attention_scaling = module.rope_init_fn(
                module.config, module.inv_freq.device, **getattr(module, "rope_kwargs", {})
            )
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module.original_inv_freq = module.inv_freq

    vars(_init_weights)["_recomputes_rope"] = True
    owner._init_weights = _init_weights


def _definer(model_class: type[Any], name: str) -> type[Any] | None:
    """The class of the model's own code that defines ``name``, None when only transformers (or
    nobody) does: a fix-up patches there, so every class that inherits it is fixed and
    transformers' classes never are."""
    for cls in model_class.__mro__:
        if name in cls.__dict__:
            return None if _in_transformers(cls) else cls
    return None


def _in_transformers(cls: type) -> bool:
    return cls.__module__.split(".")[0] == "transformers"
