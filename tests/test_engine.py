"""The engine on tiny models: what a run writes, how it stops, fails, reloads and refuses bad requests."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import tiny_sentiment_config
from peft import PeftModel

from lora_methods import HParamError
from training.core import data, evaluation, inference
from training.core.config import ConfigError, TrainConfig
from training.core.errors import ModelError
from training.core.memory import MEMORY_PARTS
from training.core.models import LABELS, load_model, load_tokenizer
from training.core.runs import RunStore, latest_checkpoint
from training.engine import resume, train

TRAIN_KEYS = {
    "kind",
    "step",
    "epoch",
    "loss",
    "learning_rate",
    "grad_norm",
    "step_time_s",
    "samples_per_s",
    "tokens_per_s",
    "elapsed_s",
    "rss_bytes",
}
REQUEST_AGE_S = 30.0  # how long before `train` the sentiment run's request began
CLEAR_REVIEWS = ["An utterly wonderful, moving film", "A dull, boring, awful mess"]


def sentiment_config(tiny_models, review_csv, **overrides) -> TrainConfig:
    """Long enough to evaluate three times during training."""
    settings = dict(max_steps=12, seq_len=64, eval_samples=40, eval_subsample=16, eval_steps=4)
    return tiny_sentiment_config(tiny_models, review_csv, **{**settings, **overrides})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> RunStore:
    return RunStore(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def sentiment_run(store, tiny_models, review_csv):
    # As a worker process does: the request began before `train` (the interpreter and libraries started).
    summary = train(sentiment_config(tiny_models, review_csv), store, started_at=time.time() - REQUEST_AGE_S)
    return next(run for run in store.runs() if run.summary == summary)


def _reevaluated_test_metrics(run) -> dict:
    """The run's test metrics measured again on its saved adapter (or model), loaded afresh."""
    loaded = inference.load_run(run)
    splits = data.load_splits(run.config["dataset"], "sentiment", offline=True)
    test = data.tokenize(splits.test, loaded.tokenizer, "sentiment", run.config["seq_len"])
    collate = data.collator(loaded.tokenizer, "sentiment")
    return evaluation.evaluate(loaded.model, test, collate, "sentiment", loaded.precision)


def test_a_run_records_config_metrics_summary_and_adapter(sentiment_run):
    run = sentiment_run
    config, summary, records = run.config, run.summary, run.metrics()
    assert config["method"] == "lora" and config["hparams"]["rank"] == 8 and config["seed"] == 0
    assert {"torch", "transformers", "peft"} <= set(config["versions"]) and config["device"]["type"] == "cpu"
    assert config["dataset_sizes"] == {"train": 320, "validation": 40, "test": 40}

    train_records = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == list(range(1, 13))
    assert all(TRAIN_KEYS <= set(r) for r in train_records)
    assert all(r["tokens_per_s"] > 0 and r["rss_bytes"] > 0 for r in train_records)
    # Every step carries where its memory goes, counted from tensors: the parts add up to the total.
    for record in train_records:
        parts = [record[key] for key, _ in MEMORY_PARTS]
        assert all(part > 0 for part in parts) and sum(parts) == record["training_memory_bytes"]
    # The base (step 0) and in-training evaluations on the fixed subsample; the final one on the full split.
    evals = [r for r in records if r["kind"] == "eval"]
    assert [(r["step"], r["examples"]) for r in evals] == [(0, 16), (4, 16), (8, 16), (12, 40)]
    assert evals[0]["base"] and evals[-1]["final"]
    assert evals[-1]["accuracy"] == summary["metrics"]["validation"]["accuracy"]

    assert summary["status"] == "completed" and summary["steps"] == 12
    assert summary["metrics"]["validation"] == {key: evals[-1][key] for key in ("accuracy", "macro_f1", "loss")}
    for metrics in (summary["metrics"], summary["base_metrics"]):  # counted over all 40 validation examples
        assert metrics["validation"]["accuracy"] * 40 == pytest.approx(round(metrics["validation"]["accuracy"] * 40))
        assert metrics["validation"]["loss"] > 0
    assert summary["gain"] == pytest.approx(
        summary["metrics"]["validation"]["accuracy"] - summary["base_metrics"]["validation"]["accuracy"]
    )
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert summary["base_weight_memory_bytes"] > 0 and summary["peak_rss_bytes"] > 0
    peak = max(r["training_memory_bytes"] for r in train_records)
    assert summary["training_memory_bytes"] == peak == sum(summary["memory_breakdown"].values())
    # Where the wall time went: loading, evaluating, training and saving add up to it.
    clocks = [summary[key] for key in ("load_time_s", "eval_time_s", "train_time_s", "save_time_s")]
    assert clocks[0] >= REQUEST_AGE_S  # loading counts from when the request began
    assert all(clock > 0 for clock in clocks) and sum(clocks) == pytest.approx(summary["wall_time_s"])
    assert summary["overhead_share"] == pytest.approx((clocks[0] + clocks[1]) / summary["wall_time_s"])
    assert summary["phase"]["name"] == "saving" and summary["eval_examples"] == 16
    assert summary["median_step_time_s"] > 0 and summary["adapter_size_bytes"] > 0
    assert (run.adapter_dir / "adapter_config.json").exists()


def test_the_adapter_reloads_to_the_same_predictions(sentiment_run, tiny_models):
    run = sentiment_run
    # Standard PEFT format: loadable without this project's code paths.
    tokenizer = load_tokenizer(str(run.adapter_dir))
    base = load_model(tiny_models["bert"], "sentiment", tokenizer)
    plain = PeftModel.from_pretrained(base, str(run.adapter_dir)).eval()
    loaded = inference.load_run(run, precision="fp32")  # plain transformers computes in fp32
    assert torch.allclose(
        inference.class_probabilities(plain, tokenizer, CLEAR_REVIEWS, "fp32"),
        inference.class_probabilities(loaded.model, loaded.tokenizer, CLEAR_REVIEWS, loaded.precision),
        atol=1e-6,
    )

    again = _reevaluated_test_metrics(run)
    recorded = run.summary["metrics"]["test"]
    assert again["accuracy"] == recorded["accuracy"]
    assert again["loss"] == pytest.approx(recorded["loss"], abs=1e-5)


def test_training_is_deterministic(store, sentiment_run, tiny_models, review_csv):
    summary = train(sentiment_config(tiny_models, review_csv), store)
    again = next(run for run in store.runs() if run.summary == summary)
    losses = lambda run: [r["loss"] for r in run.metrics() if r["kind"] == "train"]  # noqa: E731
    assert losses(again) == losses(sentiment_run)


def test_a_stop_request_ends_within_one_step_and_keeps_a_usable_adapter(store, tiny_models, review_csv):
    steps_seen = []

    def stop_after_three() -> bool:
        steps_seen.append(1)
        return len(steps_seen) >= 3

    summary = train(sentiment_config(tiny_models, review_csv, max_steps=50), store, should_stop=stop_after_three)
    assert summary["status"] == "stopped" and summary["steps"] == 3
    run = next(run for run in store.runs() if run.summary == summary)
    # the adapter saved at the stop is the trained state of step 3, the one its checkpoint holds
    checkpoint = latest_checkpoint(run)
    assert checkpoint.endswith("checkpoint-3")
    loaded = inference.load_run(run, precision="fp32")
    at_stop = PeftModel.from_pretrained(load_model(tiny_models["bert"], "sentiment", loaded.tokenizer), checkpoint)
    answers = inference.classify(loaded, CLEAR_REVIEWS)
    expected = inference.class_probabilities(at_stop.eval(), loaded.tokenizer, CLEAR_REVIEWS, "fp32")
    for answer, row in zip(answers, expected):
        assert torch.allclose(torch.tensor(list(answer["probabilities"].values())), row, atol=1e-6)
        assert answer["label"] == LABELS[int(row.argmax())]


def test_a_stop_file_in_the_run_folder_stops_the_run(store, tiny_models, review_csv):
    def stop_via_store() -> bool:
        newest = max(store.runs(), key=lambda r: r.summary.get("created_at", 0))
        newest.request_stop()  # what the UI or another process does
        return newest.stop_requested()

    summary = train(sentiment_config(tiny_models, review_csv, max_steps=50), store, should_stop=stop_via_store)
    assert summary["status"] == "stopped" and summary["steps"] == 1


def test_a_failing_run_is_marked_failed_with_its_error(store, tiny_models, review_csv):
    def explode() -> bool:
        raise RuntimeError("disk on fire")

    before = {run.id for run in store.runs()}
    with pytest.raises(RuntimeError):
        train(sentiment_config(tiny_models, review_csv), store, should_stop=explode)
    (failed,) = [run for run in store.runs() if run.id not in before]
    assert failed.summary["status"] == "failed" and "disk on fire" in failed.summary["error"]
    assert not failed.adapter_dir.exists()


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"hparams": {"learning_rate": -1}}, HParamError, "learning_rate must satisfy"),
        ({"hparams": {"rank": 0}}, HParamError, "rank must satisfy"),
        ({"hparams": {"rank": 65}}, HParamError, "rank 65 is larger than layer"),
        ({"method": "sparse-magic"}, HParamError, "unknown method"),
        ({"task": "translation"}, ConfigError, "unknown task"),
        ({"max_steps": 0}, ConfigError, r"steps \(max_steps\) must be a whole number from 1"),
        ({"max_steps": 10, "epochs": 1.0}, ConfigError, r"either steps \(max_steps\) or epochs, not both"),
        ({"max_steps": None, "epochs": -1.0}, ConfigError, "epochs must be in"),
        ({"batch_size": 0}, ConfigError, "batch size must be"),
        ({"seq_len": 2}, ConfigError, r"sequence length \(seq_len\) must be"),
        ({"model": "/nowhere/model"}, ModelError, "does not exist"),
        ({"model": "someone/some-model"}, ModelError, "needs the Hugging Face Hub"),
        ({"dataset": "imdb"}, data.DataError, "unknown dataset"),
    ],
)
def test_bad_requests_are_refused_before_any_run_exists(tmp_path, tiny_models, review_csv, overrides, error, message):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(error, match=message):
        train(sentiment_config(tiny_models, review_csv, **overrides), store)
    assert list(store.runs()) == []


def test_full_fine_tuning_saves_a_model_folder(store, tiny_models, review_csv):
    summary = train(sentiment_config(tiny_models, review_csv, method="full", max_steps=3), store)
    run = next(run for run in store.runs() if run.summary == summary)
    assert (run.adapter_dir / "config.json").exists() and summary["trainable_params"] == summary["total_params"]
    again = _reevaluated_test_metrics(run)  # the saved model folder is the model that was evaluated
    assert again["accuracy"] == summary["metrics"]["test"]["accuracy"]
    assert again["loss"] == pytest.approx(summary["metrics"]["test"]["loss"], abs=1e-5)


def test_generation_run_is_scored_for_sentiment_control_by_a_judge(store, sentiment_run, tiny_models):
    config = TrainConfig(
        task="generation",
        method="qlora",
        model=tiny_models["llama"],
        dataset=data.BUNDLED_REVIEW_WRITING,
        max_steps=4,
        batch_size=4,
        seq_len=48,
        eval_samples=16,
        control_samples=4,
        judge_run=sentiment_run.id,
        offline=True,
    )
    summary = train(config, store)
    assert summary["judge_run"] == sentiment_run.id
    assert summary["metrics"]["validation"]["perplexity"] > 1
    run = next(run for run in store.runs() if run.summary == summary)
    loaded, judge = inference.load_run(run), inference.load_run(sentiment_run)
    # the recorded share again: the reloaded adapter writes the control reviews, the judge reads them
    prompts, wanted = evaluation.control_prompts(4)
    reviews = [
        text if text.strip() else "."
        for text in inference.sample(loaded.model, loaded.tokenizer, prompts, precision=loaded.precision)
    ]
    judged = [LABELS.index(answer["label"]) for answer in inference.classify(judge, reviews)]
    assert summary["metrics"]["control_share"] == sum(j == w for j, w in zip(judged, wanted)) / 4
    (result,) = inference.generate(loaded, [prompts[1]], max_new_tokens=5)
    assert result["text"].strip() and result["latency_s"] > 0


def test_metrics_lines_are_whole_json(sentiment_run):
    lines = (sentiment_run.dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    # 12 steps and 4 evaluations (the base's, every 4 steps, the final one), one object a line
    assert [record["step"] for record in records if record["kind"] == "eval"] == [0, 4, 8, 12]
    assert sum(record["kind"] == "train" for record in records) == 12 and len(records) == 16


def test_sampling_leaves_the_tokenizer_padding_for_training(tiny_models):
    tokenizer = load_tokenizer(tiny_models["llama"])
    model = load_model(tiny_models["llama"], "generation", tokenizer)
    side = tokenizer.padding_side
    inference.sample(model, tokenizer, ["a", "a longer prompt"], precision="fp32", max_new_tokens=2)
    assert tokenizer.padding_side == side


def test_a_stopped_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, tiny_models, review_csv):
    """Stop after 4 of 10 steps, resume: the same run id continues its steps and loss curve and
    ends where an uninterrupted run with the same seed ends."""
    store = RunStore(tmp_path)
    config = sentiment_config(tiny_models, review_csv, max_steps=10, eval_steps=5, checkpoint_steps=3)
    uninterrupted = train(config, store)
    calls = []
    stopped = train(config, store, should_stop=lambda: calls.append(1) or len(calls) >= 4)
    assert stopped["status"] == "stopped" and stopped["steps"] == 4
    run = next(run for run in store.runs() if run.summary.get("steps") == 4)
    assert latest_checkpoint(run).endswith("checkpoint-4")  # saved at the stop, not only every 3 steps

    seen_while_running: list[dict] = []  # what a live view reads at each step of the resumed segment
    resumed = resume(run.id, store, should_stop=lambda: seen_while_running.append(run.summary) and False)
    assert resumed["status"] == "completed" and resumed["steps"] == 10 and resumed["resumed_from_step"] == 4
    # not the stopped segment's end: no steps, metrics, wall time or memory peak until its own end
    ended = ("steps", "metrics", "wall_time_s", "train_time_s", "training_memory_bytes", "finished_at")
    assert seen_while_running and all(summary.get(key) is None for summary in seen_while_running for key in ended)
    steps = [r["step"] for r in run.metrics() if r["kind"] == "train"]
    assert steps == list(range(1, 11))  # no gap, no repeat
    elapsed = [r["elapsed_s"] for r in run.metrics() if r["kind"] == "train"]
    assert elapsed == sorted(elapsed)  # the clock carries on
    assert resumed["metrics"]["test"]["accuracy"] == uninterrupted["metrics"]["test"]["accuracy"]
    assert resumed["metrics"]["test"]["loss"] == pytest.approx(uninterrupted["metrics"]["test"]["loss"], rel=1e-4)
    assert latest_checkpoint(run) is None  # completed: checkpoints removed
    # The rate left out was the method's default; the resumed segment, started from the recorded config, says so too.
    assert resumed["defaults"]["learning_rate"]["source"] == "method default"


def test_only_stopped_interrupted_or_failed_runs_with_a_checkpoint_resume(tmp_path, tiny_models, review_csv):
    store = RunStore(tmp_path)
    train(sentiment_config(tiny_models, review_csv, max_steps=2), store)
    (completed,) = store.runs()
    with pytest.raises(ConfigError, match="is completed; only stopped, interrupted, failed runs"):
        resume(completed.id, store)
    completed.update_summary(status="interrupted")
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        resume(completed.id, store)
    (completed.dir / "checkpoints" / "checkpoint-2").mkdir(parents=True)  # killed while saving
    assert latest_checkpoint(completed) is None
