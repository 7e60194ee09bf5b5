"""The named API endpoints through gradio_client, against the app started as a user starts it."""

from __future__ import annotations

import json
import time
import zipfile
from pathlib import Path

import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from training.core import data, inference
from training.core.runs import Run

DONE = ("finished", "failed", "cancelled")


@pytest.fixture(scope="module")
def app(tmp_path_factory, app_launcher):
    root = tmp_path_factory.mktemp("api")
    # Tiny local models keep each run to seconds; local paths are a trusted-deployment setting.
    with app_launcher(root / "runs", root / "app.log", LORA_ARENA_ALLOW_LOCAL_PATHS="1") as server:
        yield Client(server.url, verbose=False), root / "runs"


def wait_done(client: Client, run_id: str, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.predict(run_id=run_id, metrics_from_step=None, api_name="/run_status")
        if state["state"] in DONE:
            return state
        time.sleep(0.5)
    raise AssertionError(f"run {run_id} did not finish")


def start(client: Client, **request) -> dict:
    return client.predict(**request, api_name="/start_run")


def tiny_sentiment(tiny_models, review_csv, **overrides) -> dict:
    request = dict(
        task="sentiment",
        method="lora",
        model=tiny_models["bert"],
        dataset=str(review_csv),
        batch_size=8,
        seq_len=48,
        eval_samples=16,
    )
    return {**request, **overrides}


@pytest.fixture(scope="module")
def runs(app, tiny_models, review_csv) -> dict[str, str]:
    """One finished sentiment run and one finished generation run, started through the API."""
    client, _ = app
    sentiment = start(client, **tiny_sentiment(tiny_models, review_csv, hparams={"learning_rate": 5e-3}, max_steps=6))
    generation = start(
        client,
        task="generation",
        method="hira",
        model=tiny_models["llama"],
        dataset="bundled/hamlet",
        max_steps=3,
        batch_size=4,
        seq_len=48,
        eval_samples=8,
    )
    assert sentiment["state"] in ("queued", "starting") and sentiment["command"].startswith("python -m training train")
    assert generation["queue_position"] in (1, 2)  # waits: one run at a time
    # A rate left out stays out: the command then trains with the same tuned default the run gets.
    assert "--learning-rate 0.005" in sentiment["command"] and "--learning-rate" not in generation["command"]
    for started in (sentiment, generation):
        assert wait_done(client, started["id"])["status"] == "completed"
    return {"sentiment": sentiment["id"], "generation": generation["id"], "owner": sentiment["owner_token"]}


def test_a_run_reports_its_status_metrics_and_appears_in_the_list(app, runs):
    client, _ = app
    state = client.predict(run_id=runs["sentiment"], metrics_from_step=0, api_name="/run_status")
    assert state["state"] == "finished" and state["summary"]["steps"] == 6
    train = [r for r in state["metrics"] if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["loss"] > 0 for r in train)
    later = client.predict(run_id=runs["sentiment"], metrics_from_step=5, api_name="/run_status")["metrics"]
    assert later and all(r["step"] >= 5 for r in later)
    rows = {row["run"]: row for row in client.predict(task=None, api_name="/list_runs")}
    assert rows[runs["sentiment"]]["metric"] == "accuracy"
    assert rows[runs["sentiment"]]["validation"] == state["summary"]["metrics"]["validation"]["accuracy"]
    assert rows[runs["generation"]]["metric"] == "perplexity"
    assert set(r["run"] for r in client.predict(task="generation", api_name="/list_runs")) == {runs["generation"]}


def test_classify_and_generate_side_by_side(app, runs):
    client, _ = app
    results = client.predict(text="A fine film.", run_ids=[runs["sentiment"]], include_base=True, api_name="/classify")
    assert [r["run"] for r in results] == [None, runs["sentiment"]]
    assert all(sum(r["probabilities"].values()) == pytest.approx(1.0) for r in results)
    generated = client.predict(
        prompt="To be, or not", run_ids=[runs["generation"]], include_base=False, max_new_tokens=5, api_name="/generate"
    )
    assert len(generated) == 1 and generated[0]["text"].strip()
    # a sentiment run judges it: the label that run gives the same text through /classify
    (judged,) = client.predict(
        text=generated[0]["text"], run_ids=[generated[0]["judge_run"]], include_base=False, api_name="/classify"
    )
    assert generated[0]["judged"]["label"] == judged["label"]


def test_while_a_run_trains_the_playground_and_leaderboard_answer_and_stop_ends_it(app, runs, tiny_models, review_csv):
    client, store = app
    review = dict(text="A fine film.", run_ids=[runs["sentiment"]], include_base=False, api_name="/classify")
    idle = client.predict(**review)
    started = start(client, **tiny_sentiment(tiny_models, review_csv, max_steps=2000, eval_steps=1000))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = client.predict(run_id=started["id"], metrics_from_step=0, api_name="/run_status")
        if len(state.get("metrics", [])) >= 2:
            break
        time.sleep(0.5)
    assert state["state"] == "running"
    answer = client.predict(**review)  # the same answer as when nothing trains
    assert answer[0]["label"] == idle[0]["label"]
    assert answer[0]["probabilities"] == pytest.approx(idle[0]["probabilities"], abs=1e-6)
    assert started["id"] in {row["run"] for row in client.predict(task="sentiment", api_name="/list_runs")}
    assert client.predict(run_id=started["id"], metrics_from_step=None, api_name="/run_status")["state"] == "running"

    with pytest.raises(AppError, match="still running"):  # nothing to take home yet
        client.predict(run_id=started["id"], api_name="/download_run")
    waiting = start(client, **tiny_sentiment(tiny_models, review_csv, max_steps=2))  # queued behind it
    with pytest.raises(AppError, match=f"run {waiting['id']} is queued; it can be used once it has trained"):
        client.predict(**{**review, "run_ids": [waiting["id"]]})
    client.predict(run_id=waiting["id"], owner_token=waiting["owner_token"], api_name="/stop_run")
    with pytest.raises(AppError, match="ended before training began: it has no adapter"):
        client.predict(**{**review, "run_ids": [waiting["id"]]})

    with pytest.raises(AppError, match="give its owner_token"):  # the owner token is needed
        client.predict(run_id=started["id"], api_name="/stop_run")
    assert "stopping" in client.predict(run_id=started["id"], owner_token=started["owner_token"], api_name="/stop_run")
    final = wait_done(client, started["id"])
    assert final["status"] == "stopped" and (store / started["id"] / "adapter").is_dir()


LONG_TEXT = "x" * 2001
HF_TOKEN = "hf_" + "dummy" * 6  # never valid: every request below is refused before an upload
BAD_REQUESTS = [
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"rank": 0}}, "rank must satisfy"),
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"learning_rate": -1e-3}}, "learning_rate"),
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"learning_rate": 0}}, "learning_rate"),
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"learning_rate": "fast"}}, "must be a number"),
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"dropout": 1.0}}, "dropout must satisfy"),
    ("/start_run", {"task": "sentiment", "method": "sparselora", "hparams": {"ffn_sparsity": 1.0}}, "ffn_sparsity"),
    ("/start_run", {"task": "sentiment", "method": "sparselora", "hparams": {"ffn_sparsity": -0.1}}, "ffn_sparsity"),
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"sparsity": 0.5}}, "does not take sparsity"),
    ("/start_run", {"task": "sentiment", "method": "magic"}, "unknown method"),
    ("/start_run", {"task": "poetry", "method": "lora"}, "unknown task"),
    ("/start_run", {"task": "sentiment", "method": "lora", "max_steps": 0}, r"steps \(max_steps\) must be"),
    ("/start_run", {"task": "sentiment", "method": "lora", "max_steps": -5}, r"steps \(max_steps\) must be"),
    ("/start_run", {"task": "sentiment", "method": "lora", "batch_size": 0}, "batch size must be"),
    ("/start_run", {"task": "sentiment", "method": "lora", "seq_len": 4}, r"sequence length \(seq_len\) must be"),
    ("/start_run", {"task": "sentiment", "method": "lora", "seed": -1}, "seed must be"),
    ("/start_run", {"task": "sentiment", "method": "lora", "model": "../../no-such-folder"}, "not a catalog id"),
    ("/start_run", {"task": "sentiment", "method": "lora", "model": "/etc"}, "no config.json"),
    ("/start_run", {"task": "sentiment", "method": "lora", "model": "someone/model"}, "needs the Hugging Face Hub"),
    ("/start_run", {"task": "sentiment", "method": "lora", "dataset": "/etc/passwd"}, "not in the catalog"),
    ("/start_run", {"task": "sentiment", "method": "lora", "dataset": "bundled/hamlet"}, "not in the catalog"),
    ("/run_status", {"run_id": "../etc"}, "not a valid run id"),
    ("/run_status", {"run_id": ""}, "not a valid run id"),
    ("/run_status", {"run_id": "20990101-000000-sentiment-lora-0000"}, "no run"),
    ("/stop_run", {"run_id": "a/b"}, "not a valid run id"),
    ("/stop_run", {"run_id": "20990101-000000-sentiment-lora-0000"}, "no run"),
    ("/start_run", {"task": "sentiment", "method": "lora", "max_steps": 5000}, "over this deployment's limit"),
    ("/start_run", {"task": "sentiment", "method": "lora", "seq_len": 4096}, "over this deployment's limit"),
    ("/stop_run", {"run_id": "SENTIMENT", "owner_token": "not-the-owner"}, "started by another session"),
    ("/resume_run", {"run_id": "SENTIMENT", "owner_token": "not-the-owner"}, "started by another session"),
    ("/resume_run", {"run_id": "../x"}, "not a valid run id"),
    ("/delete_run", {"run_id": "SENTIMENT", "owner_token": "not-the-owner"}, "started by another session"),
    ("/delete_run", {"run_id": "20990101-000000-sentiment-lora-0000"}, "no run"),
    ("/list_runs", {"task": "poetry"}, "unknown task"),
    ("/classify", {"text": "", "run_ids": []}, "empty"),
    ("/classify", {"text": "   ", "run_ids": []}, "empty"),
    ("/classify", {"text": LONG_TEXT, "run_ids": []}, "at most 2000"),
    ("/classify", {"text": "fine", "run_ids": ["../x"]}, "not a valid run id"),
    ("/classify", {"text": "fine", "run_ids": ["20990101-000000-sentiment-lora-0000"]}, "no run"),
    ("/classify", {"text": "fine", "run_ids": [], "include_base": False}, "select at least one run"),
    ("/classify", {"text": "fine", "run_ids": ["GENERATION"]}, "not a sentiment run"),
    ("/generate", {"prompt": "", "run_ids": []}, "empty"),
    ("/generate", {"prompt": "Hi", "run_ids": [], "max_new_tokens": 0}, "max new tokens"),
    ("/generate", {"prompt": "Hi", "run_ids": [], "max_new_tokens": 1000}, "max new tokens"),
    ("/generate", {"prompt": "Hi", "run_ids": ["GENERATION"], "temperature": -1.0}, "temperature"),
    ("/generate", {"prompt": "Hi", "run_ids": ["GENERATION"], "top_p": 0.0}, "top_p"),
    ("/generate", {"prompt": "Hi", "run_ids": ["SENTIMENT"]}, "not a generation run"),
    ("/download_run", {"run_id": "../x"}, "not a valid run id"),
    ("/download_run", {"run_id": "20990101-000000-sentiment-lora-0000"}, "no run"),
    ("/download_run", {"run_id": "SENTIMENT", "merged": True, "owner_token": "not-the-owner"}, "another session"),
    ("/download_run", {"run_id": "GENERATION", "merged": True}, "give its owner_token"),
    ("/push_run", {"run_id": "SENTIMENT", "repo_id": "me/model", "token": HF_TOKEN}, "give its owner_token"),
    (
        "/push_run",
        {"run_id": "SENTIMENT", "repo_id": "no owner", "token": HF_TOKEN, "owner_token": "OWNER"},
        "repository",
    ),
    (
        "/push_run",
        {"run_id": "SENTIMENT", "repo_id": "me/a--b", "token": HF_TOKEN, "owner_token": "OWNER"},
        "repository",
    ),
    ("/push_run", {"run_id": "SENTIMENT", "repo_id": "me/model", "token": "", "owner_token": "OWNER"}, "access token"),
    ("/push_run", {"run_id": "SENTIMENT", "repo_id": "me/model", "token": HF_TOKEN, "owner_token": "OWNER"}, "reach"),
    ("/push_run", {"run_id": "../x", "repo_id": "me/model", "token": HF_TOKEN}, "not a valid run id"),
    # JSON of the wrong type, refused by name before anything reads it
    ("/run_status", {"run_id": 5}, "run_id must be a string"),
    ("/run_status", {"run_id": "SENTIMENT", "metrics_from_step": "5"}, "metrics_from_step must be a whole number"),
    ("/run_status", {"run_id": "SENTIMENT\n"}, "not a valid run id"),
    ("/stop_run", {"run_id": "SENTIMENT", "owner_token": 5}, "owner_token must be a string or null"),
    ("/start_run", {"task": "sentiment", "method": ["lora"]}, "method must be a string"),
    ("/start_run", {"task": "sentiment", "method": "lora", "max_steps": True}, "max_steps must be a whole number"),
    ("/classify", {"text": 5, "run_ids": []}, "text must be a string"),
    ("/classify", {"text": "fine", "run_ids": "a-run"}, "run_ids must be a list of strings"),
    ("/generate", {"prompt": "Hi", "run_ids": [], "max_new_tokens": "5"}, "max_new_tokens must be a whole number"),
    ("/generate", {"prompt": "Hi", "run_ids": [], "temperature": "hot"}, "temperature must be a number"),
    # refused before a model loads
    ("/generate", {"prompt": "Hi", "run_ids": ["GENERATION"], "seed": 2**64}, "seed must be between"),
    ("/start_run", {"task": "generation", "method": "lora", "model": "bundled/all-MiniLM-L6-v2"}, "sentiment model"),
    ("/start_run", {"task": "sentiment", "method": "lora", "hparams": {"target_modules": " , "}}, "names no module"),
]


def _store_state(store: Path) -> dict:
    return {
        path.name: (path / "summary.json").read_text()
        for path in sorted(store.iterdir())
        if not path.name.startswith(".")
    }


@pytest.mark.parametrize("endpoint, request_, message", BAD_REQUESTS, ids=lambda v: v if isinstance(v, str) else "")
def test_bad_input_gets_a_readable_error_and_changes_nothing(app, runs, endpoint, request_, message):
    client, store = app
    placeholders = {"GENERATION": runs["generation"], "SENTIMENT": runs["sentiment"]}
    if isinstance(request_.get("run_ids"), list):
        request_ = {**request_, "run_ids": [placeholders.get(r, r) for r in request_["run_ids"]]}
    if "run_id" in request_:
        request_ = {**request_, "run_id": placeholders.get(request_["run_id"], request_["run_id"])}
    if request_.get("owner_token") == "OWNER":
        request_ = {**request_, "owner_token": runs["owner"]}
    before = _store_state(store)
    with pytest.raises(AppError, match=message):
        client.predict(**request_, api_name=endpoint)
    assert _store_state(store) == before


def test_a_finished_run_downloads_as_an_archive_that_peft_loads_to_the_runs_own_predictions(
    app, runs, tiny_models, review_csv, tmp_path
):
    client, store = app
    archive = Path(client.predict(run_id=runs["sentiment"], api_name="/download_run"))  # anyone may
    assert archive.name == f"{runs['sentiment']}.zip"
    with zipfile.ZipFile(archive) as bundle:
        bundle.extractall(tmp_path)  # a fresh folder: nothing of the app's
    folder = tmp_path / runs["sentiment"]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"], num_labels=2)
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    reviews = data.load_splits(str(review_csv), "sentiment", offline=True).validation["text"][:32]
    taken_home = inference.class_probabilities(model, AutoTokenizer.from_pretrained(folder), reviews, "fp32")
    # The run as the app serves it, in the fp32 that plain transformers computes in at home.
    own = inference.load_run(Run(store / runs["sentiment"]), precision="fp32")
    served = inference.class_probabilities(own.model, own.tokenizer, reviews, own.precision)
    assert len(reviews) == 32 and taken_home.argmax(-1).tolist() == served.argmax(-1).tolist()
    torch.testing.assert_close(taken_home, served)
    card = (folder / "README.md").read_text()
    test_accuracy = json.loads((store / runs["sentiment"] / "summary.json").read_text())["metrics"]["test"]["accuracy"]
    assert "**LoRA** fine-tuning" in card and f"| test | {test_accuracy:.1%} |" in card


def test_the_owner_downloads_the_merged_model(app, runs):
    client, _ = app
    merged = client.predict(run_id=runs["sentiment"], merged=True, owner_token=runs["owner"], api_name="/download_run")
    with zipfile.ZipFile(merged) as bundle:
        names = bundle.namelist()
    assert f"{runs['sentiment']}-merged/model.safetensors" in names
    assert not any(name.endswith("adapter_config.json") for name in names)


def test_a_killed_app_restarts_with_the_run_interrupted_intact_and_resumable(
    tmp_path, app_launcher, tiny_models, review_csv
):
    runs = tmp_path / "runs"
    request = tiny_sentiment(tiny_models, review_csv, max_steps=400, eval_steps=1000, checkpoint_steps=5)
    with app_launcher(runs, tmp_path / "first.log", LORA_ARENA_ALLOW_LOCAL_PATHS="1") as server:
        client = Client(server.url, verbose=False)
        started = start(client, **request)
        run_id, token = started["id"], started["owner_token"]
        deadline = time.monotonic() + 120
        while not list((runs / run_id / "checkpoints").glob("checkpoint-*/trainer_state.json")):
            assert time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.3)
        server.process.kill()  # kill -9: no chance to clean up; its worker dies with it
        server.process.wait()
    history = (runs / run_id / "metrics.jsonl").read_text().splitlines()

    with app_launcher(runs, tmp_path / "second.log", LORA_ARENA_ALLOW_LOCAL_PATHS="1") as server:
        client = Client(server.url, verbose=False)
        state = client.predict(run_id=run_id, metrics_from_step=0, api_name="/run_status")
        assert state["status"] == "interrupted" and "ended without finishing" in state["error"]
        assert len(state["metrics"]) >= len(history) - 1  # every whole line survived (one may be cut)
        assert client.predict(run_id=run_id, owner_token=token, api_name="/resume_run")["id"] == run_id
        deadline = time.monotonic() + 120
        while True:  # trains on from the checkpoint
            state = client.predict(run_id=run_id, metrics_from_step=0, api_name="/run_status")
            resumed_from = state["summary"].get("resumed_from_step")
            if state["state"] == "running" and resumed_from and state["metrics"][-1]["step"] > resumed_from:
                break
            assert time.monotonic() < deadline, "the resumed run did not train"
            time.sleep(0.3)
        client.predict(run_id=run_id, owner_token=token, api_name="/stop_run")
        final = wait_done(client, run_id)
        assert final["status"] == "stopped" and final["summary"]["resumed_from_step"] >= 5
        steps = [r["step"] for r in client.predict(run_id=run_id, api_name="/run_status")["metrics"]]
        train_steps = [step for step in steps if step]  # eval records carry steps too
        assert sorted(set(train_steps)) == list(range(1, max(train_steps) + 1))
