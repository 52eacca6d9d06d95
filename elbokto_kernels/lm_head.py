"""``fused_lm_head``: a model's own forward scored by ``fused_linear_elbo`` at its LM head.

Within the ``with`` block, the model's call of its head computes the fused ELBO of the hidden
states it receives, with the head's own weight and bias, and hands the model an empty ``[..., 0]``
logits tensor, so no ``[C, L, V]`` logits are ever built and whatever the model does to logits
afterwards costs nothing. Running inside that call is what keeps it right where the weight exists
only during it (FSDP / FSDP2 / ZeRO-3 gather it in the module's pre-forward hooks, which still run).
A weight found empty there (partitioned, not gathered: ZeRO-3 gathers per module, and a LoRA
layer's base weight lives in a submodule that the fused call does not enter) raises, never scores.

Three kinds of head, each caught where the model applies it:
- an ``nn.Linear``: its ``forward`` is replaced for the block; the previous one (its class's, or
  an instance attribute that accelerate's hooks or others installed) is put back exactly after;
- a LoRA-wrapped ``nn.Linear`` (peft's ``lora.Linear``): the same, with the adapters' low-rank
  path appended to the hidden states and weight (``[h, s A(h)] @ [W, B].T = h W.T + s B A h``),
  so the adapters train exactly as in the model's own forward;
- an ``nn.Embedding`` whose weight the model applies with ``F.linear`` (tied heads, e.g. LLaDA's
  ``weight_tying``): those ``F.linear`` calls are intercepted by a ``TorchFunctionMode`` that
  leaves every other call alone; nothing on the module changes.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .backends import Backend
from .call_forms import Reduction
from .grad_filter import FilterEps
from .linear_elbo import fused_linear_elbo

_MISSING = object()


@contextmanager
def fused_lm_head(
    model_or_head: nn.Module,
    targets: Tensor,
    mask: Tensor | None = None,
    weights: Tensor | None = None,
    sample_index: Tensor | None = None,
    num_samples: int | None = None,
    *,
    logit_scale: float | None = None,
    softcap: float | None = None,
    keep_logits: bool = False,
    filter_eps: FilterEps = None,
    reduction: Reduction = "none",
    backend: Backend = "auto",
) -> Iterator[list[Tensor]]:
    """Yields a list that receives the ELBO ([num_samples] float32, or a scalar when reduced) of
    each call of the head within the block; the arguments after the first are
    ``fused_linear_elbo``'s, with the shapes of the hidden states the model passes to its head
    ([C, L, D], or [N, D]).

    ``model_or_head``: a model with ``get_output_embeddings()`` (transformers' models and
    LLaDA's, Dream's remote code), or the head module itself. Given a model, the logit
    transforms its config declares are applied: ``scale_logits`` (LLaDA: 1 / sqrt(d_model)),
    ``logit_scale`` (multiplies), ``logits_scaling`` (divides) and
    ``final_logit_softcapping``; ``logit_scale`` / ``softcap`` must then be left None.

    ``logit_scale``: a factor applied to the head's logits after the head, before any
    soft-capping; it is folded into the hidden states and the bias, since the model's own scaling
    then only touches empty logits. ``softcap``: ``s * tanh(logits / s)`` after that.

    Under autocast the GEMMs run in the autocast dtype, as the head's would. The empty logits are
    scaled by the ELBO, so they hang off its graph: DDP's search for unused parameters walks the
    graph of the forward's outputs and finds the head's. FSDP2 starts its backward work from the
    outputs of its units that the loss reaches: with the layers sharded as units (its recipe) the
    ELBO's graph reaches them; a model sharded as ONE unit needs the (zero) sum of the returned
    logits added to the loss. A head this cannot score exactly (e.g.
    DoRA, a custom ``nn.Linear`` subclass) raises ValueError with the reason;
    :func:`lm_head_unsupported` asks first.
    """
    head, config = _resolve(model_or_head)
    problem = _head_problem(head)
    if problem is not None:
        raise ValueError(f"fused_lm_head cannot score this head: {problem}")
    if config is not None:
        if logit_scale is not None or softcap is not None:
            raise ValueError(
                "given a model, the logit scale and soft-cap come from its config: "
                "leave logit_scale and softcap None (or pass the head module)"
            )
        logit_scale, softcap = _config_logit_transforms(config)
    result: list[Tensor] = []

    def score(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        if weight.numel() == 0:
            raise RuntimeError(
                "the LM head's weight has no elements inside its own call: it is "
                "partitioned (e.g. ZeRO-3) and was not gathered for this module"
            )
        if logit_scale is not None:  # s (hW + b) = (s h) W + s b
            hidden = hidden * logit_scale
            bias = None if bias is None else bias * logit_scale
        elbo = fused_linear_elbo(
            hidden,
            weight,
            targets,
            mask,
            weights,
            sample_index,
            num_samples,
            bias=bias,
            softcap=softcap,
            keep_logits=keep_logits,
            filter_eps=filter_eps,
            reduction=reduction,
            backend=backend,
        )
        result.append(elbo)
        return hidden.new_zeros(*hidden.shape[:-1], 0) * elbo.sum()

    if isinstance(head, nn.Embedding):
        with _LinearCalls(head, score):
            yield result
    else:
        linear: Any = head  # an nn.Linear, or a LoRA layer around one
        forward = (
            _lora_forward(linear, score)
            if _is_lora(head)
            else (lambda hidden: score(hidden, linear.weight, linear.bias))
        )
        with _instance_forward(head, forward):
            yield result


def lm_head_unsupported(model_or_head: nn.Module) -> str | None:
    """None when :func:`fused_lm_head` can score this model's (or this) head exactly, else the
    reason it cannot (the model's logits then have to go through ``fused_elbo``)."""
    try:
        head, _ = _resolve(model_or_head)
    except ValueError as error:
        return str(error)
    return _head_problem(head)


def _config_logit_transforms(config: Any) -> tuple[float | None, float | None]:
    """(logit_scale, softcap) that a model's config applies to its head's logits, None where it
    applies none: LLaDA's ``scale_logits`` (1 / sqrt(d_model)), Cohere's ``logit_scale``
    (multiplies), Granite's ``logits_scaling`` (divides), Gemma's ``final_logit_softcapping``."""
    scale = 1.0
    if getattr(config, "scale_logits", False):
        scale *= config.d_model**-0.5
    if getattr(config, "logit_scale", None) is not None:
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    return (None if scale == 1.0 else scale), softcap


def _resolve(model_or_head: nn.Module) -> tuple[nn.Module, Any]:
    """(head, config of the model or None)."""
    get_head = getattr(model_or_head, "get_output_embeddings", None)
    if not callable(get_head):
        return model_or_head, None
    head = get_head()
    if head is None:
        raise ValueError(
            f"{type(model_or_head).__name__}.get_output_embeddings() returned None: "
            "it has no LM head module to score"
        )
    return head, getattr(model_or_head, "config", None)


def _head_problem(head: nn.Module) -> str | None:
    if type(head) in (nn.Linear, nn.Embedding):
        return None
    if _is_lora(head):
        return _lora_problem(head)
    return (
        f"a {type(head).__name__} head (fused_lm_head takes an nn.Linear, a peft LoRA "
        "nn.Linear, or an nn.Embedding applied with F.linear; a subclass may compute more "
        "than its weight)"
    )


@contextmanager
def _instance_forward(head: nn.Module, forward: Callable[..., Tensor]) -> Iterator[None]:
    """``head.forward`` is ``forward`` within the block; whatever stood there comes back."""
    previous = head.__dict__.get("forward", _MISSING)
    head.forward = forward
    try:
        yield
    finally:
        if previous is _MISSING:
            del head.forward
        else:
            head.forward = previous


class _LinearCalls(TorchFunctionMode):
    """Routes ``F.linear(hidden, head.weight, bias)`` to ``score``; any other call runs as is.
    The weight is looked up at each call, so a weight that FSDP swaps in for the forward is the
    one matched."""

    def __init__(self, head: nn.Embedding, score: Callable[..., Tensor]):
        super().__init__()
        self.head, self.score = head, score

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            hidden, weight, bias = _linear_arguments(*args, **kwargs)
            if weight is self.head.weight:
                return self.score(hidden, weight, bias)
        return func(*args, **kwargs)


def _linear_arguments(input: Tensor, weight: Tensor, bias: Optional[Tensor] = None):
    return input, weight, bias


# peft's LoRA layer, recognised by its attributes so that the kernels import no peft (tested
# against peft itself in tests/test_lm_head.py).
def _is_lora(head: nn.Module) -> bool:
    return all(
        hasattr(head, name)
        for name in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters", "lora_dropout")
    )


def _active_lora(head: Any) -> list[str]:
    """The adapters that the layer's forward adds, in its order."""
    if head.disable_adapters or head.merged:
        return []  # the forward is the base layer's alone
    return [name for name in head.active_adapters if name in head.lora_A.keys()]


def _lora_problem(head: Any) -> str | None:
    if head.disable_adapters and head.merged:
        return "merged adapters that are disabled (peft unmerges them in its forward)"
    if type(head.base_layer) is not nn.Linear:
        return f"a LoRA layer around a {type(head.base_layer).__name__}, not an nn.Linear"
    if getattr(head, "fan_in_fan_out", False):
        return "a LoRA layer with fan_in_fan_out (a transposed base weight)"
    for name in _active_lora(head):
        if getattr(head, "use_dora", {}).get(name, False) or name in getattr(
            head, "lora_variant", {}
        ):
            return (
                f"adapter {name!r} is a LoRA variant (e.g. DoRA) whose output is not "
                "h W.T + s B A h"
            )
        if not (type(head.lora_A[name]) is nn.Linear and type(head.lora_B[name]) is nn.Linear):
            return f"adapter {name!r} is not a pair of nn.Linear layers"
    return None


def _lora_forward(head: Any, score: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """peft's ``lora.Linear.forward`` (h W.T + b + sum_a s_a B_a A_a dropout_a(h)) as one head:
    the adapters' ranks are appended to the hidden states and the weight."""

    def forward(hidden: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs.get("adapter_names") is not None:
            raise ValueError("fused_lm_head does not take per-example adapters (adapter_names)")
        base = head.base_layer
        hidden_parts, weight_parts = [hidden], [base.weight]
        bias = base.bias
        for name in _active_lora(head):
            down, up, scale = head.lora_A[name], head.lora_B[name], head.scaling[name]
            low = down(head.lora_dropout[name](hidden.to(down.weight.dtype))) * scale
            hidden_parts.append(low.to(hidden.dtype))
            weight_parts.append(up.weight.to(base.weight.dtype))
            if up.bias is not None:  # peft's lora_bias: B's bias is scaled with B's output
                shift = (up.bias * scale).to(base.weight.dtype)
                bias = shift if bias is None else bias + shift
        if len(hidden_parts) == 1:
            return score(hidden, base.weight, bias)
        return score(torch.cat(hidden_parts, -1), torch.cat(weight_parts, 1), bias)

    return forward
