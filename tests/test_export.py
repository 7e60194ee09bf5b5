"""Taking a run home on tiny models: the archive and its model card, merged models that answer as
their adapters under plain transformers, what is refused (writing nothing), the upload plan, and a
push attempt that leaves the token in no file and no log."""

from __future__ import annotations

import http.server
import json
import logging
import secrets
import shutil
import threading
import time
import zipfile
from pathlib import Path

import gradio as gr
import huggingface_hub
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from training.core import data, inference, offline
from training.core.config import ConfigError, TrainConfig
from training.core.errors import InferenceError
from training.core.runs import Run, RunStore
from training.engine import train
from training.serving import export
from ui.arena import Arena, user_errors

REPO = "someone/tiny-adapter"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models, review_csv) -> RunStore:
    """A finished LoRA sentiment run (BERT) and a finished HiRA generation run (Llama)."""
    store = RunStore(tmp_path_factory.mktemp("runs"))
    common = dict(seq_len=48, seed=0, offline=True)
    sentiment = dict(task="sentiment", model=tiny_models["bert"], dataset=str(review_csv), eval_samples=16)
    lora = TrainConfig(method="lora", max_steps=6, batch_size=8, hparams={"learning_rate": 5e-3}, **sentiment, **common)
    train(lora, store)
    generation = dict(task="generation", model=tiny_models["llama"], dataset="bundled/hamlet", eval_samples=8)
    hira = TrainConfig(
        method="hira", max_steps=4, batch_size=4, hparams={"learning_rate": 3e-2}, **generation, **common
    )
    train(hira, store)
    return store


@pytest.fixture(scope="module")
def fakes(tmp_path_factory) -> RunStore:
    """Run records made without training, apart from the trained ones."""
    return RunStore(tmp_path_factory.mktemp("fakes"))


def run_of(store: RunStore, method: str) -> Run:
    return next(run for run in store.runs() if run.config["method"] == method and run.status == "completed")


def fake_run(store: RunStore, method: str, status: str, **config) -> Run:
    """A run record without training (what the refusals and the card's front matter read)."""
    settings = {"task": "sentiment", "method": method, "model": "bundled/all-MiniLM-L6-v2", "hparams": {}, **config}
    run = store.create(settings)
    run.update_summary(status=status, steps=3, planned_steps=3, primary_metric="accuracy")
    if status != "running":
        run.adapter_dir.mkdir()
    return run


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_the_archive_holds_adapter_tokenizer_run_files_and_a_hub_model_card(store, tmp_path):
    run = run_of(store, "lora")
    path = export.archive(run, tmp_path / "exports")
    assert path.name == f"{run.id}.zip" and export.archive(run, tmp_path / "exports") == path  # built once
    with zipfile.ZipFile(path) as bundle:
        names = set(bundle.namelist())
        bundle.extractall(tmp_path / "unpacked")
    expected = ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md", "run/config.json")
    assert {f"{run.id}/{name}" for name in (*expected, "run/summary.json")} <= names  # one top folder
    folder = tmp_path / "unpacked" / run.id
    card = (folder / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: peft" in front and "pipeline_tag: text-classification" in front and "- lora" in front
    assert "base_model:" not in front  # a local folder is no Hub model
    summary = run.summary
    assert "**LoRA**" in body and "rank 8" in body and "train 320 · validation 40 · test 40" in body
    assert f"| test | {summary['metrics']['test']['accuracy']:.1%} |" in body
    assert f"| base model, validation | {summary['base_metrics']['validation']['accuracy']:.1%} |" in body
    assert f"{summary['trainable_params']:,} of {summary['total_params']:,}" in body and "CPU" in body
    base = 'AutoModelForSequenceClassification.from_pretrained("path/to/bert", num_labels=2)'
    assert f'model = PeftModel.from_pretrained({base}, "./{run.id}")' in body
    shared = json.loads((folder / "run" / "config.json").read_text())
    assert "owner" not in shared and "model_path" not in shared and shared["model"] == "bert"
    assert json.loads((folder / "run" / "summary.json").read_text())["metrics"] == summary["metrics"]


def test_pages_asking_for_the_same_archive_at_once_all_get_the_one_archive(store, tmp_path):
    run, pages = run_of(store, "lora"), 6
    answers, errors = [], []

    def page(delay: float):
        time.sleep(delay)  # staggered: a later page arrives while an earlier one writes
        try:
            answers.append(export.archive(run, tmp_path / "exports"))
        except Exception as error:  # noqa: BLE001 (the test reports what a page would have shown)
            errors.append(repr(error))

    threads = [threading.Thread(target=page, args=(0.02 * number,)) for number in range(pages)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(set(answers)) == 1 and zipfile.ZipFile(answers[0]).testzip() is None
    assert [path.name for path in (tmp_path / "exports").iterdir()] == [answers[0].parent.name]  # built once


def test_the_card_names_hub_models_and_datasets_and_the_adapter_points_at_its_hub_base(store, fakes, tmp_path):
    run = fake_run(fakes, "qlora", "stopped", dataset="stanfordnlp/sst2")
    card = export.model_card(run)
    front = card.split("---\n")[1]
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in front and "datasets:\n- stanfordnlp/sst2" in front
    assert "Stopped at step 3 of 3" in card and "no validation or test figures" in card and "4-bit" in card
    full = export.model_card(fake_run(fakes, "full", "completed"))
    assert "library_name: transformers" in full and "AutoModelForSequenceClassification.from_pretrained(" in full
    bundled = fake_run(fakes, "lora", "completed", dataset="bundled/rotten-tomatoes")
    assert "datasets:" not in export.model_card(bundled)

    shutil.copytree(run_of(store, "lora").adapter_dir, bundled.adapter_dir, dirs_exist_ok=True)
    exported = export.write_export(bundled, tmp_path / "adapter")  # trained on the bundled MiniLM
    base = json.loads((exported / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == "sentence-transformers/all-MiniLM-L6-v2"


def _validation_batch(run: Run, tokenizer) -> dict:
    task = run.config["task"]
    texts = data.load_splits(run.config["dataset"], task, offline=True).validation["text"][:8]
    return tokenizer(texts, padding=True, truncation=True, max_length=48, return_tensors="pt")


@pytest.mark.parametrize("method, auto", [("lora", AutoModelForSequenceClassification), ("hira", AutoModelForCausalLM)])
def test_a_merged_model_loads_with_plain_transformers_and_answers_as_its_adapter(store, tmp_path, method, auto):
    run = run_of(store, method)
    folder = export.write_export(run, tmp_path / "merged", merged=True)
    assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
    assert "library_name: transformers" in (folder / "README.md").read_text()

    merged = auto.from_pretrained(folder).eval()  # no PEFT, no project code
    batch = _validation_batch(run, AutoTokenizer.from_pretrained(folder))
    adapter = inference.load_run(run, precision="fp32").model  # the merged export is fp32
    with torch.no_grad():
        expected, got = adapter(**batch).logits, merged(**batch).logits
        with adapter.disable_adapter():
            base = adapter(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the answer: the merge carried it


@pytest.mark.parametrize(
    "method, status, merged, error, message",
    [
        ("lora", "running", False, InferenceError, "still training"),
        ("lora", "failed", False, InferenceError, "ended failed"),
        ("lora", "interrupted", False, InferenceError, "ended interrupted"),
        ("qlora", "completed", True, InferenceError, "4-bit NF4 base"),
        ("sparselora-4bit", "completed", True, InferenceError, "4-bit NF4 base"),
        ("full", "completed", True, InferenceError, "already saves the whole model"),
    ],
)
def test_unfinished_runs_and_methods_that_do_not_merge_are_refused_writing_nothing(
    fakes, tmp_path, method, status, merged, error, message
):
    run = fake_run(fakes, method, status)
    before = files_under(fakes.root)
    with pytest.raises(error, match=message):
        export.archive(run, tmp_path / "exports", merged=merged)
    with pytest.raises(error, match=message):
        export.export_to(run, tmp_path / "out.zip", merged=merged)
    assert not (tmp_path / "exports").exists() and not list(tmp_path.iterdir())
    assert files_under(fakes.root) == before


def test_the_methods_that_merge_say_so_themselves():
    from lora_methods import METHODS

    mergeable = {name for name, method in METHODS.items() if method.merge_blocker is None}
    assert mergeable == {"lora", "dora", "hira", "sparselora"}


BAD_REPOS = [
    "",
    "  ",
    "name-only",
    "a/b/c",
    "-bad/name",
    "owner/na--me",
    "owner/x..y",
    "owner/name.git",
    "owner/",
    "o w/n",
]


@pytest.mark.parametrize("repo_id", BAD_REPOS)
def test_invalid_repository_names_are_refused_before_anything_is_written(store, tmp_path, repo_id):
    with pytest.raises(ConfigError, match="not a Hub repository name"):
        export.plan_upload(run_of(store, "lora"), repo_id, tmp_path)
    with pytest.raises(ConfigError, match="not a Hub repository name"):
        export.push_run(run_of(store, "lora"), repo_id, "hf_" + "x" * 30)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "token, message", [("", "needs a Hugging Face access token"), ("  ", "needs a"), ("a b c d", "not a")]
)
def test_an_empty_or_malformed_token_is_refused(store, token, message):
    with pytest.raises(ConfigError, match=message):
        export.push_run(run_of(store, "lora"), REPO, token)


def test_offline_a_push_says_why_it_cannot_happen(store):
    with pytest.raises(ConfigError, match="cannot reach"):
        export.push_run(run_of(store, "lora"), REPO, "hf_" + "x" * 30)


def test_a_folder_export_refuses_to_overwrite(store, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="already exists"):
        export.write_export(run_of(store, "lora"), tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["mine.txt"]


def test_the_upload_plan_lists_files_card_and_a_private_model_repository(store, tmp_path):
    run = run_of(store, "lora")
    plan = export.plan_upload(run, f" {REPO} ", tmp_path)
    assert plan.repo_id == REPO and plan.private and plan.repo_type == "model" and run.id in plan.commit_message
    expected = {"adapter_config.json", "adapter_model.safetensors", "README.md", "run/config.json", "run/summary.json"}
    assert expected <= set(plan.files) and all((plan.folder / name).is_file() for name in plan.files)
    assert f'"{REPO}")' in plan.card and plan.card.startswith("---\nlibrary_name: peft")


def token_nowhere(token: str, *places: Path, texts: tuple[str, ...] = ()) -> None:
    for place in places:
        for name, content in files_under(place).items():
            assert token.encode() not in content, f"the token is in {name}"
    assert not any(token in text for text in texts)
    token_file = Path(huggingface_hub.constants.HF_TOKEN_PATH)
    assert not token_file.exists() or token not in token_file.read_text()


def test_a_push_attempt_leaves_the_token_in_no_file_and_no_log(store, tmp_path, monkeypatch, capfd):
    token = "hf_dummy" + secrets.token_hex(16)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(offline, "is_offline", lambda force_offline=False: False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    log = tmp_path / "server.log"
    handler = logging.FileHandler(log)
    logging.getLogger("lora_arena").addHandler(handler)
    logging.getLogger("lora_arena").setLevel(logging.INFO)
    try:
        arena = Arena(str(store.root))  # the facade the page and the API call
        with pytest.raises(gr.Error) as refused, user_errors():
            arena.push(run_of(store, "lora").id, REPO, token)
    finally:
        logging.getLogger("lora_arena").removeHandler(handler)
        handler.close()
    assert f"the upload to {REPO} failed" in refused.value.message
    output = capfd.readouterr()
    assert "refused: InferenceError" in log.read_text()
    token_nowhere(token, store.root, tmp_path, arena.exports, texts=(refused.value.message, output.out, output.err))


class FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request as the Hub answers a bad token, and keeps the Authorization headers."""

    seen: list[str] = []

    def _refuse(self) -> None:
        FakeHub.seen.append((self.command, self.path, self.headers.get("Authorization", "")))
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args) -> None:  # the test server keeps quiet
        pass


def test_a_served_app_pushes_with_the_token_once_and_keeps_it_nowhere(store, tmp_path, app_launcher):
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    runs = tmp_path / "runs"
    run = run_of(store, "lora")
    shutil.copytree(run.dir, runs / run.id)
    token = "hf_dummy" + secrets.token_hex(16)
    online = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}"}  # a Hub that answers
    try:
        with app_launcher(runs, tmp_path / "app.log", **online) as server:
            client = Client(server.url, verbose=False)
            with pytest.raises(AppError, match=f"the upload to {REPO} failed") as refused:
                client.predict(run_id=run.id, repo_id=REPO, token=token, api_name="/push_run")
            with pytest.raises(AppError, match="not a Hub repository name"):
                client.predict(run_id=run.id, repo_id="no owner", token=token, api_name="/push_run")
    finally:
        hub.shutdown()
    # The token went to the Hub with the repository's creation (and huggingface_hub's look-up after the
    # refusal), as the credential it is, and to nothing else; the upload itself never started.
    sent = [(method, path) for method, path, credential in FakeHub.seen if credential]
    assert ("POST", "/api/repos/create") in sent and not any(
        method == "PUT" or "upload" in path for method, path in sent
    )
    assert {credential for *_, credential in FakeHub.seen} <= {"", f"Bearer {token}"}
    assert "lora_arena refused" in (tmp_path / "app.log").read_text()
    token_nowhere(token, runs, tmp_path, texts=(str(refused.value),))
