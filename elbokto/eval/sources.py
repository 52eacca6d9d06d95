"""Prompts and responses for a pairwise evaluation.

Prompts come from a JSONL file of ``{"prompt": ...}`` lines (a string: one user turn; or a list of
chat messages), or from a preference dataset read as training reads it (:func:`load_source` then
:func:`unpair`: the prompts of its rows, each once, in order). A prompt's *text* (what the judge
sees and what responses are matched by) is the user message of a single-turn prompt, or the turns
as ``role: content`` paragraphs.

A response source is a JSONL file of ``{"prompt": ..., "response": ...}`` lines (what
``elbokto generate`` prints), or a model (hub name or folder): its responses are sampled through
the model's chat template with :func:`elbokto.generate` (:func:`elbokto.block_generate` for a
block-diffusion model) and appended to
``<output_dir>/responses_<name>.jsonl`` batch by batch, each line tagged with a fingerprint of the
model and the sampler settings, so that a repeated or interrupted run samples only what is missing.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from elbokto.block_sampling import sampler_for
from elbokto.data import load_source, prompt_token_ids, unpair
from elbokto.durable import append_lines
from elbokto.models import ModelConfig, load_model, load_tokenizer, uses_shifted_logits
from elbokto.sampling import SamplingConfig, decode_responses

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prompt:
    """``text``: the prompt as the judge and the matching see it; ``messages``: the chat turns a
    model is prompted with."""

    text: str
    messages: tuple[tuple[str, str], ...]

    @classmethod
    def from_value(cls, value, where: str) -> Prompt:
        if isinstance(value, str):
            return cls(value, (("user", value),))
        if (
            isinstance(value, list)
            and value
            and all(
                isinstance(m, dict)
                and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str)
                for m in value
            )
        ):
            turns = tuple((m["role"], m["content"]) for m in value)
            text = turns[0][1] if len(turns) == 1 else "\n\n".join(f"{r}: {c}" for r, c in turns)
            return cls(text, turns)
        raise ValueError(
            f"{where}: expected a prompt string or a list of {{'role', 'content'}} "
            f"messages, got {value!r:.100}"
        )

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]


def load_prompts(
    prompts_file: str | None = None,
    dataset: str | None = None,
    dataset_split: str = "test",
    max_samples: int | None = None,
) -> list[Prompt]:
    """The evaluation prompts, each text once, in file or dataset order, at most ``max_samples``."""
    if (prompts_file is None) == (dataset is None):
        raise ValueError(
            "pass exactly one prompt source: --prompts (a JSONL file of "
            '{"prompt": ...} lines) or --dataset (with --dataset_split)'
        )
    if prompts_file is not None:
        values = [
            (row["prompt"], f"{prompts_file}:{n}")
            for n, row in _read_jsonl(prompts_file, ("prompt",))
        ]
    else:
        rows = unpair(load_source(dataset, dataset_split))
        values = [
            (row, f"{dataset}[{dataset_split}] row {i}") for i, row in enumerate(rows["prompt"])
        ]
    prompts, seen = [], set()
    for value, where in values:
        prompt = Prompt.from_value(value, where)
        if prompt.text not in seen:
            seen.add(prompt.text)
            prompts.append(prompt)
    if max_samples is not None:
        prompts = prompts[:max_samples]
    if not prompts:
        raise ValueError(f"no prompts in {prompts_file or dataset}")
    return prompts


def read_responses(path: str | Path) -> dict[str, str]:
    """prompt text -> response of a ``{"prompt", "response"}`` JSONL file; ValueError when one
    prompt has two different responses."""
    responses: dict[str, str] = {}
    for n, row in _read_jsonl(path, ("prompt", "response")):
        text = Prompt.from_value(row["prompt"], f"{path}:{n}").text
        if not isinstance(row["response"], str):
            raise ValueError(
                f"{path}:{n}: response is {type(row['response']).__name__}; expected a string"
            )
        if responses.get(text, row["response"]) != row["response"]:
            raise ValueError(f"{path}:{n}: a second, different response to prompt {text!r:.80}")
        responses[text] = row["response"]
    return responses


def match_responses(prompts: list[Prompt], responses: dict[str, str], source: str) -> list[str]:
    """The response to every prompt, in order; ValueError naming the first prompt without one
    (responses to other prompts are ignored)."""
    missing = [p.text for p in prompts if p.text not in responses]
    if missing:
        raise ValueError(
            f"{source}: {len(missing)} of {len(prompts)} prompts have no response "
            f"(first: {missing[0]!r:.80}); the file's prompts do not match the "
            f"prompt set"
        )
    return [responses[p.text] for p in prompts]


def source_name(source: str) -> str:
    """A file-name-safe name: a response file's stem, or the model path with ``/`` -> ``__``."""
    if is_response_file(source):
        return Path(source).stem
    return re.sub(r"[^A-Za-z0-9._-]+", "__", source.strip("/")) or "model"


def is_response_file(source: str) -> bool:
    return source.endswith(".jsonl")


def responses_from(
    source: str,
    prompts: list[Prompt],
    output_dir: str | Path,
    gen_cfg: SamplingConfig,
    model_cfg: ModelConfig,
    batch_size: int = 8,
    device: str | None = None,
) -> list[str]:
    """The responses of a source (a JSONL file or a model, see the module doc) to ``prompts``."""
    if is_response_file(source):
        if not Path(source).is_file():
            raise ValueError(f"response file {source} does not exist")
        return match_responses(prompts, read_responses(source), source)
    path = Path(output_dir) / f"responses_{source_name(source)}.jsonl"
    fingerprint = _fingerprint(source, gen_cfg)
    done = {}
    if path.exists():
        # A line cut by a killed append is sampled again.
        done = {
            row["prompt"]: row["response"]
            for _, row in _read_jsonl(path, ("prompt", "response"), skip_bad=True)
            if row.get("generation") == fingerprint
        }
    todo = [p for p in prompts if p.text not in done]
    if todo:
        logger.info(
            "%s: sampling %d responses (%d reused from %s)",
            source,
            len(todo),
            len(prompts) - len(todo),
            path,
        )
        _sample_into(
            path,
            source,
            todo,
            fingerprint,
            gen_cfg,
            replace(model_cfg, model_name_or_path=source),
            batch_size,
            device,
            done,
        )
    return [done[p.text] for p in prompts]


def _sample_into(
    path: Path,
    source: str,
    prompts: list[Prompt],
    fingerprint: str,
    gen_cfg: SamplingConfig,
    model_cfg: ModelConfig,
    batch_size: int,
    device: str | None,
    done: dict[str, str],
) -> None:
    """Samples ``prompts`` with the model ``source``; appends each batch to ``path`` and
    ``done``."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(source, model_cfg, tokenizer=tokenizer).eval().to(device)
    # A transformers config: its attributes depend on the model family, unknown to mypy.
    model_config: Any = model.config
    gen_cfg = replace(
        gen_cfg,
        mask_token_id=(
            gen_cfg.mask_token_id
            if gen_cfg.mask_token_id is not None
            else model_config.mask_token_id
        ),
        shift_logits=gen_cfg.shift_logits or uses_shifted_logits(model_config),
    )
    gen_cfg, sampler = sampler_for(model, gen_cfg)
    ids = prompt_token_ids(tokenizer, [p.chat() for p in prompts])
    # Similar lengths in one batch: less left padding to run through the model.
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        tokens = sampler(model, [ids[i] for i in batch], gen_cfg, pad_token_id=pad or 0)
        texts = decode_responses(tokenizer, tokens)
        append_lines(
            path,
            [
                json.dumps(
                    {"prompt": prompts[i].text, "response": text, "generation": fingerprint},
                    ensure_ascii=False,
                )
                for i, text in zip(batch, texts)
            ],
        )
        done.update((prompts[i].text, text) for i, text in zip(batch, texts))
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fingerprint(source: str, gen_cfg: SamplingConfig) -> str:
    blob = json.dumps([source, asdict(gen_cfg)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_jsonl(path: str | Path, required: tuple[str, ...], skip_bad: bool = False):
    """(line number, object) of every non-empty line; ValueError on a bad line, or with
    ``skip_bad`` a warning and the line left out."""
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"{path}:{n}: not JSON ({e.msg})"
        else:
            if isinstance(row, dict) and all(k in row for k in required):
                yield n, row
                continue
            problem = (
                f"{path}:{n}: expected an object with keys {list(required)}, got {line[:100]!r}"
            )
        if not skip_bad:
            raise ValueError(problem)
        logger.warning("%s: line skipped", problem)
