"""Labellers: desirable or undesirable, for a (prompt, response) pair, from a judge or a verifier.

KTO needs one bit per response. A :class:`Labeller` turns a list of (prompt text, response text)
items into one :class:`Label` each; two kinds, one interface:

- :class:`JudgeLabeller`: a pointwise LLM judge behind an OpenAI-compatible endpoint, through the
  client of :mod:`elbokto.eval.judge` (bounded concurrency, timeouts, retries with backoff) with
  the packaged pointwise template, whose verdict is ``[[GOOD]]`` or ``[[BAD]]``;
- :class:`CallableLabeller`: a Python function ``f(prompt, response) -> bool | None`` (exact
  match, unit tests, format checks), named on the command line as ``module:function``.

No label is ever guessed. An answer without a verdict is asked again (``judge_parse_retries``)
and then recorded without a label; a timeout, rate limit or server error that outlasts the
retries leaves the item without a label for this run (a later run asks again); a function that
returns None gives no label. Items without a label are dropped from the step and counted, never
labelled undesirable by default.

:class:`LabelStore` keeps every final label in ``<folder>/labels-rank<r>.jsonl``, keyed by a hash
of (prompt, response, the labeller's identity), and answers from it first: a resumed run, which
samples the same responses again, does not pay a judge twice for them.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from elbokto.eval.judge import JudgeConfig, JudgmentCache, PairwiseJudge
from elbokto.eval.template import load_template

__all__ = [
    "CallableLabeller",
    "JudgeLabeller",
    "Label",
    "LabelStore",
    "Labeller",
    "PointwiseJudge",
    "label_key",
    "parse_good_bad",
]

logger = logging.getLogger(__name__)

_GOOD_BAD = ("[[GOOD]]", "[[BAD]]")


@dataclass(frozen=True)
class Label:
    """One item's label.

    desirable: True / False, or None: no label (the item is dropped and counted).
    verdict: what the label was read from (the judge's answer text; the function's return value).
    error: why there is no label.
    final: False for a transient failure (timeouts, rate limits, server errors after the
        retries): not stored, so a later run asks again.
    """

    desirable: bool | None
    verdict: str | None = None
    error: str | None = None
    final: bool = True


class Labeller(Protocol):
    """Labels (prompt, response) items. ``identity`` names everything a label depends on besides
    the item (the function, or the judge model and template): it is part of the store's key."""

    identity: str

    def __call__(self, items: Sequence[tuple[str, str]]) -> list[Label]: ...


def parse_good_bad(text: str | None) -> str | None:
    """ "GOOD" or "BAD" when the answer names exactly one distinct verdict, else None."""
    found = {verdict for verdict in _GOOD_BAD if verdict in (text or "")}
    return found.pop()[2:-2] if len(found) == 1 else None


class PointwiseJudge(PairwiseJudge):
    """The judge client of :class:`elbokto.eval.judge.PairwiseJudge` (concurrency, timeouts,
    retries, cache) asked about one response at a time: items are (question, answer), the
    template has ``{question}`` and ``{answer}``, the verdict is "GOOD" or "BAD"."""

    _no_verdict = "no single [[GOOD]]/[[BAD]] verdict in the answer"

    def _key(self, item: tuple[str, ...]) -> str:
        blob = json.dumps([*item, self.model, self.template], ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _parse(self, answer: str | None) -> str | None:
        return parse_good_bad(answer)


class JudgeLabeller:
    """Labels from a pointwise LLM judge: [[GOOD]] is desirable, [[BAD]] undesirable.

    Args:
        config: the judge's endpoint, model (the first of ``judge_model``), timeouts, retries,
            concurrency; ``judge_template`` a pointwise template file, default the packaged one.
        client: an ``openai.OpenAI``-like client (default: one for ``judge_base_url``).
    """

    def __init__(self, config: JudgeConfig, client=None) -> None:
        if len(config.judge_model) != 1:
            raise ValueError(
                f"--labeller judge asks one judge; got --judge_model "
                f"{config.judge_model or 'unset'}"
            )
        template = load_template(config.judge_template, kind="pointwise")
        # Answers are stored by LabelStore with the labels; the judge keeps none of its own.
        self.judge = PointwiseJudge(
            config, config.judge_model[0], template, JudgmentCache(None), client
        )
        digest = hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]
        self.identity = f"judge:{config.judge_model[0]}:template-{digest}"

    @property
    def calls(self) -> int:
        """HTTP requests made so far (retries included)."""
        return self.judge.calls

    def __call__(self, items: Sequence[tuple[str, str]]) -> list[Label]:
        return [
            Label(
                None if j.verdict is None else j.verdict == "GOOD",
                j.answer,
                j.error,
                final=not j.transient,
            )
            # PairwiseJudge.judge is annotated for its (question, A, B) items; its loop takes
            # items of any length (_judge_one, _key), here (question, answer).
            for j in self.judge.judge(list(items))  # type: ignore[arg-type]
        ]


class CallableLabeller:
    """Labels from a Python function ``f(prompt, response) -> bool | None`` (None: no label).

    Args:
        function: the function, or its ``"module:function"`` name (imported here).
        name: its identity in the store's key (default: ``module:function`` of the function).
    """

    def __init__(
        self, function: Callable[[str, str], bool | None] | str, name: str | None = None
    ) -> None:
        if isinstance(function, str):
            name, function = name or function, import_function(function)
        self.function = function
        self.identity = "callable:" + (name or f"{function.__module__}:{function.__qualname__}")

    def __call__(self, items: Sequence[tuple[str, str]]) -> list[Label]:
        labels = []
        for prompt, response in items:
            value = self.function(prompt, response)
            if value is not None and not isinstance(value, (bool, np.bool_)):
                # A score or a string would pass bool() silently and label at random.
                raise ValueError(
                    f"labeller {self.identity} returned {value!r:.80} for prompt "
                    f"{prompt!r:.80}; expected True, False or None"
                )
            labels.append(
                Label(
                    None if value is None else bool(value),
                    repr(value),
                    None if value is not None else "the labeller returned None",
                )
            )
        return labels


def import_function(spec: str) -> Callable:
    """The function ``module:function`` names (a dotted attribute path after the colon)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(
            f"--labeller {spec!r}: expected 'judge' or 'module:function', e.g. "
            "'my_checks:exact_match'"
        )
    target: object
    try:
        target = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"--labeller {spec!r}: cannot import {module_name!r} ({err})") from None
    for part in attribute.split("."):
        target = getattr(target, part, None)
    if not callable(target):
        raise ValueError(f"--labeller {spec!r}: {module_name} has no function {attribute!r}")
    return target


def label_key(prompt: str, response: str, identity: str) -> str:
    """sha256 of everything a label depends on."""
    blob = json.dumps([prompt, response, identity], ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class LabelStore:
    """A labeller behind a store of its final labels.

    Writes ``<folder>/labels-rank<rank>.jsonl`` (JSON lines ``{"key", "labeller", "prompt",
    "response", "desirable", "verdict", "error"}``) and reads every ``labels-rank*.jsonl`` of the
    folder at start, so a resumed run finds the labels of all processes whatever its world size.

    Attributes:
        asked: items sent to the labeller so far (not counting those answered by the store).
    """

    def __init__(self, labeller: Labeller, folder: str | Path, rank: int = 0) -> None:
        self.labeller = labeller
        folder = Path(folder)
        self.cache = JudgmentCache(folder / f"labels-rank{rank}.jsonl")
        self._others = [
            JudgmentCache(path)
            for path in sorted(folder.glob("labels-rank*.jsonl"))
            if path != self.cache.path
        ]
        self.asked = 0

    def __call__(self, items: Sequence[tuple[str, str]]) -> list[tuple[Label, bool]]:
        """(label, from the store) of every item, in order; the labeller is asked only about the
        items the store has no final label for."""
        keys = [label_key(*item, self.labeller.identity) for item in items]
        found = [self._get(key) for key in keys]
        todo = [i for i, record in enumerate(found) if record is None]
        fresh = self.labeller([items[i] for i in todo]) if todo else []
        self.asked += len(todo)
        if len(fresh) != len(todo):
            raise ValueError(
                f"labeller {self.labeller.identity} returned {len(fresh)} labels for "
                f"{len(todo)} items"
            )
        out: list[tuple[Label, bool] | None] = [
            None
            if record is None
            else (Label(record["desirable"], record.get("verdict"), record.get("error")), True)
            for record in found
        ]
        for i, label in zip(todo, fresh):
            out[i] = (label, False)
            if label.final:
                self.cache.put(
                    {
                        "key": keys[i],
                        "labeller": self.labeller.identity,
                        "prompt": items[i][0],
                        "response": items[i][1],
                        "desirable": label.desirable,
                        "verdict": label.verdict,
                        "error": label.error,
                    }
                )
        return out  # type: ignore[return-value]

    def _get(self, key: str) -> dict | None:
        for cache in (self.cache, *self._others):
            record = cache.get(key)
            if record is not None:
                return record
        return None
