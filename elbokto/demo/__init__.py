"""Judge-free demonstration on CPU: ELBO-KTO turns a 50/50 model into a reverser.

Task: the prompt is a short random string (``min_letters``..``max_letters`` letters of
``alphabet``, never a palindrome); an answer is either the string copied or the string reversed,
then EOS tokens up to a fixed width (LLaDA's SFT convention), so that the sampler's fixed
``gen_length`` covers every answer. A rule classifies a sample: ``reverse`` (desirable), ``copy``
(undesirable) or ``other`` (malformed).

1. SFT: a tiny bidirectional Gemma learns both styles, 50/50, by minimising the masked-diffusion
   loss -ELBO(response | prompt) / response length on a stream of fresh examples.
2. The SFT model is sampled on held-out prompts: about half of its answers are reversals.
3. ELBO-KTO, unpaired: each training prompt comes with ONE answer, a reversal labelled desirable
   or a copy labelled undesirable, against the frozen SFT model as reference.
4. The aligned model is sampled on the same held-out prompts: most answers are now reversals.

:func:`run_demo` writes ``summary.json`` (rates, wall times, the configuration) and ``curves.png``
(SFT loss, KTO loss, reward margins, desirable rate at checkpoints) under ``output_dir``.
``ablate=True`` adds a miniature of the paper's ablations (baseline, common random numbers, n_t,
n_t x n_yt at a fixed budget, class imbalance, and CRN and the baseline at one copy per example),
each with its class rates, its Monte-Carlo noise (Psi(S) and the gradient noise, at the start and
the end of ELBO-KTO), its saturation and its reward drift.

Nothing is downloaded: the model has random initial weights and the tokenizer is built offline
(:func:`elbokto.tiny.build_tiny_tokenizer` without merges: one token per ASCII character).

The package, one job per module, on top of training and evaluation (nothing below imports it):
``config`` (DemoConfig, QUICK), ``task`` (the rule, prompts, answers, token ids), ``training``
(SFT and its cache, ELBO-KTO), ``evaluation`` (class rates, Monte-Carlo noise, spread over
seeds), ``winrate`` (aligned against SFT, judged by the rule over HTTP), ``ablations``, ``plots``,
``runs`` (:func:`run_demo`, :func:`run_seeds`).
"""

from elbokto.demo.ablations import ABLATION_FIGURES, ABLATIONS, CONTROLS, write_ablations
from elbokto.demo.config import QUICK, DemoConfig
from elbokto.demo.runs import run_demo, run_seeds
from elbokto.demo.task import (
    DESIRABLE,
    OTHER,
    UNDESIRABLE,
    Encoder,
    answer,
    classify,
    kto_rows,
    sample_prompts,
)
from elbokto.demo.training import build_model, sft_model, train_kto, train_sft

__all__ = [
    "ABLATIONS",
    "ABLATION_FIGURES",
    "CONTROLS",
    "DESIRABLE",
    "OTHER",
    "QUICK",
    "UNDESIRABLE",
    "DemoConfig",
    "Encoder",
    "answer",
    "build_model",
    "classify",
    "kto_rows",
    "run_demo",
    "run_seeds",
    "sample_prompts",
    "sft_model",
    "train_kto",
    "train_sft",
    "write_ablations",
]
