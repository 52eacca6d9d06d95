"""The pairwise judge template: one user message with three slots.

``{question}`` receives the prompt, ``{answer_a}`` and ``{answer_b}`` the two responses; nothing
else in the text is interpreted (literal braces are fine). The packaged default
(``elbokto/eval/templates/pairwise.txt``) is MT-Bench's pairwise prompt, which asks for a final
verdict ``[[A]]``, ``[[B]]`` or ``[[C]]`` (tie).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

SLOTS = ("{question}", "{answer_a}", "{answer_b}")
DEFAULT = "default"


def load_template(path: str | None = None) -> str:
    """The template text: the packaged default when ``path`` is None or ``"default"``, else the
    file; ValueError unless both response slots appear exactly once."""
    if path is None or path == DEFAULT:
        text = resources.files("elbokto.eval").joinpath("templates/pairwise.txt").read_text()
    else:
        if not Path(path).is_file():
            raise ValueError(f"judge template {path} does not exist")
        text = Path(path).read_text()
    check_template(text, path or DEFAULT)
    return text


def check_template(text: str, name: str = "template") -> None:
    counts = {slot: text.count(slot) for slot in SLOTS}
    if counts["{answer_a}"] != 1 or counts["{answer_b}"] != 1 or counts["{question}"] > 1:
        raise ValueError(f"judge template {name} has slots {counts}; expected {{answer_a}} and "
                         f"{{answer_b}} exactly once each and {{question}} at most once")


def render(template: str, question: str, answer_a: str, answer_b: str) -> str:
    """The judge's user message. Slots are filled in one pass, so a response that happens to
    contain ``{answer_b}`` is not filled again."""
    values = dict(zip(SLOTS, (question, answer_a, answer_b)))
    return re.sub("|".join(re.escape(s) for s in SLOTS), lambda m: values[m.group(0)], template)


def unrender(template: str, message: str) -> dict[str, str] | None:
    """Inverse of :func:`render`: ``{"question", "answer_a", "answer_b"}`` read back from a
    message (question "" when the template has none), or None when the message does not fit."""
    pattern = re.escape(template)
    for slot in SLOTS:
        pattern = pattern.replace(re.escape(slot), f"(?P<{slot[1:-1]}>.*)")
    match = re.fullmatch(pattern, message, flags=re.DOTALL)
    if match is None:
        return None
    return {"question": "", **match.groupdict()}
