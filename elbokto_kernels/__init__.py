"""elbokto_kernels: fused masked log-likelihood (ELBO) kernels for masked diffusion LMs.

``fused_elbo`` scores logits; ``fused_linear_elbo`` scores final hidden states through the LM head
without materialising the logits; ``fused_lm_head`` does that inside a model's own forward, at its
head (``lm_head_unsupported`` says when it cannot). All take the masked copies of every sample at
once and return one float32 ELBO estimate per sample. Backends (``elbokto_kernels.backends``):
"triton" (CUDA, or CPU under TRITON_INTERPRET=1), "cpu" (C++), "torch" (plain PyTorch); "auto"
picks; ``usable_backends(device)`` lists those that work on a device here.
"""

from .versions import MINIMUM, require_version

__version__ = "0.1.0"  # elbokto_kernels/pyproject.toml's (a test holds them equal)

require_version("torch", MINIMUM["torch"], "elbokto_kernels")

from .backends import BACKENDS, usable_backends  # noqa: E402
from .elbo import fused_elbo  # noqa: E402
from .linear_elbo import fused_linear_elbo  # noqa: E402
from .lm_head import fused_lm_head, lm_head_unsupported  # noqa: E402

__all__ = [
    "fused_elbo",
    "fused_linear_elbo",
    "fused_lm_head",
    "lm_head_unsupported",
    "BACKENDS",
    "usable_backends",
]
