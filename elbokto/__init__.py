"""elbokto: align masked diffusion language models with ELBO-KTO.

The algorithm layer on top of :mod:`elbokto_kernels`: deterministic draws, ELBO estimation,
the losses (ELBO-KTO, ELBO-DPO), diagnostics, data, the precomputed reference, trainer, sampler
and CLI.
"""

from elbokto.block import check_block_attention
from elbokto.block_generate import block_generate
from elbokto.data import (DataConfig, DataStats, PreferenceCollator, build_dataset,
                          check_class_balance, load_source, pair_rows, subsample_classes,
                          tokenize_dataset, unpair)
from elbokto.diagnostics import GradientNoise, PsiEstimate, estimate_gradient_noise, estimate_psi
from elbokto.draws import Draws, MCConfig, sample_draws
from elbokto.estimate import elbo_estimate
from elbokto.generate import GenerationConfig, decode_responses, generate
from elbokto.loss import LOSSES, LossConfig, elbo_dpo_loss, elbo_kto_loss, kl_baseline
from elbokto.objective import ELBOKTOObjective, ObjectiveOutput
from elbokto.models import ModelConfig
from elbokto.precompute import ReferenceTable, precompute_reference
from elbokto.tiny import build_tiny_tokenizer
from elbokto.trainer import ELBOKTOConfig, ELBOKTOTrainer

__all__ = [
    "DataConfig",
    "DataStats",
    "Draws",
    "ELBOKTOConfig",
    "ELBOKTOObjective",
    "ELBOKTOTrainer",
    "GenerationConfig",
    "GradientNoise",
    "LOSSES",
    "LossConfig",
    "MCConfig",
    "ModelConfig",
    "ObjectiveOutput",
    "PreferenceCollator",
    "PsiEstimate",
    "ReferenceTable",
    "block_generate",
    "build_dataset",
    "build_tiny_tokenizer",
    "check_block_attention",
    "check_class_balance",
    "decode_responses",
    "elbo_dpo_loss",
    "elbo_estimate",
    "elbo_kto_loss",
    "estimate_gradient_noise",
    "estimate_psi",
    "generate",
    "kl_baseline",
    "load_source",
    "pair_rows",
    "precompute_reference",
    "sample_draws",
    "subsample_classes",
    "tokenize_dataset",
    "unpair",
]
