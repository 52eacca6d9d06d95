"""``fused_lm_head``: a model's own forward scored by ``fused_linear_elbo`` at its LM head.

Within the ``with`` block, the head module's call computes the fused ELBO of the hidden states
it receives, with the head's own weight and bias, and hands the model an empty ``[..., 0]``
logits tensor, so no ``[C, L, V]`` logits are ever built and whatever the model does to logits
afterwards costs nothing. Running inside the head's own call is what keeps it right where the
weight exists only during that call (FSDP, ZeRO-3 gather it in the module's pre-forward hooks,
which still run). The head's previous ``forward`` (its class's, or an instance attribute that
accelerate's hooks or others installed) is put back exactly on leaving the block.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Union

from torch import Tensor, nn

from .linear_elbo import fused_linear_elbo

_MISSING = object()


@contextmanager
def fused_lm_head(head: nn.Linear, targets: Tensor, mask: Tensor | None = None,
                  weights: Tensor | None = None, sample_index: Tensor | None = None,
                  num_samples: int | None = None, *, logit_scale: float | None = None,
                  softcap: float | None = None, keep_logits: bool = False,
                  filter_eps: Union[None, float, str] = None,
                  backend: str = "auto") -> Iterator[list[Tensor]]:
    """Yields a list that receives the ELBO ([num_samples] float32) of each call of ``head``
    within the block; the arguments after ``head`` are ``fused_linear_elbo``'s, with the shapes
    of the hidden states the model will pass to its head ([C, L, D]).

    ``logit_scale``: a factor the model applies to the head's logits after the head (LLaDA's
    ``scale_logits``: 1 / sqrt(d_model)), before any soft-capping; it is folded into the hidden
    states and the bias, since the model's own scaling then only touches empty logits.

    ``head`` must be a plain ``nn.Linear`` (a head with adapters computes more than its weight:
    refused with the reason). Under autocast the GEMMs run in the autocast dtype, as the head's
    would. The empty logits are scaled by the ELBO, so they hang off its graph: DDP's search for
    unused parameters walks the graph of the forward's outputs and finds the head's.
    """
    if type(head) is not nn.Linear:
        raise ValueError(f"fused_lm_head needs a plain nn.Linear head, got {type(head).__name__} "
                         "(a head with adapters, e.g. LoRA, computes more than its weight: score "
                         "its logits with fused_elbo instead)")
    result: list[Tensor] = []

    def forward(hidden: Tensor) -> Tensor:
        bias = head.bias
        if logit_scale is not None:  # s (hW + b) = (s h) W + s b
            hidden = hidden * logit_scale
            bias = None if bias is None else bias * logit_scale
        elbo = fused_linear_elbo(hidden, head.weight, targets, mask, weights, sample_index,
                                 num_samples, bias=bias, softcap=softcap,
                                 keep_logits=keep_logits, filter_eps=filter_eps, backend=backend)
        result.append(elbo)
        return hidden.new_zeros(*hidden.shape[:-1], 0) * elbo.sum()

    previous = head.__dict__.get("forward", _MISSING)
    head.forward = forward
    try:
        yield result
    finally:
        if previous is _MISSING:
            del head.forward
        else:
            head.forward = previous
