"""The demo's last act: the aligned model against the SFT model, judged over HTTP by a rule.

The demo's task has a checkable answer (:func:`elbokto.demo.task.classify`): a reversal beats a
copy, which beats a malformed answer; equal classes tie. That rule, served by a
:class:`~elbokto.eval.rule_judge.RuleJudgeServer` on 127.0.0.1, is the judge of the same
`elbokto eval winrate` pipeline that a real LLM judge would serve.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from elbokto.demo.config import DemoConfig
from elbokto.demo.task import DESIRABLE, OTHER, UNDESIRABLE, Encoder, classify
from elbokto.eval.judge import JudgeConfig
from elbokto.eval.rule_judge import Rule, RuleJudgeServer
from elbokto.eval.winrate import compute_winrate
from elbokto.sampling import SamplingConfig, decode_responses, generate

_RANK = {DESIRABLE: 2, UNDESIRABLE: 1, OTHER: 0}


def demo_rule(upper: bool = True) -> Rule:
    """(prompt, answer A, answer B) -> "A" / "B" / "C" by the class of each answer."""

    def rule(question: str, answer_a: str, answer_b: str) -> str:
        a, b = (_RANK[classify(question, x, upper)] for x in (answer_a, answer_b))
        return "A" if a > b else "B" if b > a else "C"

    return rule


def demo_winrate(
    policy: nn.Module,
    sft_model: nn.Module,
    encoder: Encoder,
    prompts: list[str],
    config: DemoConfig,
    output_dir: str | Path,
) -> dict:
    """Samples both models on ``prompts`` as the demo's evaluation does (one seeded sample each)
    and returns :func:`elbokto.eval.compute_winrate`'s summary of the policy against the SFT
    model; its files go to ``<output_dir>/winrate``."""
    gen = SamplingConfig(
        gen_length=config.gen_length,
        steps=config.gen_length,
        block_length=config.gen_length,
        temperature=config.temperature,
        remasking=config.remasking,
        seed=config.seed,
        mask_token_id=encoder.tokenizer.mask_token_id,
    )
    ids = encoder.prompt_ids(prompts)
    pad = encoder.tokenizer.pad_token_id
    policy_answers, sft_answers = (
        decode_responses(encoder.tokenizer, generate(model, ids, gen, pad_token_id=pad))
        for model in (policy, sft_model)
    )
    with RuleJudgeServer(demo_rule(config.upper)) as server:
        judge = JudgeConfig(judge_model=["demo-rule"], judge_base_url=server.base_url)
        return compute_winrate(
            prompts,
            policy_answers,
            sft_answers,
            judge,
            Path(output_dir) / "winrate",
            names=("aligned", "sft"),
        )
