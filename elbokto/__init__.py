"""elbokto: align masked diffusion language models with ELBO-KTO.

The algorithm layer on top of :mod:`elbokto_kernels`: deterministic draws, ELBO estimation,
the ELBO-KTO loss, diagnostics, data, trainer, sampler and CLI.
"""

__all__: list[str] = []
