"""The demo's task: reverse a short string. Its rule, its prompts, the answers of both styles,
and their token ids."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from torch import Tensor

from elbokto.data import PreferenceCollator, example_uid, prompt_token_ids
from elbokto.demo.config import DemoConfig
from elbokto.tiny import SPECIAL_TOKENS, build_tiny_tokenizer

logger = logging.getLogger(__name__)


DESIRABLE, UNDESIRABLE, OTHER = "reverse", "copy", "other"


def classify(prompt: str, text: str, upper: bool = True) -> str:
    """The rule: ``"reverse"`` (desirable), ``"copy"`` (undesirable) or ``"other"``."""
    if text == answer(prompt, True, upper):
        return DESIRABLE
    return UNDESIRABLE if text == answer(prompt, False, upper) else OTHER


def answer(prompt: str, desirable: bool, upper: bool = True) -> str:
    if not desirable:
        return prompt
    return prompt[::-1].upper() if upper else prompt[::-1]


def sample_prompts(
    rng: np.random.Generator,
    n: int,
    config: DemoConfig,
    exclude: Iterable[str] = (),
    unique: bool = True,
) -> list[str]:
    """``n`` random non-palindromic strings, none in ``exclude`` (distinct when ``unique``)."""
    prompts: list[str] = []
    seen = set(exclude)
    letters = np.array(list(config.alphabet))
    while len(prompts) < n:
        length = int(rng.integers(config.min_letters, config.max_letters + 1))
        text = "".join(rng.choice(letters, length))
        if text == text[::-1] or text in seen:
            continue
        prompts.append(text)
        if unique:
            seen.add(text)
    return prompts


class Encoder:
    """Token rows of the task: chat-templated prompt, answer letters, EOS up to ``gen_length``."""

    def __init__(self, config: DemoConfig) -> None:
        # No merges: every character is one token, which is what copying and reversing need.
        self.tokenizer = build_tiny_tokenizer([], vocab_size=256 + len(SPECIAL_TOKENS))
        self.gen_length = config.gen_length
        self.upper = config.upper
        self.collator = PreferenceCollator(self.tokenizer.pad_token_id)

    def prompt_ids(self, prompts: list[str]) -> list[list[int]]:
        return prompt_token_ids(self.tokenizer, [[_user(p)] for p in prompts])

    def rows(self, prompts: list[str], desirable: list[bool]) -> list[dict]:
        """Token rows (see :class:`elbokto.data.PreferenceCollator`); uid from the content."""
        answers = [answer(p, d, self.upper) for p, d in zip(prompts, desirable)]
        eos = self.tokenizer.eos_token_id
        rows = []
        for prompt, ids, text, label in zip(
            prompts,
            self.prompt_ids(prompts),
            self.tokenizer(answers, add_special_tokens=False)["input_ids"],
            desirable,
        ):
            response = text + [eos] * (self.gen_length - len(text))
            rows.append(
                {
                    "input_ids": ids + response,
                    "prompt_length": len(ids),
                    "response_length": len(response),
                    "desirable": label,
                    "uid": example_uid([_user(prompt)], answer(prompt, label, self.upper), label),
                }
            )
        return rows

    def batch(self, rows: list[dict]) -> dict[str, Tensor]:
        return self.collator(rows)


def _user(prompt: str) -> dict[str, str]:
    return {"role": "user", "content": prompt}


def kto_rows(encoder: Encoder, config: DemoConfig, prompts: list[str]) -> list[dict]:
    """One answer per prompt, reversal (desirable) or copy with probability 1/2 (seeded), then
    the first ``fraction`` of each class kept (the imbalance ablation: the same labels, fewer
    rows)."""
    labels = (np.random.default_rng([config.seed, 1]).random(len(prompts)) < 0.5).tolist()
    keep = []
    for cls, fraction in ((True, config.desirable_fraction), (False, config.undesirable_fraction)):
        members = [i for i, label in enumerate(labels) if label == cls]
        keep += members[: round(fraction * len(members))]
    keep = sorted(keep)
    return encoder.rows([prompts[i] for i in keep], [labels[i] for i in keep])
