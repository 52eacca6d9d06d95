"""Data pipeline: layouts, sources, tokenisation and length policy, uids, collator, balance."""

import json
import warnings

import datasets
import pytest
import torch
from datasets import Dataset
from transformers import HfArgumentParser

from elbokto.data import (
    DataConfig,
    PreferenceCollator,
    build_dataset,
    check_class_balance,
    dataset_uids,
    detect_layout,
    example_uid,
    load_source,
    subsample_classes,
    tokenize_dataset,
    unpair,
)
from elbokto.objective import BATCH_KEYS
from elbokto.tiny import CHAT_TEMPLATE, ROLE_TOKENS, build_tiny_tokenizer

USER = lambda text: {"role": "user", "content": text}  # noqa: E731
BOT = lambda text: {"role": "assistant", "content": text}  # noqa: E731

UNPAIRED = [
    {"prompt": "What is a cat?", "completion": "A small animal.", "label": True},
    {"prompt": "What is a dog?", "completion": "A kind of fish.", "label": False},
    {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
]
# trl-lib/kto-mix-14k: message lists, multi-turn prompts, the completion one assistant turn.
UNPAIRED_CHAT = [
    {
        "prompt": [USER("Hi"), BOT("Hello!"), USER("What is two plus two?")],
        "completion": [BOT("Four.")],
        "label": True,
    },
    {"prompt": [USER("Say a colour.")], "completion": [BOT("Seven.")], "label": False},
]
PAIRED = [
    {"prompt": "What is a cat?", "chosen": "A small animal.", "rejected": "A car."},
    {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "Say hello.", "chosen": "Hello!", "rejected": "No."},
]
PAIRED_CHAT = [
    {
        "prompt": [USER("Hi"), BOT("Hey"), USER("Name a colour.")],
        "chosen": [BOT("Blue.")],
        "rejected": [BOT("Seven.")],
    }
]
# HuggingFaceH4/ultrafeedback_binarized (train_prefs): the responses carry the prompt turns.
ULTRAFEEDBACK = [
    {
        "prompt": "What is a cat?",
        "prompt_id": "a1",
        "chosen": [
            {"role": "system", "content": "Be brief."},
            USER("What is a cat?"),
            BOT("A small animal."),
        ],
        "rejected": [
            {"role": "system", "content": "Be brief."},
            USER("What is a cat?"),
            BOT("A car."),
        ],
        "messages": [USER("What is a cat?"), BOT("A small animal.")],
        "score_chosen": 8.0,
        "score_rejected": 2.0,
    },
    {
        "prompt": "Name a colour.",
        "prompt_id": "b2",
        "chosen": [USER("Name a colour."), BOT("Blue.")],
        "rejected": [USER("Name a colour."), BOT("Seven.")],
        "messages": [USER("Name a colour."), BOT("Blue.")],
        "score_chosen": 9.0,
        "score_rejected": 1.0,
    },
]
TEXTS = [r["prompt"] + " " + r["completion"] for r in UNPAIRED] + [
    "Hello! Hi hey. Four. Seven. No. A car. Be brief.",
    "the quick brown fox jumps over the lazy dog " * 4,
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer(TEXTS)


@pytest.fixture(autouse=True)
def _local_datasets_cache(tmp_path, monkeypatch):
    # load_dataset writes Arrow caches: keep them out of the shared ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def write(rows, path, fmt):
    """Rows to ``path`` as json (a list of records), jsonl, parquet, or a folder of 2 jsonl."""
    if fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows))
    elif fmt == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    else:
        path.mkdir()
        for part, chunk in enumerate((rows[:1], rows[1:])):
            write(chunk, path / f"part{part}.jsonl", "jsonl")
    return path


def as_set(rows):
    return {(json.dumps(r["prompt"]), r["completion"], r["label"]) for r in rows}


@pytest.mark.parametrize("fmt", ["json", "jsonl", "parquet", "folder"])
def test_sources(tmp_path, fmt):
    suffix = "" if fmt == "folder" else "." + fmt
    data = load_source(str(write(UNPAIRED, tmp_path / f"data{suffix}", fmt)))
    assert sorted(data["completion"]) == sorted(r["completion"] for r in UNPAIRED)
    assert load_source(data) is data


def test_unpaired_layouts():
    rows = unpair(Dataset.from_list(UNPAIRED)).to_list()
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ([USER(r["prompt"])], r["completion"], r["label"]) for r in UNPAIRED
    ]
    chat = unpair(Dataset.from_list(UNPAIRED_CHAT)).to_list()
    assert chat[0]["prompt"] == UNPAIRED_CHAT[0]["prompt"] and chat[0]["completion"] == "Four."
    assert [r["label"] for r in chat] == [True, False]


@pytest.mark.parametrize(
    "rows", [PAIRED, PAIRED_CHAT, ULTRAFEEDBACK], ids=["strings", "messages", "ultrafeedback"]
)
def test_paired_layouts_unpair_into_two_rows(rows):
    data = Dataset.from_list(rows)
    assert detect_layout(data.column_names) == "paired"
    out = unpair(data, seed=3).to_list()
    expected = []
    for r in rows:
        for column, label in (("chosen", True), ("rejected", False)):
            response = r[column]
            if isinstance(response, str):
                expected.append(
                    {"prompt": [USER(r["prompt"])], "completion": response, "label": label}
                )
            elif response[0]["role"] != "assistant":  # prompt turns embedded, prompt column unused
                expected.append(
                    {"prompt": response[:-1], "completion": response[-1]["content"], "label": label}
                )
            else:
                expected.append(
                    {"prompt": r["prompt"], "completion": response[-1]["content"], "label": label}
                )
    assert len(out) == 2 * len(rows) and as_set(out) == as_set(expected)
    assert sum(r["label"] for r in out) == len(rows)
    assert out == unpair(data, seed=3).to_list()  # the shuffle is seeded


def test_paired_shuffle_separates_siblings():
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(20)]
    labels = unpair(Dataset.from_list(rows), seed=0)["label"]
    assert list(labels) != [True, False] * 20


def test_unknown_layout_and_bad_cells():
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\].*unpaired: prompt"):
        unpair(Dataset.from_list([{"question": "a", "answer": "b"}]))
    bad_turn = [{"prompt": "a", "completion": [USER("b")], "label": True}]
    with pytest.raises(ValueError, match="row 0, column 'completion'.*assistant"):
        unpair(Dataset.from_list(bad_turn))
    no_prompt = [{"chosen": [BOT("b")], "rejected": [BOT("c")]}]
    with pytest.raises(ValueError, match="row 0: no prompt"):
        unpair(Dataset.from_list(no_prompt))
    with pytest.raises(ValueError, match="column 'label'"):
        unpair(Dataset.from_list([{"prompt": "a", "completion": "b", "label": None}]))


def test_missing_sources(tmp_path):
    for missing in (tmp_path / "nope.jsonl", "./data/nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="no such file"):
            load_source(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .json/.jsonl/.parquet files"):
        load_source(tmp_path / "empty")


def test_hub_names_and_dataset_dicts(tmp_path, monkeypatch):
    calls = []
    fake = Dataset.from_list(UNPAIRED)
    monkeypatch.setattr(
        datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or fake
    )
    assert load_source("HuggingFaceH4/ultrafeedback_binarized", "train_prefs") is fake
    assert calls == [(("HuggingFaceH4/ultrafeedback_binarized",), {"split": "train_prefs"})]
    assert load_source(datasets.DatasetDict({"test": fake}), "test") is fake
    mixed = write(UNPAIRED, tmp_path / "mixed", "folder")
    write(UNPAIRED, mixed / "more.parquet", "parquet")
    with pytest.raises(ValueError, match=r"\['.jsonl', '.parquet'\]"):
        load_source(mixed)


def test_prompt_is_exact_token_prefix(tokenizer):
    rows = datasets.concatenate_datasets(
        [unpair(Dataset.from_list(UNPAIRED_CHAT)), unpair(Dataset.from_list(UNPAIRED))]
    )
    data, stats = tokenize_dataset(rows, tokenizer)
    assert stats.dropped_long_prompt == stats.truncated_responses == 0
    for row, tok in zip(rows, data):
        prompt = tokenizer.apply_chat_template(
            row["prompt"], add_generation_prompt=True, tokenize=True
        )["input_ids"]
        response = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert tok["input_ids"] == prompt + response + [tokenizer.eos_token_id]
        assert (tok["prompt_length"], tok["response_length"]) == (len(prompt), len(response) + 1)
        assert tok["length"] == len(tok["input_ids"]) and tok["uid"] == row["uid"]
        assert tok["desirable"] == row["label"]
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    custom, _ = tokenize_dataset(rows, tokenizer, end_of_turn_token_id=end)
    plain, _ = tokenize_dataset(rows, tokenizer, end_of_turn_token_id=None)
    assert custom[0]["input_ids"] == data[0]["input_ids"][:-1] + [end]
    assert plain[0]["input_ids"] == data[0]["input_ids"][:-1]


def test_length_policy(tokenizer, caplog):
    rows = unpair(Dataset.from_list(UNPAIRED + [{"prompt": "Hi", "completion": "", "label": True}]))
    full, stats = tokenize_dataset(rows, tokenizer, max_length=None)
    assert len(full) == len(rows) and full[-1]["response_length"] == 1  # EOS only
    prompt, response = full["prompt_length"], full["response_length"]
    # (row, max_length, kept response tokens; 0 = dropped)
    cases = [
        (0, prompt[0] + response[0], response[0]),  # fits exactly
        (1, prompt[1] + response[1] - 2, response[1] - 2),  # cut, EOS lost
        (2, prompt[2] + 1, 1),  # room for one response token
        (2, prompt[2], 0),
    ]  # the prompt fills max_length
    for row, max_length, kept in cases:
        caplog.clear()
        with caplog.at_level("WARNING", logger="elbokto.data"):
            data, stats = tokenize_dataset(rows.select([row]), tokenizer, max_length=max_length)
        assert (stats.dropped_long_prompt, len(data)) == (int(not kept), int(bool(kept)))
        assert ("dropped 1 of 1 examples" in caplog.text) == (not kept)
        if kept:
            assert data[0]["input_ids"] == full[row]["input_ids"][:max_length]
            assert data[0]["response_length"] == kept and data[0]["length"] == max_length
            assert stats.truncated_responses == int(kept < response[row])
    _, stats = tokenize_dataset(rows, tokenizer, max_prompt_length=min(prompt))
    assert 0 < stats.dropped_long_prompt == sum(p > min(prompt) for p in prompt)
    data, stats = tokenize_dataset(rows, tokenizer, end_of_turn_token_id=None)
    assert stats.dropped_empty_response == 1 and len(data) == len(rows) - 1


def test_uid_is_a_stable_content_hash():
    prompt, completion = [USER("What is a cat?")], "A small animal."
    uid = example_uid(prompt, completion, True)
    assert uid == 8168918093268587409  # fixed across processes, runs and machines
    assert 0 <= uid < 2**63
    variants = [
        example_uid(prompt, completion, False),
        example_uid(prompt, "A car.", True),
        example_uid([BOT("What is a cat?")], completion, True),
    ]
    assert len({uid, *variants}) == 4
    data = Dataset.from_list(UNPAIRED)
    assert unpair(data)["uid"] == unpair(data)["uid"]
    assert len(set(unpair(data)["uid"])) == len(UNPAIRED)


def token_rows(lengths):
    return [
        {
            "input_ids": list(range(1, p + r + 1)),
            "prompt_length": p,
            "response_length": r,
            "desirable": i % 2 == 0,
            "uid": 10 + i,
            "length": p + r,
        }
        for i, (p, r) in enumerate(lengths)
    ]


def test_collator_padding():
    rows = token_rows([(3, 2), (2, 5), (4, 1)])
    batch = PreferenceCollator(pad_token_id=0)(rows)
    assert set(batch) == {*BATCH_KEYS, "attention_mask"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 7)
    assert batch["input_ids"].dtype == batch["uid"].dtype == torch.int64
    assert batch["desirable"].dtype == torch.bool
    assert batch["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 0, 0]
    assert batch["attention_mask"].sum(1).tolist() == [5, 7, 5]
    assert batch["prompt_lengths"].tolist() == [3, 2, 4]
    assert batch["response_lengths"].tolist() == [2, 5, 1]
    assert batch["uid"].tolist() == [10, 11, 12]
    assert batch["desirable"].tolist() == [True, False, True]

    rounded = PreferenceCollator(pad_token_id=0, pad_to_multiple_of=4)(rows)
    assert rounded["input_ids"].shape == (3, 8) and rounded["attention_mask"][:, 7].sum() == 0
    llada = PreferenceCollator(pad_token_id=9, llada_padding=True)(rows)
    assert "attention_mask" not in llada
    assert llada["input_ids"][2].tolist() == [1, 2, 3, 4, 5, 9, 9]

    with pytest.raises(ValueError, match="example 0: 5 input_ids but prompt_length 4"):
        PreferenceCollator(0)([{**rows[0], "prompt_length": 4}])
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        PreferenceCollator(0, pad_to_multiple_of=0)


def test_subsample_classes():
    data = Dataset.from_list(
        [{"prompt": "p", "completion": str(i), "label": i % 4 != 0} for i in range(40)]
    )  # 30 desirable, 10 undesirable
    half = subsample_classes(data, 0.5, 1.0, seed=1)
    assert sum(half["label"]) == 15 and len(half) == 25
    assert half["completion"] == subsample_classes(data, 0.5, 1.0, seed=1)["completion"]
    assert half["completion"] != subsample_classes(data, 0.5, 1.0, seed=2)["completion"]
    tenth = subsample_classes(data, 0.1, 0.3, seed=1)
    assert (sum(tenth["label"]), len(tenth)) == (3, 6)
    assert set(tenth.filter(lambda r: r["label"])["completion"]) <= set(half["completion"])
    with pytest.raises(ValueError, match="fractions"):
        subsample_classes(data, 1.5)


def test_check_class_balance():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_class_balance(10, 10) == 1.0
        assert check_class_balance(4, 3) == pytest.approx(4 / 3)
        assert check_class_balance(10, 30, lambda_d=3.3) == pytest.approx(1.1)
    with pytest.warns(UserWarning, match=r"1.0\*10 / \(1.0\*30\) = 0.3333.*lambda_d in \[3, 4\]"):
        assert check_class_balance(10, 30, 1.0, 1.0) == pytest.approx(1 / 3)
    with pytest.warns(UserWarning, match="= inf"):
        assert check_class_balance(5, 0) == float("inf")


def test_build_dataset_end_to_end(tmp_path, tokenizer):
    path = write(ULTRAFEEDBACK + ULTRAFEEDBACK, tmp_path / "prefs.parquet", "parquet")
    (config,) = HfArgumentParser(DataConfig).parse_args_into_dataclasses(
        [
            "--dataset",
            str(path),
            "--max_length",
            "16",
            "--pad_to_multiple_of",
            "8",
            "--undesirable_fraction",
            "0.5",
        ]
    )
    data, stats = build_dataset(config, tokenizer)
    assert (stats.layout, stats.source_rows, stats.unpaired_rows) == ("paired", 4, 8)
    assert (stats.n_desirable, stats.n_undesirable) == (4, 2) and len(data) == 6
    assert stats.truncated_responses >= 2 and stats.dropped_long_prompt == 0
    assert set(data.column_names) == {
        "input_ids",
        "prompt_length",
        "response_length",
        "desirable",
        "uid",
        "pair_uid",
        "length",
    }
    batch = PreferenceCollator.from_config(config, tokenizer)(list(data))
    assert batch["input_ids"].shape == (6, 16)
    assert (batch["prompt_lengths"] + batch["response_lengths"]).max() <= 16
    assert (
        build_dataset(config, tokenizer, source=Dataset.from_list(UNPAIRED))[1].layout == "unpaired"
    )
    for empty in (
        DataConfig(dataset=str(path), max_length=2),
        DataConfig(dataset=str(path), desirable_fraction=0, undesirable_fraction=0),
    ):
        with pytest.raises(ValueError, match="no examples left"):
            build_dataset(empty, tokenizer)
    with pytest.raises(ValueError, match="fractions"):
        DataConfig(dataset="x", desirable_fraction=-0.1)


def test_pairs_stay_together(tmp_path, tokenizer):
    # The second pair repeats the first; the third loses its empty chosen answer.
    rows = [PAIRED[0], PAIRED[0], {"prompt": "Hi", "chosen": "", "rejected": "No."}, PAIRED[1]]
    path = write(rows, tmp_path / "pairs.jsonl", "jsonl")
    config = DataConfig(dataset=str(path), append_eos=False)
    unpaired, _ = build_dataset(config, tokenizer)
    siblings = {}
    for row in unpaired:
        siblings.setdefault(row["pair_uid"], []).append(row["desirable"])
    assert sorted(sorted(v) for v in siblings.values()) == [
        [False],
        [False, False, True, True],
        [False, True],
    ]

    data, stats = build_dataset(config, tokenizer, paired=True)
    assert (stats.n_pairs, stats.dropped_pairs) == (2, 2) and len(data) == 2
    assert set(data.column_names) == {"chosen", "rejected", "pair_uid", "length"}
    first = data[0]
    assert first["chosen"]["uid"] == example_uid(
        [USER(PAIRED[0]["prompt"])], PAIRED[0]["chosen"], True
    )
    assert first["length"] == first["chosen"]["length"] + first["rejected"]["length"]
    batch = PreferenceCollator(tokenizer.pad_token_id)(list(data))
    assert batch["desirable"].tolist() == [True, False] * 2
    assert batch["pair_uid"].tolist() == [p["pair_uid"] for p in data for _ in range(2)]
    assert batch["uid"].tolist() == [
        p[side]["uid"] for p in data for side in ("chosen", "rejected")
    ]
    assert torch.equal(torch.sort(dataset_uids(data)).values, torch.sort(batch["uid"]).values)
    # Each row keeps its own tokens: the rejected row of a pair is its own answer.
    rejected = batch["input_ids"][1, batch["prompt_lengths"][1] :][: batch["response_lengths"][1]]
    assert tokenizer.decode(rejected.tolist()).startswith(PAIRED[0]["rejected"])


def test_duplicates_are_named(caplog):
    rows = [UNPAIRED[0], UNPAIRED[1], UNPAIRED[0], UNPAIRED[2], UNPAIRED[1]]
    unpair(Dataset.from_list(rows))
    assert "2 duplicate examples" in caplog.text
    assert "row 2 repeats row 0, row 4 repeats row 1" in caplog.text
    caplog.clear()
    unpair(Dataset.from_list([PAIRED[0], PAIRED[1], PAIRED[0]]))
    assert "row 2 repeats row 0, row 2 repeats row 0" in caplog.text  # both responses


def test_paired_loss_refuses_unpaired_data(tmp_path, tokenizer):
    path = write(UNPAIRED, tmp_path / "kto.jsonl", "jsonl")
    with pytest.raises(ValueError, match="unpaired layout.*loss_type elbo_kto"):
        build_dataset(DataConfig(dataset=str(path)), tokenizer, paired=True)
    pairs = write(PAIRED, tmp_path / "pairs.jsonl", "jsonl")
    with pytest.raises(ValueError, match="both responses are kept or neither"):
        build_dataset(
            DataConfig(dataset=str(pairs), desirable_fraction=0.5), tokenizer, paired=True
        )


def test_tiny_tokenizer(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.mask_token_id) == (0, 1, 2)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    ids = tokenizer.apply_chat_template([USER("Hi")], add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    roles = tokenizer.convert_tokens_to_ids(list(ROLE_TOKENS))
    assert ids[0] == roles[1] and ids[-2:] == roles[3:1:-1]
    text = "unseen wörds ☃ decode exactly"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert build_tiny_tokenizer(TEXTS).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tiny_tokenizer(TEXTS, vocab_size=100)


def test_row_uids_number_the_source_rows(tmp_path, tokenizer):
    """uid_source="row": the row number in the source, counted before the drops, the class
    subsampling and any shuffle (the authors' precompute_bref.py numbers its rows so)."""
    rows = UNPAIRED + [{"prompt": "Hi", "completion": "", "label": True}] + UNPAIRED
    path = write(rows, tmp_path / "kto.jsonl", "jsonl")
    config = DataConfig(
        dataset=str(path), uid_source="row", append_eos=False, undesirable_fraction=0.5
    )
    data, stats = build_dataset(config, tokenizer)
    assert stats.dropped_empty_response == 1 and stats.n_undesirable == 1
    kept = [i for i, r in enumerate(rows) if r["completion"] and r["label"]]
    undesirable = sorted(set(data["uid"]) - set(kept))
    assert undesirable in ([1], [5]) and sorted(data["uid"]) == sorted(kept + undesirable)
    for row in data:  # each uid names the source row the example came from
        source = rows[row["uid"]]
        want = tokenizer(source["completion"], add_special_tokens=False)["input_ids"]
        assert row["input_ids"][row["prompt_length"] :] == want
    content, _ = build_dataset(DataConfig(dataset=str(path), append_eos=False), tokenizer)
    assert content["uid"][:3] == [
        example_uid([USER(r["prompt"])], r["completion"], r["label"]) for r in rows[:3]
    ]
    pairs = write(PAIRED, tmp_path / "pairs.jsonl", "jsonl")
    with pytest.raises(ValueError, match="uid_source='row' numbers the rows of an unpaired"):
        build_dataset(DataConfig(dataset=str(pairs), uid_source="row"), tokenizer)
    with pytest.raises(ValueError, match="uid_source='index'; expected 'content' or 'row'"):
        DataConfig(dataset="x", uid_source="index")


def test_joined_tokenization(tokenizer):
    """joined: prompt and completion tokenised as one text (the authors' data_utils.py), the
    response starting at the token count of the prompt alone; it differs from tokenising them
    apart only where the completion merges with the end of the template."""
    rows = unpair(Dataset.from_list(UNPAIRED))
    apart, _ = tokenize_dataset(rows, tokenizer, end_of_turn_token_id=None)
    joined, _ = tokenize_dataset(rows, tokenizer, end_of_turn_token_id=None, joined=True)
    assert joined.to_list() == apart.to_list()  # the template ends with a special token
    open_tokenizer = build_tiny_tokenizer(TEXTS)
    open_tokenizer.chat_template = CHAT_TEMPLATE.replace("<|assistant|>{%", "<|assistant|>A: {%")
    apart, _ = tokenize_dataset(rows, open_tokenizer, end_of_turn_token_id=None)
    joined, _ = tokenize_dataset(rows, open_tokenizer, end_of_turn_token_id="eos", joined=True)
    texts = open_tokenizer.apply_chat_template(
        list(rows["prompt"]), tokenize=False, add_generation_prompt=True
    )
    for text, row, tok, alone in zip(texts, rows, joined, apart):
        whole = open_tokenizer(text + row["completion"], add_special_tokens=False)["input_ids"]
        assert tok["input_ids"] == whole + [open_tokenizer.eos_token_id]
        assert tok["prompt_length"] == alone["prompt_length"]
        assert tok["response_length"] == len(whole) + 1 - alone["prompt_length"]
    assert joined["input_ids"] != [
        ids + [open_tokenizer.eos_token_id] for ids in apart["input_ids"]
    ]
