"""Judge templates: one user message with slots for the prompt and the response(s).

Two kinds, each with a packaged default under ``elbokto/eval/templates/``:

- ``pairwise`` (``pairwise.txt``, MT-Bench's pairwise prompt): ``{question}`` receives the prompt,
  ``{answer_a}`` and ``{answer_b}`` the two responses; the verdict is ``[[A]]``, ``[[B]]`` or
  ``[[C]]`` (tie).
- ``pointwise`` (``pointwise.txt``): ``{question}`` and ``{answer}``, one response; the verdict is
  ``[[GOOD]]`` or ``[[BAD]]`` (the online loop's judge, :mod:`elbokto.labellers`).

Nothing else in the text is interpreted (literal braces are fine).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

SLOTS = ("{question}", "{answer_a}", "{answer_b}")
POINTWISE_SLOTS = ("{question}", "{answer}")
KINDS = {"pairwise": SLOTS, "pointwise": POINTWISE_SLOTS}
DEFAULT = "default"


def load_template(path: str | None = None, kind: str = "pairwise") -> str:
    """The template text: the packaged default of ``kind`` when ``path`` is None or ``"default"``,
    else the file; ValueError unless each response slot of ``kind`` appears exactly once."""
    if kind not in KINDS:
        raise ValueError(f"template kind {kind!r}; expected one of {sorted(KINDS)}")
    if path is None or path == DEFAULT:
        text = resources.files("elbokto.eval").joinpath(f"templates/{kind}.txt").read_text()
    else:
        if not Path(path).is_file():
            raise ValueError(f"judge template {path} does not exist")
        text = Path(path).read_text()
    check_template(text, path or DEFAULT, kind)
    return text


def check_template(text: str, name: str = "template", kind: str = "pairwise") -> None:
    question, *answers = KINDS[kind]
    counts = {slot: text.count(slot) for slot in KINDS[kind]}
    if any(counts[slot] != 1 for slot in answers) or counts[question] > 1:
        raise ValueError(
            f"{kind} judge template {name} has slots {counts}; expected "
            f"{' and '.join(answers)} exactly once each and {question} at most once"
        )


def render(template: str, question: str, *answers: str) -> str:
    """The judge's user message: the prompt and one response (pointwise) or two (pairwise).
    Slots are filled in one pass, so a response that happens to contain ``{answer_b}`` is not
    filled again."""
    if len(answers) not in (1, 2):
        raise ValueError(
            f"render takes one answer (pointwise) or two (pairwise), got {len(answers)}"
        )
    slots = POINTWISE_SLOTS if len(answers) == 1 else SLOTS
    values = dict(zip(slots, (question, *answers)))
    return re.sub("|".join(re.escape(s) for s in slots), lambda m: values[m.group(0)], template)


def unrender(template: str, message: str, slots: tuple[str, ...] = SLOTS) -> dict[str, str] | None:
    """Inverse of :func:`render`: ``{"question", "answer_a", "answer_b"}`` (or, with
    ``POINTWISE_SLOTS``, ``{"question", "answer"}``) read back from a message (question "" when
    the template has none), or None when the message does not fit."""
    pattern = re.escape(template)
    for slot in slots:
        pattern = pattern.replace(re.escape(slot), f"(?P<{slot[1:-1]}>.*)")
    match = re.fullmatch(pattern, message, flags=re.DOTALL)
    if match is None:
        return None
    return {"question": "", **match.groupdict()}
