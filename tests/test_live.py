"""What a live view reads while a run trains: phases with their progress, stop in any phase, the
ETA with evaluations, defaults that learn, this browser's runs, checks before a run is queued."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from test_engine import sentiment_config

from lora_methods import HParamError
from training.core import evaluation, progress
from training.core.config import TrainConfig
from training.core.defaults import hparam_defaults, note
from training.core.models import BUNDLED_MINILM
from training.core.runs import Run, RunStore, latest_checkpoint
from training.engine import recorder, train, with_tuned_defaults
from training.jobs import JobManager


def after_each_batch(monkeypatch, observe: Callable[[], None]) -> None:
    """Call `observe` after every evaluation batch, before the engine takes in the batch's progress."""
    real = evaluation.evaluate_examples

    def evaluate_examples(model, records, collate, task, precision="fp32", batch_size=None, on_batch=None):
        def observed(done: int) -> None:
            observe()
            if on_batch is not None:
                on_batch(done)

        return real(model, records, collate, task, precision, batch_size, observed)

    monkeypatch.setattr(evaluation, "evaluate_examples", evaluate_examples)


def stop_during(phase_name: str, store: RunStore, monkeypatch) -> list[str]:
    """Request a stop through the run store (as the UI does) at the first batch of the first
    evaluation in `phase_name`; the phases seen on the way, for the test to check."""
    seen: list[str] = []

    def observe() -> None:
        run = next(store.runs())
        phase = run.summary.get("phase", {}).get("name")
        seen.append(phase)
        if phase == phase_name:
            run.request_stop()

    after_each_batch(monkeypatch, observe)
    return seen


@pytest.mark.parametrize("phase", ["base evaluation", "evaluation", "final evaluation"])
def test_a_stop_during_an_evaluation_ends_the_run_at_once(tmp_path, tiny_models, review_csv, monkeypatch, phase):
    store = RunStore(tmp_path)
    seen = stop_during(phase, store, monkeypatch)
    # 40 validation examples in batches of 32: the stop is seen after the first of two batches.
    summary = train(sentiment_config(tiny_models, review_csv, eval_subsample=40), store)
    run = next(store.runs())
    evals = [(r["step"], r.get("final", False)) for r in run.metrics() if r["kind"] == "eval"]
    assert summary["status"] == "stopped" and summary["metrics"] is None
    assert seen.count(phase) == 1  # no batch ran after the one that saw the stop
    if phase == "base evaluation":
        assert summary["steps"] == 0 and evals == [] and not run.adapter_dir.exists()
    elif phase == "evaluation":  # the step-4 evaluation is dropped; the run stops there, resumable
        assert summary["steps"] == 4 and evals == [(0, False)]
        assert latest_checkpoint(run).endswith("checkpoint-4") and run.adapter_dir.is_dir()
    else:  # trained to the end; no final figures, the adapter kept
        assert summary["steps"] == 12 and (12, True) not in evals and run.adapter_dir.is_dir()


def test_the_phases_a_run_goes_through_are_written_for_live_views(tmp_path, tiny_models, review_csv, monkeypatch):
    store = RunStore(tmp_path)
    phases: list[tuple[str, int | None]] = []

    def observe() -> None:
        phase = next(store.runs()).summary["phase"]
        phases.append((phase["name"], phase["step"], phase["total"]))
        assert phase["started_at"] > 0

    after_each_batch(monkeypatch, observe)
    written_training_steps: list[int] = []  # what a live view reads as "step N / total", as it was written
    update_summary = Run.update_summary

    def record(run: Run, **fields) -> dict:
        if fields.get("phase", {}).get("name") == "training":
            written_training_steps.append(fields["phase"]["done"])
        return update_summary(run, **fields)

    monkeypatch.setattr(Run, "update_summary", record)
    monkeypatch.setattr(recorder, "PHASE_WRITE_INTERVAL_S", 1e9)  # the writes that begin a phase only
    train(sentiment_config(tiny_models, review_csv), store)
    # base: the whole validation set (the gain compares like with like), in training: the fixed
    # subsample, final: validation and test
    assert written_training_steps == [0, 4, 8]  # each training phase starts at the step reached, not at 0
    assert list(dict.fromkeys(phases)) == [
        ("base evaluation", None, 40),
        ("evaluation", 4, 16),
        ("evaluation", 8, 16),
        ("final evaluation", 12, 80),
    ]


def test_the_eta_counts_the_steps_and_evaluations_still_to_come():
    summary = {
        "planned_steps": 100,
        "eval_steps": 20,
        "eval_examples": 200,
        "final_eval_examples": 1000,
        "eval_s_per_example": 0.01,
        "control_time_s": 5.0,
        "phase": {"name": "training", "done": 30, "total": 100},
    }
    records = [{"kind": "train", "step": step, "step_time_s": 0.5} for step in range(1, 31)]
    # 70 steps, evaluations at 40, 60 and 80 (200 examples each), the final one (1000) with its control
    assert progress.eta_seconds(summary, records) == pytest.approx(70 * 0.5 + 3 * 2.0 + 10.0 + 5.0)
    during = {**summary, "phase": {"name": "final evaluation", "done": 400, "total": 1000}}
    assert progress.eta_seconds(during, records) == pytest.approx(6.0 + 5.0)  # the control's reviews still to come
    control = {**summary, "phase": {"name": "sentiment control", "step": 100, "started_at": time.time() - 2.0}}
    assert progress.eta_seconds(control, records) == pytest.approx(3.0, abs=0.5)  # as long as the base's took
    # Evaluating at step 40, before step 40's record: 60 steps, the rest of this evaluation, then 60 and 80
    at_40 = {**summary, "phase": {"name": "evaluation", "step": 40, "done": 50, "total": 200}}
    before_its_record = [{"kind": "train", "step": step, "step_time_s": 0.5} for step in range(1, 40)]
    assert progress.steps_trained(at_40, before_its_record) == 40
    assert progress.eta_seconds(at_40, before_its_record) == pytest.approx(60 * 0.5 + 1.5 + 2 * 2.0 + 10.0 + 5.0)
    assert progress.eta_seconds({**summary, "eval_s_per_example": None}, records) is None


@pytest.mark.parametrize(
    "described, line",
    [
        ({"state": "queued", "queue_position": 2}, "Queued: position 2 in line"),
        ({"state": "starting", "summary": {}}, "Loading the model and data"),
        (
            {"state": "running", "summary": {"phase": {"name": "base evaluation", "done": 64, "total": 1275}}},
            "Evaluating the base model: 64 / 1275 examples",
        ),
        (
            {"state": "running", "summary": {"phase": {"name": "evaluation", "step": 48, "done": 96, "total": 256}}},
            "Evaluating at step 48: 96 / 256 examples",
        ),
        (
            {"state": "running", "summary": {"phase": {"name": "sentiment control", "step": 60, "total": 32}}},
            "Sentiment control: writing 32 reviews and judging their sentiment",
        ),
        (
            {"state": "running", "summary": {"phase": {"name": "training", "done": 12, "total": 120}}},
            "Training: step 12 / 120",
        ),
        ({"state": "running", "stop_requested": True, "summary": {"phase": {"name": "evaluation"}}}, "Stopping…"),
        ({"state": "finished", "status": "stopped", "summary": {}}, "Stopped"),
        ({"state": "cancelled", "status": None, "summary": {}}, "Cancelled before it started"),
        ({"state": "cancelled", "status": "stopped", "summary": {"status": "stopped"}}, "Stopped (its resume was"),
    ],
)
def test_the_phase_line_says_what_the_run_is_doing(described, line):
    assert progress.phase_line(described).startswith(line)


def test_the_phase_line_and_the_progress_line_say_the_same_step():
    # the phase is written every few seconds; step 7's record came after it said 5
    described = {
        "state": "running",
        "summary": {"planned_steps": 30, "phase": {"name": "training", "done": 5, "total": 30}},
    }
    records = [{"kind": "train", "step": step, "step_time_s": 0.5} for step in range(1, 8)]
    assert progress.phase_line(described, records) == "Training: step 7 / 30"
    assert progress.steps_trained(described["summary"], records) == 7  # what the progress line says


def test_defaults_are_the_results_suites_tuned_rates_where_it_tuned_this_model():
    # The suite swept LoRA on the bundled MiniLM and chose 4e-3; QLoRA and SparseLoRA train the same
    # adapter and take LoRA's rate, HiRA on 4-bit takes HiRA's.
    assert hparam_defaults("sentiment", BUNDLED_MINILM, "lora")["learning_rate"] == 4e-3
    assert hparam_defaults("sentiment", BUNDLED_MINILM, "qlora")["learning_rate"] == 4e-3
    assert hparam_defaults("sentiment", BUNDLED_MINILM, "hira-4bit")["learning_rate"] == 2e-2
    assert "tuned" in note("sentiment", BUNDLED_MINILM, "lora")
    untuned = hparam_defaults("sentiment", "distilbert/distilbert-base-uncased", "lora")
    assert untuned["learning_rate"] == 1e-3 and "no tuned rate" in note("sentiment", "some/model", "lora")

    config = TrainConfig(task="sentiment", method="lora", hparams={"rank": 4})
    assert with_tuned_defaults(config, BUNDLED_MINILM).hparams["learning_rate"] == 4e-3
    given = TrainConfig(task="sentiment", method="lora", hparams={"learning_rate": 1e-3})
    assert with_tuned_defaults(given, BUNDLED_MINILM).hparams["learning_rate"] == 1e-3


def test_a_browser_lists_only_its_own_runs_and_sees_the_queue(tmp_path, tiny_models, review_csv):
    manager = JobManager(RunStore(tmp_path / "runs"), parallel=0)  # nothing starts: everything waits
    alice = [manager.submit(sentiment_config(tiny_models, review_csv), owner_token="alice") for _ in range(2)]
    bob = manager.submit(sentiment_config(tiny_models, review_csv, method="hira"), owner_token="bob")
    listed = manager.owned_by("alice")
    assert [run["id"] for run in listed] == [alice[1].id, alice[0].id]  # newest first
    assert [run["queue_position"] for run in listed] == [2, 1] and listed[0]["method"] == "lora"
    assert [run["id"] for run in manager.owned_by("bob")] == [bob.id] and manager.owned_by("carol") == []
    assert [(job["position"], job["method"]) for job in manager.waiting()] == [(1, "lora"), (2, "lora"), (3, "hira")]


def test_target_modules_the_model_lacks_are_refused_before_anything_is_queued(tmp_path, tiny_models, review_csv):
    manager = JobManager(RunStore(tmp_path / "runs"), parallel=0)
    bad = sentiment_config(tiny_models, review_csv, hparams={"target_modules": "nonexistent_layer"})
    with pytest.raises(HParamError, match="nonexistent_layer not found in this bert model; available: "):
        manager.submit(bad)
    with pytest.raises(HParamError, match="rank 100 is larger than layer"):
        manager.submit(sentiment_config(tiny_models, review_csv, hparams={"rank": 100}))
    assert manager.waiting() == [] and not list(manager.store.runs())


def test_a_base_measured_once_in_a_store_serves_every_later_run_of_the_same_base(
    tmp_path, tiny_models, review_csv, monkeypatch
):
    store = RunStore(tmp_path)
    first = train(sentiment_config(tiny_models, review_csv), store)
    evaluated: list[str] = []
    after_each_batch(
        monkeypatch,
        lambda: evaluated.append(next(run for run in store.runs() if run.status == "running").summary["phase"]["name"]),
    )
    # HiRA starts as the identity on the same base: its base metrics are LoRA's, not measured again.
    again = train(sentiment_config(tiny_models, review_csv, method="hira"), store)
    assert "base evaluation" not in evaluated and again["base_metrics"] == first["base_metrics"]
    assert again["base_metrics_from"] == next(run.id for run in store.runs() if run.summary == first)
    # Another seed draws another classification head: measured anew.
    evaluated.clear()
    other = train(sentiment_config(tiny_models, review_csv, seed=1), store)
    assert "base evaluation" in evaluated and "base_metrics_from" not in other
