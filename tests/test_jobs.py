"""The job manager: a queue of training jobs, one worker process at a time, stop, failure, restart."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time

import psutil
import pytest
from conftest import tiny_sentiment_config as config

from lora_methods import HParamError
from training.core.config import ConfigError
from training.core.errors import USER_ERRORS, DataError, ModelError, OwnershipError
from training.core.runs import RunStore
from training.jobs import JobManager, Limits
from training.jobs.manager import owner_hash
from training.research.leaderboard import leaderboard

DONE = ("finished", "failed", "cancelled")


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def manager(tmp_path) -> JobManager:
    return JobManager(RunStore(tmp_path / "runs"))


def test_jobs_queue_and_run_one_at_a_time_and_a_failure_does_not_block_the_next(
    manager, tiny_models, review_csv, tmp_path
):
    # A model folder whose architecture checks out at submit but whose weights are gone: the worker fails.
    weightless = tmp_path / "weightless"
    shutil.copytree(tiny_models["bert"], weightless, ignore=shutil.ignore_patterns("*.safetensors"))
    failing = manager.submit(config(tiny_models, review_csv, model=str(weightless)))
    first = manager.submit(config(tiny_models, review_csv))
    second = manager.submit(config(tiny_models, review_csv, seed=1))
    assert manager.position(second.id) in (1, 2)  # waiting behind the others
    wait_for(lambda: all(job.state in DONE for job in (failing, first, second)), what="three jobs")

    assert failing.state == "failed" and "weightless" in failing.error
    assert not (manager.store.root / failing.id).exists()  # refused before a run was created
    runs = [manager.store.get(job.id) for job in (first, second)]
    assert [run.status for run in runs] == ["completed", "completed"]
    assert runs[1].summary["created_at"] >= runs[0].summary["finished_at"]  # never two at once
    assert manager.describe(first.id)["summary"]["steps"] == 4
    assert manager.actions(first.id) == {"stop": False, "resume": False, "delete": True}  # nothing left to train


def test_stop_ends_a_running_job_within_a_step_and_keeps_its_adapter(manager, tiny_models, review_csv):
    job = manager.submit(config(tiny_models, review_csv, max_steps=2000, eval_steps=1000))
    wait_for(lambda: job.state == "running" and len(manager.store.get(job.id).metrics()) >= 3, what="first steps")
    assert manager.actions(job.id) == {"stop": True, "resume": False, "delete": False}
    assert "stopping" in manager.stop(job.id)
    assert not manager.actions(job.id)["stop"]  # asked once is enough
    wait_for(lambda: job.state in DONE, what="the stop")
    run = manager.store.get(job.id)
    assert job.state == "finished" and run.status == "stopped"
    assert run.summary["steps"] < 2000 and (run.adapter_dir / "adapter_model.safetensors").exists()
    assert manager.actions(job.id) == {"stop": False, "resume": True, "delete": True}  # stopping saved a checkpoint

    # Resumed, it is not "stopping" on the stop it obeyed; a stop while it loads cancels the resume
    # at once (no load to wait out, no step trained) and leaves the run as it was, resumable.
    steps = run.summary["steps"]
    manager.resume(job.id)
    assert not manager.describe(job.id)["stop_requested"] and manager.actions(job.id)["stop"]
    wait_for(lambda: manager.job(job.id).state == "starting", what="the resume to start loading")
    assert "cancelled while its model loaded" in manager.stop(job.id)
    wait_for(lambda: manager.job(job.id).state in DONE, what="the resumed run's stop")
    resumed = manager.store.get(job.id)
    assert manager.job(job.id).state == "cancelled" and resumed.status == "stopped"
    assert resumed.summary["steps"] == steps and manager.actions(job.id)["resume"]


def test_a_killed_worker_marks_its_run_failed_and_the_manager_goes_on(manager, tiny_models, review_csv):
    job = manager.submit(config(tiny_models, review_csv, max_steps=2000, eval_steps=1000))
    wait_for(lambda: job.state == "running" and manager.store.get(job.id).metrics(), what="the first step")
    os.kill(job.process.pid, signal.SIGKILL)  # what the kernel does when a run runs out of memory
    wait_for(lambda: job.state in DONE, what="the failure")
    run = manager.store.get(job.id)
    assert job.state == "failed" and run.status == "failed"
    assert f"code {-signal.SIGKILL}" in run.summary["error"]
    assert run.metrics()  # its history is kept
    assert not manager.busy()


def test_a_standby_worker_takes_the_next_run_with_its_libraries_imported_and_writes_the_run_log(
    tmp_path, tiny_models, review_csv, monkeypatch
):
    manager = JobManager(RunStore(tmp_path / "runs"), standby=True)
    try:
        standby_log = manager.logs / "standby.log"
        wait_for(lambda: standby_log.exists() and "waiting" in standby_log.read_text(), what="the standby's imports")
        spare = manager.spare.process
        spare_started_at, submitted_at = psutil.Process(spare.pid).create_time(), time.time()
        job = manager.submit(config(tiny_models, review_csv))
        wait_for(lambda: job.state in DONE, what="the run")
        assert job.state == "finished" and job.process is spare
        run = manager.store.get(job.id)
        assert run.status == "completed" and run.summary["pid"] == spare.pid
        # Loading counts from the request: the spare's imports and its wait before it are not the run's.
        assert 0 < run.summary["load_time_s"] < submitted_at - spare_started_at
        last_line = (manager.logs / f"{job.id}.log").read_text().splitlines()[-1]
        assert json.loads(last_line)["status"] == "completed"  # the run's output in its own log

        wait_for(lambda: manager.spare is not None, what="a new standby once nothing trains")
        second_spare = manager.spare.process
        assert second_spare is not spare
        monkeypatch.setenv("LORA_ARENA_UNRELATED_SETTING", "1")  # a run gets the environment of its request
        job = manager.submit(config(tiny_models, review_csv, seed=1))
        wait_for(lambda: job.process is not None, what="the second run's worker")
        assert job.process is not second_spare and second_spare.wait(timeout=10) is not None  # let go
        assert "cancelled" in manager.stop(job.id)  # a fresh worker, still importing: ended at once
        wait_for(lambda: job.state in DONE, what="the second run's end")
        assert job.state == "cancelled" and not job.error  # asked for: not a failure
        wait_for(lambda: manager.spare is not None, what="a standby with the new environment")
        last_spare = manager.spare.process
    finally:
        manager.close()
    assert last_spare.poll() is not None and manager.spare is None  # let go with the manager


def test_cancelling_a_queued_job_and_stopping_unknown_ids(manager, tiny_models, review_csv):
    manager.parallel = 0  # hold the queue still
    job = manager.submit(config(tiny_models, review_csv))
    assert manager.position(job.id) == 1
    assert manager.actions(job.id) == {"stop": True, "resume": False, "delete": False}
    with pytest.raises(ConfigError, match="is queued and has not begun training; stop it to cancel it"):
        manager.delete(job.id)
    assert "cancelled" in manager.stop(job.id) and job.state == "cancelled" and manager.position(job.id) is None
    with pytest.raises(ConfigError, match="ended before it began training \\(cancelled\\)"):
        manager.resume(job.id)  # not "no run": the page has just shown this id
    assert manager.actions(job.id) == {"stop": False, "resume": False, "delete": True}  # off the lists, no folder
    assert "removed" in manager.delete(job.id) and manager.job(job.id) is None
    with pytest.raises(LookupError, match="not a valid run id"):
        manager.stop("../../etc")
    with pytest.raises(LookupError, match="no run"):
        manager.describe("20990101-000000-sentiment-lora-0000")


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"hparams": {"rank": 0}}, HParamError, "rank must satisfy"),
        ({"hparams": {"learning_rate": -1e-3}}, HParamError, "learning_rate must satisfy"),
        ({"method": "magic"}, HParamError, "unknown method"),
        ({"max_steps": 0}, ConfigError, r"steps \(max_steps\) must be"),
        ({"dataset": "missing.csv"}, DataError, "does not exist"),
        ({"hparams": {"target_modules": " , "}}, HParamError, "names no module"),
        ({"hparams": {"target_modules": ["query", "nowhere"]}}, HParamError, "nowhere not found"),
        ({"model": "distilbert/distilgpt2"}, ModelError, "is a generation model, not a sentiment one"),
        ({"method": "sparselora", "hparams": {"layer_sparsity": "0.5,0.5,0.5"}}, HParamError, "needs 2 numbers"),
        ({"method": "sparselora", "hparams": {"layer_sparsity": "0.5,nan"}}, HParamError, "\\[0, 1\\) \\(got nan\\)"),
    ],
)
def test_bad_requests_are_refused_at_submit_and_queue_nothing(
    manager, tiny_models, review_csv, overrides, error, message
):
    manager.parallel = 0
    with pytest.raises(error, match=message) as refused:
        manager.submit(config(tiny_models, review_csv, **overrides))
    assert isinstance(refused.value, USER_ERRORS)  # shown as a message in the UI, one line in the CLI
    assert manager.latest() is None and not list(manager.store.runs())


def test_runs_left_running_by_a_dead_process_are_marked_interrupted_on_start(tmp_path):
    store = RunStore(tmp_path)
    orphan, alive = (
        store.create({"task": "sentiment", "method": "lora"}),
        store.create({"task": "sentiment", "method": "lora"}),
    )
    dead = subprocess.Popen(["true"])
    dead.wait()
    orphan.update_summary(pid=dead.pid)  # its process is gone; `alive` carries this test's pid
    orphan.append_metrics({"kind": "train", "step": 1, "loss": 0.7})
    manager = JobManager(store)
    assert manager.interrupted == [orphan.id]
    assert orphan.status == "interrupted" and orphan.metrics() == [{"kind": "train", "step": 1, "loss": 0.7}]
    assert alive.status == "running"


def test_a_run_another_process_started_reads_failed_or_finished_as_its_own_jobs_would(tmp_path):
    store = RunStore(tmp_path)
    statuses = ("completed", "stopped", "failed", "interrupted")
    runs = {status: store.create({"task": "sentiment", "method": "lora"}) for status in statuses}
    for status, run in runs.items():
        run.update_summary(status=status)
    runs["no summary yet"] = store.create({"task": "sentiment", "method": "lora"})
    (runs["no summary yet"].dir / "summary.json").unlink()  # as between the worker's two writes
    manager = JobManager(store)
    assert {status: manager.describe(run.id)["state"] for status, run in runs.items()} == {
        "completed": "finished",
        "stopped": "finished",
        # a client polling for the end stops on these as on a job of its own whose worker died
        "failed": "failed",
        "interrupted": "failed",
        "no summary yet": "running",
    }


def test_listing_runs_while_another_tab_deletes_them_never_fails(tmp_path):
    store = RunStore(tmp_path)
    manager = JobManager(store)
    ids = [f"run-{index:03d}" for index in range(80)]
    for run_id in ids:
        run = store.create({"task": "sentiment", "method": "lora", "owner": owner_hash("alice")}, run_id=run_id)
        run.update_summary(status="completed", finished_at=time.time())
        run.append_metrics({"kind": "train", "step": 1, "loss": 0.7})
        (run.dir / "adapter").mkdir()
        for index in range(20):  # a folder that takes a while to remove, as a real adapter's does
            (run.dir / "adapter" / f"shard-{index}.bin").write_bytes(b"0" * 4096)
    deleter = threading.Thread(target=lambda: [manager.delete(run_id, "alice") for run_id in ids])
    deleter.start()
    listings = 0
    while deleter.is_alive():  # what the deleting tab's other tabs do on every tick
        assert {row["id"] for row in manager.owned_by("alice")} <= set(ids)
        assert set(leaderboard(store)["run"]) <= set(ids)
        listings += 1
    deleter.join()
    assert listings > 5, "the deletions ended before the listings could race them"
    assert manager.owned_by("alice") == [] and leaderboard(store).empty and not list(tmp_path.iterdir())


def test_requests_over_the_deployment_limits_are_refused_with_the_limit_named(tmp_path, tiny_models, review_csv):
    manager = JobManager(RunStore(tmp_path), parallel=0, limits=Limits(max_steps=100, max_seq_len=64, max_queue=1))
    with pytest.raises(
        ConfigError, match=r"steps \(max_steps\) 101 is over this deployment's limit of 100 .LORA_ARENA_MAX_STEPS"
    ):
        manager.submit(config(tiny_models, review_csv, max_steps=101))
    with pytest.raises(ConfigError, match=r"sequence length \(seq_len\) 128 is over .* limit of 64"):
        manager.submit(config(tiny_models, review_csv, seq_len=128))
    with pytest.raises(ConfigError, match="step budget"):
        manager.submit(config(tiny_models, review_csv, max_steps=None, epochs=1.0))
    manager.submit(config(tiny_models, review_csv))
    with pytest.raises(ConfigError, match="the queue is full .1 waiting, LORA_ARENA_MAX_QUEUE"):
        manager.submit(config(tiny_models, review_csv))


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORA_ARENA_MAX_STEPS", "50")
    monkeypatch.setenv("LORA_ARENA_MAX_QUEUE", "2")
    assert Limits.from_env() == Limits(max_steps=50, max_queue=2)


def test_only_the_owner_stops_resumes_or_deletes_a_run(manager, tiny_models, review_csv):
    job = manager.submit(config(tiny_models, review_csv, max_steps=2000, eval_steps=1000), owner_token="alice")
    assert job.config.owner != "alice"  # only a hash is kept
    wait_for(lambda: job.state == "running" and manager.store.get(job.id).metrics(), what="the first step")
    for token, refusal in ((None, "give its owner_token"), ("mallory", "started by another session")):
        with pytest.raises(OwnershipError, match=refusal):
            manager.stop(job.id, token)
    with pytest.raises(ConfigError, match="stop it before deleting it"):
        manager.delete(job.id, "alice")
    manager.stop(job.id, "alice")
    wait_for(lambda: job.state in DONE, what="the stop")
    run = manager.store.get(job.id)
    assert run.status == "stopped" and run.config["owner"] == job.config.owner

    with pytest.raises(OwnershipError):
        manager.resume(job.id, "mallory")
    resumed = manager.resume(job.id, "alice")
    wait_for(lambda: resumed.state == "running", what="the resume")
    manager.stop(job.id, "alice")
    wait_for(lambda: resumed.state in DONE, what="the second stop")
    steps = [r["step"] for r in run.metrics() if r["kind"] == "train"]
    assert steps == list(range(1, len(steps) + 1)) and run.summary["resumed_from_step"] >= 1

    with pytest.raises(OwnershipError):
        manager.delete(job.id, "mallory")
    assert "deleted" in manager.delete(job.id, "alice") and not run.dir.exists()
