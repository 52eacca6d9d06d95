"""Preference data: load, unpair, subsample, tokenise, (re-pair,) collate.

ELBO-KTO learns from unpaired binary feedback: one prompt, one response, a desirable/undesirable
label. The pipeline of :func:`build_dataset`:

1. :func:`load_source`: a hub name, local JSON / JSONL / Parquet files (or a folder of them), or a
   ``datasets.Dataset``.
2. :func:`unpair`: the layout is detected from the columns (:func:`detect_layout`) and every row
   becomes canonical unpaired rows ``prompt`` (chat messages), ``completion`` (str), ``label``
   (bool), ``uid`` (int64), ``pair_uid`` (int64). A paired row gives one desirable and one
   undesirable row sharing a ``pair_uid``.
3. :func:`subsample_classes`: keep fractions of each class (the paper's imbalance study).
4. :func:`tokenize_dataset`: chat-template prompt tokens + response tokens (+ end-of-turn token),
   cut to ``max_length``.
5. Paired losses only (ELBO-DPO): :func:`pair_rows` puts the two token rows of each pair back
   together, so that a batch holds whole pairs.

:class:`PreferenceCollator` pads rows (or pairs) into the batch dict that
:class:`elbokto.ELBOKTOObjective` takes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from elbokto.requires import require

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict

logger = logging.getLogger(__name__)

LAYOUTS = {
    "unpaired": ("prompt", "completion", "label"),
    "paired": ("chosen", "rejected"),
}
_LAYOUT_HELP = (
    "unpaired: prompt, completion, label (TRL's KTO layout, e.g. "
    "trl-lib/kto-mix-14k); paired: chosen, rejected, with a prompt column unless "
    "chosen/rejected are message lists that start with the prompt turns (e.g. "
    "HuggingFaceH4/ultrafeedback_binarized)"
)
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _datasets():
    """The ``datasets`` package (imported on first use, so that ``import elbokto`` needs none)."""
    return require("datasets", "elbokto's data loading")


@functools.cache
def features() -> dict[str, Any]:
    """The schemas of the three tables, as ``datasets.Features``: "canonical" (one example a row:
    prompt messages, completion, label, uid, pair_uid), "token" (its tokens and lengths) and "pair"
    (a chosen and a rejected token row)."""
    datasets = _datasets()
    Features, List, Value = datasets.Features, datasets.List, datasets.Value
    messages = List({"role": Value("string"), "content": Value("string")})
    token = Features(
        {
            "input_ids": List(Value("int32")),
            "prompt_length": Value("int64"),
            "response_length": Value("int64"),
            "desirable": Value("bool"),
            "uid": Value("int64"),
            "pair_uid": Value("int64"),
            "length": Value("int64"),
        }
    )
    token_row = {k: v for k, v in token.items() if k not in ("desirable", "pair_uid")}
    return {
        "canonical": Features(
            {
                "prompt": messages,
                "completion": Value("string"),
                "label": Value("bool"),
                "uid": Value("int64"),
                "pair_uid": Value("int64"),
            }
        ),
        "token": token,
        "pair": Features(
            {
                "chosen": token_row,
                "rejected": token_row,
                "pair_uid": Value("int64"),
                "length": Value("int64"),
            }
        ),
    }


# Per-row outcome of tokenize_dataset; counted after the map so that the counts also hold when
# datasets serves the map from its cache (a counter inside the mapped function would stay at 0).
_KEPT, _TRUNCATED, _LONG_PROMPT, _EMPTY = 0, 1, 2, 3


@dataclass
class DataConfig:
    """Where the preference data comes from and how it becomes token rows (CLI flags)."""

    dataset: str = field(
        metadata={
            "help": "Hub dataset name (e.g. trl-lib/kto-mix-14k), or a "
            "local .json/.jsonl/.parquet file or folder of them."
        }
    )
    dataset_split: str = field(
        default="train",
        metadata={"help": "Split of a hub dataset (e.g. train_prefs); local files are one split."},
    )
    eval_dataset: str | None = field(
        default=None,
        metadata={
            "help": "Held-out preference data for the objective's metrics during training (hub "
            "name or local files); default: --dataset when --eval_split is given."
        },
    )
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Split of the evaluation data (e.g. test_prefs); default: --dataset_split."
        },
    )
    max_length: int = field(
        default=1024,
        metadata={
            "help": "Most tokens per example: responses are cut to fit, examples whose prompt "
            "leaves no room for a response token are dropped."
        },
    )
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Drop examples whose prompt has more tokens than this."}
    )
    append_eos: bool = field(
        default=True, metadata={"help": "Append an end-of-turn token after each response."}
    )
    end_of_turn_token_id: int | None = field(
        default=None,
        metadata={
            "help": "The token appended with append_eos; default: the tokenizer's eos_token_id."
        },
    )
    desirable_fraction: float = field(
        default=1.0,
        metadata={
            "help": "Fraction of desirable examples kept (seeded), for class-imbalance studies."
        },
    )
    undesirable_fraction: float = field(
        default=1.0, metadata={"help": "Fraction of undesirable examples kept (seeded)."}
    )
    shuffle_seed: int = field(
        default=0,
        metadata={"help": "Seed of the shuffle after unpairing and of the class subsampling."},
    )
    pad_to_multiple_of: int | None = field(
        default=None,
        metadata={"help": "Round each batch's padded length up to a multiple of this."},
    )
    llada_padding: bool = field(
        default=False,
        metadata={"help": "LLaDA's convention: pad with EOS and pass no attention mask."},
    )
    uid_source: Literal["content", "row"] = field(
        default="content",
        metadata={
            "help": "What an example's uid (the key of its Monte-Carlo draws and of a precomputed "
            "reference) is: 'content', a digest of prompt, completion and label (identical "
            "examples share their draws); 'row', its row number in the source split, from "
            "0, before any drop, subsampling or shuffle: the index the ELBO-KTO authors' "
            "precompute_bref.py seeds it by (--draw_source authors). Unpaired sources only."
        },
    )
    joined_tokenization: bool = field(
        default=False,
        metadata={
            "help": "Tokenise the templated prompt and the completion as one text, the response "
            "starting at the length of the prompt tokenised alone (the authors' "
            "data_utils.py). Default: apart, so that the prompt tokens are exactly the "
            "templated prompt's and a response token never straddles the boundary."
        },
    )

    def __post_init__(self) -> None:
        _check_lengths(self.max_length, self.max_prompt_length)
        if self.uid_source not in ("content", "row"):
            raise ValueError(f"uid_source={self.uid_source!r}; expected 'content' or 'row'")
        _check_fractions(self.desirable_fraction, self.undesirable_fraction)
        _check_multiple(self.pad_to_multiple_of)

    def end_of_turn(self, tokenizer) -> int | None:
        """The token id appended after responses, or None when ``append_eos`` is off."""
        if not self.append_eos:
            return None
        if self.end_of_turn_token_id is None:
            return tokenizer.eos_token_id
        return self.end_of_turn_token_id


@dataclass
class DataStats:
    """What :func:`build_dataset` kept and dropped (counts of rows).

    source_rows: rows in the source; unpaired_rows: after unpairing (2x for paired layouts);
    n_desirable, n_undesirable: in the returned dataset; dropped_long_prompt: prompt longer than
    max_prompt_length or leaving no room for one response token in max_length;
    dropped_empty_response: zero response tokens; truncated_responses: kept, cut to max_length.
    Paired losses: n_pairs kept; dropped_pairs: pairs that lost a response to the length policy
    or repeat an earlier identical pair.
    """

    layout: str = ""
    source_rows: int = 0
    unpaired_rows: int = 0
    n_desirable: int = 0
    n_undesirable: int = 0
    dropped_long_prompt: int = 0
    dropped_empty_response: int = 0
    truncated_responses: int = 0
    n_pairs: int = 0
    dropped_pairs: int = 0


def build_dataset(
    config: DataConfig, tokenizer, source: Dataset | None = None, *, paired: bool = False
) -> tuple[Dataset, DataStats]:
    """Load, unpair, subsample and tokenise: the front door of the data pipeline.

    Args:
        config: see :class:`DataConfig`.
        tokenizer: a transformers tokenizer with a chat template.
        source: a ``datasets.Dataset`` used instead of ``config.dataset``.
        paired: for a paired loss (ELBO-DPO): the source must have a paired layout, and the
            result holds pairs (:func:`pair_rows`) instead of unpaired rows.

    Returns:
        The token rows of :func:`tokenize_dataset` (or pairs) and the counts. Drops are logged as
        a warning. Pass the class counts to :func:`check_class_balance` with the loss weights.
    """
    eot = config.end_of_turn(tokenizer)
    if eot is not None and not 0 <= eot < len(tokenizer):
        raise ValueError(
            f"--end_of_turn_token_id {eot} is outside the tokenizer's vocabulary "
            f"[0, {len(tokenizer)})"
        )
    raw = load_source(config.dataset if source is None else source, config.dataset_split)
    if len(raw) == 0:
        raise ValueError(f"--dataset {config.dataset}: no rows")
    layout = detect_layout(raw.column_names)
    if paired and layout != "paired":
        raise ValueError(
            f"{config.dataset}: a paired loss (loss_type elbo_dpo) compares a chosen "
            f"and a rejected response to the same prompt, but this dataset has the "
            f"{layout} layout {LAYOUTS[layout]}: train it with loss_type elbo_kto"
        )
    if paired and (config.desirable_fraction, config.undesirable_fraction) != (1.0, 1.0):
        raise ValueError(
            "desirable_fraction / undesirable_fraction subsample one class of "
            "unpaired data; with pairs both responses are kept or neither"
        )
    rows = unpair(raw, seed=config.shuffle_seed, row_uids=config.uid_source == "row")
    kept = subsample_classes(
        rows, config.desirable_fraction, config.undesirable_fraction, seed=config.shuffle_seed
    )
    data, stats = tokenize_dataset(
        kept,
        tokenizer,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        end_of_turn_token_id=eot,
        joined=config.joined_tokenization,
    )
    stats.layout, stats.source_rows, stats.unpaired_rows = layout, len(raw), len(rows)
    if paired:
        data = pair_rows(data)
        stats.n_pairs = len(data)
        stats.dropped_pairs = len(raw) - len(data)
        if stats.dropped_pairs:
            logger.warning(
                "dropped %d of %d pairs (a response dropped by the length policy, or "
                "a repeated identical pair)",
                stats.dropped_pairs,
                len(raw),
            )
    if len(data) == 0:
        raise ValueError(f"no examples left: {stats}")
    return data, stats


def load_source(source: str | os.PathLike | Dataset | DatasetDict, split: str = "train") -> Dataset:
    """A ``Dataset`` from a hub name, a local file or folder, or a (dict of) dataset(s).

    Local ``.json`` (records or JSON lines), ``.jsonl`` and ``.parquet`` files load as one
    split; a folder loads all such files under it (one format). A string that names no local
    path is a hub dataset, unless it reads as a path (a known extension, a leading ``.``, ``/``
    or ``~``, or more than one ``/``): then it is a missing file.
    """
    datasets = _datasets()
    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return source[split]
    path = Path(source).expanduser()
    if path.exists():
        files = [path]
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in _FILE_BUILDERS)
        if not files:
            raise FileNotFoundError(f"no {'/'.join(_FILE_BUILDERS)} files under {path}")
        builders = {_FILE_BUILDERS.get(p.suffix) for p in files}
        if len(builders) > 1 or None in builders:
            raise ValueError(
                f"{path}: expected .json/.jsonl files or .parquet files, got "
                f"{sorted({p.suffix for p in files})}"
            )
        empty = [str(p) for p in files if p.stat().st_size == 0]
        if empty:
            raise ValueError(f"{', '.join(empty)}: empty file")
        builder = builders.pop()
        try:
            return datasets.load_dataset(builder, data_files=[str(p) for p in files], split="train")
        except Exception as err:  # datasets wraps the parser's error: report the root cause
            cause: BaseException = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ValueError(
                f"{path}: not readable as {builder} preference rows "
                f"({type(cause).__name__}: {cause})"
            ) from err
    text = str(source)
    if path.suffix in _FILE_BUILDERS or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"{text}: no such file or folder")
    return datasets.load_dataset(text, split=split)


def detect_layout(columns: Sequence[str]) -> str:
    """``"unpaired"`` or ``"paired"`` from the column names; ValueError for anything else."""
    for layout, needed in LAYOUTS.items():
        if set(needed) <= set(columns):
            return layout
    raise ValueError(
        f"unknown preference layout: columns {sorted(columns)}; accepted layouts: {_LAYOUT_HELP}"
    )


def unpair(dataset: Dataset, seed: int = 0, row_uids: bool = False) -> Dataset:
    """Canonical unpaired rows of ``features()["canonical"]``: prompt, completion, label, uid.

    A plain-string prompt becomes one user turn. A response (completion, chosen, rejected) that is
    a message list ends with the assistant turn that is the completion; when it starts with a
    non-assistant turn it carries its own prompt (every turn before the last) and the prompt column
    is ignored, else its leading turns continue the prompt column's conversation. Paired rows give
    a desirable and an undesirable row, shuffled with ``seed`` so that siblings are not adjacent;
    both carry the same ``pair_uid`` (a digest of their two uids). An unpaired row's ``pair_uid``
    is its ``uid``.

    The uid is the digest :func:`example_uid` of the example's content, or with ``row_uids`` its
    row number in ``dataset`` (unpaired layouts only), as the ELBO-KTO authors number the rows
    that seed their draws (:mod:`elbokto.draws`, ``draw_source="authors"``).
    """
    layout = detect_layout(dataset.column_names)
    paired = layout == "paired"
    if paired and row_uids:
        raise ValueError(
            "uid_source='row' numbers the rows of an unpaired source, as the "
            "authors' precompute_bref.py does; a paired source has two examples a "
            "row: use uid_source='content'"
        )
    rows = dataset.map(
        _unpair_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"paired": paired, "row_uids": row_uids},
        remove_columns=dataset.column_names,
        features=features()["canonical"],
        desc=f"unpairing ({layout})",
    )
    if not row_uids:
        _warn_duplicates(rows["uid"], per_source_row=2 if paired else 1)
    return rows.shuffle(seed=seed) if paired else rows


def _warn_duplicates(uids: Sequence[int], per_source_row: int) -> None:
    """Warns about identical examples, naming their source rows (before any shuffle, canonical
    row i comes from source row i // per_source_row)."""
    first: dict[int, int] = {}
    repeats = []
    for i, uid in enumerate(uids):
        if uid in first:
            repeats.append(f"row {i // per_source_row} repeats row {first[uid] // per_source_row}")
        else:
            first[uid] = i
    if repeats:
        logger.warning(
            "%d duplicate examples (identical prompt, response and label): %s%s; each "
            "copy counts in the loss, with the same Monte-Carlo draws",
            len(repeats),
            ", ".join(repeats[:5]),
            " ..." if len(repeats) > 5 else "",
        )


def _unpair_batch(
    batch: dict[str, list], indices: list[int], paired: bool, row_uids: bool
) -> dict[str, list]:
    out: dict[str, list] = {"prompt": [], "completion": [], "label": []}
    prompts = batch.get("prompt", [None] * len(indices))
    responses = [("chosen", True), ("rejected", False)] if paired else [("completion", None)]
    for i, row in enumerate(indices):
        for column, label in responses:
            prompt, completion = _split_response(prompts[i], batch[column][i], column, row)
            out["prompt"].append(prompt)
            out["completion"].append(completion)
            out["label"].append(_label(batch["label"][i], row) if label is None else label)
    out["uid"] = (
        list(indices)
        if row_uids
        else [
            example_uid(*example) for example in zip(out["prompt"], out["completion"], out["label"])
        ]
    )
    out["pair_uid"] = out["uid"]
    if paired:  # both rows of a source pair (chosen at 2i, rejected at 2i + 1) share a key
        keys = [_content_uid(out["uid"][i : i + 2]) for i in range(0, len(out["uid"]), 2)]
        out["pair_uid"] = [key for key in keys for _ in range(2)]
    return out


def _split_response(prompt: Any, response: Any, column: str, row: int) -> tuple[list, str]:
    """(prompt messages, completion text) of one response cell."""
    if isinstance(response, str):
        return _prompt_messages(prompt, row), response
    messages = _messages(response, column, row)
    if not messages or messages[-1]["role"] != "assistant":
        raise ValueError(
            f"row {row}, column {column!r}: a response message list must end with an "
            f"assistant turn, got {response!r:.200}"
        )
    before, completion = messages[:-1], messages[-1]["content"]
    if before and before[0]["role"] != "assistant":
        return before, completion
    return _prompt_messages(prompt, row) + before, completion


def _label(value: Any, row: int) -> bool:
    # 0/1 integers are accepted; None or a string would otherwise pass bool() silently.
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"row {row}, column 'label': expected a bool, got {value!r}")


def _prompt_messages(prompt: Any, row: int) -> list[dict[str, str]]:
    if prompt is None:
        raise ValueError(
            f"row {row}: no prompt: add a prompt column, or make the responses "
            "message lists that start with the prompt turns"
        )
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return _messages(prompt, "prompt", row)


def _messages(value: Any, column: str, row: int) -> list[dict[str, str]]:
    if isinstance(value, list) and all(
        isinstance(m, Mapping)
        and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str)
        for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError(
        f"row {row}, column {column!r}: expected a string or a list of "
        f"{{'role': str, 'content': str}} messages, got {value!r:.200}"
    )


def example_uid(prompt: list[dict[str, str]], completion: str, label: bool) -> int:
    """Stable 63-bit id of an example's content, in [0, 2^63) so that it fits int64.

    A blake2b digest of (prompt roles and contents, completion, label): the same in every process
    and run, unlike ``hash()``. Identical examples share a uid, hence their MC draws.
    """
    return _content_uid([[[m["role"], m["content"]] for m in prompt], completion, bool(label)])


def _content_uid(content: list) -> int:
    """63-bit blake2b digest of JSON-able content."""
    text = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def subsample_classes(
    dataset: Dataset,
    desirable_fraction: float = 1.0,
    undesirable_fraction: float = 1.0,
    seed: int = 0,
) -> Dataset:
    """Keep round(fraction * count) rows of each class, chosen at random with ``seed``.

    The class is the ``label`` column (canonical rows) or ``desirable`` (token rows). Kept rows
    stay in their order; with one seed a smaller fraction keeps a subset of a larger one.
    """
    _check_fractions(desirable_fraction, undesirable_fraction)
    if desirable_fraction == undesirable_fraction == 1.0:
        return dataset
    labels = np.array(
        list(dataset["label" if "label" in dataset.column_names else "desirable"]), dtype=bool
    )
    rng = np.random.default_rng(seed)
    keep = []
    for cls, fraction in ((True, desirable_fraction), (False, undesirable_fraction)):
        rows = np.flatnonzero(labels == cls)
        keep.append(rng.permutation(rows)[: round(fraction * len(rows))])
    return dataset.select(np.sort(np.concatenate(keep)))


def check_class_balance(
    n_desirable: int, n_undesirable: int, lambda_d: float = 1.0, lambda_u: float = 1.0
) -> float:
    """The weighted class ratio lambda_D * n_D / (lambda_U * n_U); warns outside [1, 4/3].

    KTO recommends weighting the classes so that this ratio lies in [1, 4/3]. The warning gives
    the numbers and the lambda_d range that would fit. ``inf`` when there is no undesirable row.
    """
    if n_desirable < 0 or n_undesirable < 0 or n_desirable + n_undesirable == 0:
        raise ValueError(
            f"class counts must be >= 0 and not both 0, got n_desirable="
            f"{n_desirable}, n_undesirable={n_undesirable}"
        )
    if lambda_d <= 0 or lambda_u <= 0:
        raise ValueError(f"lambda_d and lambda_u must be > 0, got {lambda_d}, {lambda_u}")
    ratio = math.inf
    if n_undesirable:
        ratio = lambda_d * n_desirable / (lambda_u * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        advice = ""
        if n_desirable and n_undesirable:
            low = lambda_u * n_undesirable / n_desirable
            advice = f"; lambda_d in [{low:.4g}, {low * 4 / 3:.4g}] would fit"
        warnings.warn(
            f"class balance lambda_D*n_D / (lambda_U*n_U) = {lambda_d}*{n_desirable} / "
            f"({lambda_u}*{n_undesirable}) = {ratio:.4g} is outside KTO's recommended "
            f"[1, 4/3]{advice}",
            stacklevel=2,
        )
    return ratio


def tokenize_dataset(
    dataset: Dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = None,
    end_of_turn_token_id: int | None | Literal["eos"] = "eos",
    joined: bool = False,
) -> tuple[Dataset, DataStats]:
    """Token rows from canonical rows (see :func:`unpair`).

    Prompt tokens: the chat template with ``add_generation_prompt=True``, tokenised without added
    special tokens (the template writes its own). Response tokens: the completion tokenised on its
    own, without special tokens, then ``end_of_turn_token_id`` ("eos": the tokenizer's; None:
    nothing). So ``input_ids[:prompt_length]`` is exactly the templated prompt.

    ``joined`` (the ELBO-KTO authors' data_utils.py): the templated prompt and the completion are
    tokenised as one text, and prompt_length is the token count of the templated prompt alone.
    The tokens differ from the default only where the completion's first characters merge with
    the template's last token; the response window then starts at that count all the same.

    Length policy: a prompt longer than ``max_prompt_length``, or one that leaves no room for one
    response token within ``max_length``, drops the example (a cut prompt would lose the context
    the label was given for); a response that does not fit is cut at ``max_length`` (losing its
    end-of-turn token, since it did not end there); an empty response drops the example.

    Returns:
        Rows of ``features()["token"]``: input_ids list[int32], prompt_length int64,
        response_length int64 (>= 1, incl. the end-of-turn token), desirable bool, uid int64,
        length int64 (total, for transformers' ``group_by_length`` with
        ``length_column_name="length"``); and the drop/cut counts.
    """
    _check_lengths(max_length, max_prompt_length)
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat_template: set one (prompts are "
            "rendered with it)"
        )
    eot = tokenizer.eos_token_id if end_of_turn_token_id == "eos" else end_of_turn_token_id
    if end_of_turn_token_id == "eos" and eot is None:
        raise ValueError(
            "the tokenizer has no eos_token_id: pass end_of_turn_token_id (None appends nothing)"
        )
    if len(dataset) == 0:  # map would not run, and the output would lack the columns
        token = features()["token"]
        empty = _datasets().Dataset.from_dict({k: [] for k in token}, features=token)
        return empty, DataStats()
    limits = {
        "max_length": max_length,
        "max_prompt_length": max_prompt_length,
        "eot": eot,
        "joined": joined,
    }
    tokens = dataset.map(
        _tokenize_batch,
        batched=True,
        fn_kwargs={"tokenizer": tokenizer, **limits},
        remove_columns=dataset.column_names,
        features=_datasets().Features({**features()["token"], "status": _datasets().Value("int8")}),
        desc="tokenising",
    )
    counts = Counter(tokens["status"])
    kept = tokens.filter(
        lambda status: [s <= _TRUNCATED for s in status], batched=True, input_columns="status"
    ).remove_columns("status")
    n_desirable = sum(kept["desirable"])
    stats = DataStats(
        n_desirable=n_desirable,
        n_undesirable=len(kept) - n_desirable,
        dropped_long_prompt=counts[_LONG_PROMPT],
        dropped_empty_response=counts[_EMPTY],
        truncated_responses=counts[_TRUNCATED],
    )
    if stats.dropped_long_prompt or stats.dropped_empty_response:
        logger.warning(
            "dropped %d of %d examples: %d with a prompt over max_prompt_length=%s or "
            "leaving no response token within max_length=%s, %d with an empty response",
            len(tokens) - len(kept),
            len(tokens),
            stats.dropped_long_prompt,
            max_prompt_length,
            max_length,
            stats.dropped_empty_response,
        )
    if stats.truncated_responses:
        logger.info("cut %d responses to max_length=%s", stats.truncated_responses, max_length)
    return kept, stats


def pair_rows(rows: Dataset) -> Dataset:
    """Pairs of ``features()["pair"]`` from token rows: the desirable (chosen) and undesirable
    (rejected) rows that share a ``pair_uid``, in the order the pairs first appear.

    A pair missing one of its rows (dropped by the length policy) is dropped; a pair_uid seen
    again (an identical source pair) keeps its first pair. ``length`` is the pair's total token
    count, for ``group_by_length``.
    """
    slots: dict[int, dict[str, dict]] = {}
    for row in rows:
        slot = slots.setdefault(row["pair_uid"], {})
        side = "chosen" if row["desirable"] else "rejected"
        slot.setdefault(side, {k: row[k] for k in features()["pair"]["chosen"]})
    pairs = [
        {
            "chosen": slot["chosen"],
            "rejected": slot["rejected"],
            "pair_uid": key,
            "length": slot["chosen"]["length"] + slot["rejected"]["length"],
        }
        for key, slot in slots.items()
        if len(slot) == 2
    ]
    return _datasets().Dataset.from_list(pairs, features=features()["pair"])


def dataset_uids(dataset: Dataset) -> Tensor:
    """int64 [N]: the uid of every example of token rows, or of both rows of every pair."""
    if "chosen" in dataset.column_names:
        return torch.tensor(
            [p[side]["uid"] for p in dataset for side in ("chosen", "rejected")], dtype=torch.long
        )
    return torch.tensor(dataset["uid"], dtype=torch.long)


def prompt_token_ids(tokenizer, prompts: list[list[dict[str, str]]]) -> list[list[int]]:
    """Token ids of chat prompts: the chat template with the generation prompt, as training and
    sampling both see them (the template text carries any BOS; no special tokens are added)."""
    texts = tokenizer.apply_chat_template(prompts, tokenize=False, add_generation_prompt=True)
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _tokenize_batch(
    batch: dict[str, list],
    tokenizer,
    max_length: int | None,
    max_prompt_length: int | None,
    eot: int | None,
    joined: bool,
) -> dict[str, list]:
    prompts = prompt_token_ids(tokenizer, batch["prompt"])
    if joined:
        texts = tokenizer.apply_chat_template(
            batch["prompt"], tokenize=False, add_generation_prompt=True
        )
        whole = tokenizer(
            [t + c for t, c in zip(texts, batch["completion"])], add_special_tokens=False
        )["input_ids"]
        responses = [w[len(p) :] for w, p in zip(whole, prompts)]
        prompts = [w[: len(p)] for w, p in zip(whole, prompts)]
    else:
        responses = tokenizer(batch["completion"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {k: [] for k in (*features()["token"], "status")}
    for prompt, response, label, uid, pair_uid in zip(
        prompts, responses, batch["label"], batch["uid"], batch["pair_uid"]
    ):
        response = response + ([] if eot is None else [eot])
        room = math.inf if max_length is None else max_length - len(prompt)
        status = _KEPT
        if room < 1 or (max_prompt_length is not None and len(prompt) > max_prompt_length):
            status = _LONG_PROMPT
        elif not response:
            status = _EMPTY
        elif len(response) > room:
            status, response = _TRUNCATED, response[:room]
        out["input_ids"].append(prompt + response)
        out["prompt_length"].append(len(prompt))
        out["response_length"].append(len(response))
        out["desirable"].append(label)
        out["uid"].append(uid)
        out["pair_uid"].append(pair_uid)
        out["length"].append(len(prompt) + len(response))
        out["status"].append(status)
    return out


class PreferenceCollator:
    """Pads token rows, or pairs of them, into the batch dict of :class:`elbokto.ELBOKTOObjective`.

    Dynamic right padding to the batch's longest row, rounded up to ``pad_to_multiple_of``.
    Returns ``input_ids`` int64 [B, T], ``attention_mask`` int64 [B, T] (1 = real token),
    ``prompt_lengths`` int64 [B], ``response_lengths`` int64 [B], ``desirable`` bool [B],
    ``uid`` int64 [B]. Pairs (:func:`pair_rows`) become consecutive rows, chosen then rejected,
    B = 2 * pairs, with ``pair_uid`` int64 [B] so that both rows of a pair share their draws.

    ``llada_padding=True`` follows LLaDA: pass the EOS id as ``pad_token_id``; no attention_mask
    key, so the model attends to the padding EOS tokens (never masked: they are not part of the
    response). An example's ELBO then depends on how far its batch was padded; keep the attention
    mask for values that must not (e.g. a precomputed reference).
    """

    def __init__(
        self, pad_token_id: int, pad_to_multiple_of: int | None = None, llada_padding: bool = False
    ) -> None:
        _check_multiple(pad_to_multiple_of)
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.llada_padding = llada_padding

    @classmethod
    def from_config(cls, config: DataConfig, tokenizer) -> PreferenceCollator:
        """Pads with the tokenizer's pad token, or its EOS with ``config.llada_padding``."""
        pad = tokenizer.eos_token_id if config.llada_padding else tokenizer.pad_token_id
        if pad is None:
            raise ValueError(
                f"the tokenizer has no {'eos' if config.llada_padding else 'pad'} token to pad with"
            )
        return cls(pad, config.pad_to_multiple_of, config.llada_padding)

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of examples")
        paired = "chosen" in features[0]
        if paired:
            features = [
                {**pair[side], "desirable": side == "chosen", "pair_uid": pair["pair_uid"]}
                for pair in features
                for side in ("chosen", "rejected")
            ]
        prompt = torch.tensor([int(f["prompt_length"]) for f in features], dtype=torch.long)
        response = torch.tensor([int(f["response_length"]) for f in features], dtype=torch.long)
        rows = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        if not torch.equal(lengths, prompt + response):
            bad = int((lengths != prompt + response).nonzero()[0, 0])
            raise ValueError(
                f"example {bad}: {int(lengths[bad])} input_ids but prompt_length "
                f"{int(prompt[bad])} + response_length {int(response[bad])}"
            )
        width = int(lengths.max())
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, : len(row)] = row
        batch = {
            "input_ids": input_ids,
            "prompt_lengths": prompt,
            "response_lengths": response,
            "desirable": torch.tensor([bool(f["desirable"]) for f in features]),
            "uid": torch.tensor([int(f["uid"]) for f in features], dtype=torch.long),
        }
        if paired:
            batch["pair_uid"] = torch.tensor(
                [int(f["pair_uid"]) for f in features], dtype=torch.long
            )
        if not self.llada_padding:
            batch["attention_mask"] = (torch.arange(width) < lengths[:, None]).long()
        return batch


def _check_lengths(max_length: int | None, max_prompt_length: int | None) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be a positive int or None, got {value}")


def _check_fractions(*fractions: float) -> None:
    if not all(0.0 <= f <= 1.0 for f in fractions):
        raise ValueError(f"class fractions must lie in [0, 1], got {fractions}")


def _check_multiple(pad_to_multiple_of: int | None) -> None:
    if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
        raise ValueError(
            f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of}"
        )
