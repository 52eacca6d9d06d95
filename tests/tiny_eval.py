"""A tiny masked diffusion LM saved to a folder (random weights, offline tokenizer), for the
evaluation tests: what `pretrained=<folder>` and `--candidate <folder>` load."""

from __future__ import annotations

from pathlib import Path

from elbokto.models import build_tiny_model
from elbokto.tiny import build_tiny_tokenizer

TEXTS = [
    "What color is the sky? blue green red",
    "How many legs has a cat? two four",
    "Which is a fruit? apple stone chair",
    "Reverse abc: cba. Reverse hello: olleh.",
    "Question: Answer: reverse the string",
    "the quick brown fox jumps over the lazy dog",
]


def save_tiny_model(folder: Path, seed: int = 0, mask: bool = True) -> Path:
    """Tokenizer + bidirectional Gemma saved with save_pretrained; ``mask=False``: neither the
    config nor the tokenizer has a mask token."""
    tokenizer = build_tiny_tokenizer(TEXTS, vocab_size=320)
    model = build_tiny_model(
        len(tokenizer), tokenizer.mask_token_id, hidden_size=32, num_layers=1, seed=seed
    )
    if not mask:
        model.config.mask_token_id = None
        tokenizer.mask_token = None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
