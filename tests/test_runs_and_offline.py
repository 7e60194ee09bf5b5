"""The run store's guarantees and the offline switch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from training.core import offline
from training.core.errors import ModelError
from training.core.models import BUNDLED_MINILM, BUNDLED_SMOLLM2, default_model, resolve_model_path
from training.core.runs import Run, RunNotFound, RunStore
from ui.arena import Arena


def test_run_ids_cannot_reach_outside_the_store(tmp_path):
    store = RunStore(tmp_path)
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200, "..", "a\\b"):
        with pytest.raises(RunNotFound):
            store.get(bad)
    with pytest.raises(RunNotFound, match="no run 'missing'"):
        store.get("missing")


def test_a_run_damaged_outside_the_app_is_left_out_or_marked_and_every_listing_goes_on(tmp_path, capsys):
    from training.cli import main
    from training.research.leaderboard import leaderboard

    store = RunStore(tmp_path)
    good, cut, latin, listed = (store.create({"task": "sentiment", "method": "lora"}) for _ in range(4))
    for run in (good, cut, latin, listed):
        run.update_summary(status="completed")
    (cut.dir / "config.json").write_text('{"run_id": "cut", "ta', encoding="utf-8")
    (latin.dir / "config.json").write_bytes(b'{"task": "caf\xe9"}')
    (listed.dir / "summary.json").write_text("[]", encoding="utf-8")

    assert [run.id for run in store.runs()] == sorted([good.id, listed.id])
    assert listed.summary["status"] == "unreadable" and "holds no JSON object" in listed.summary["error"]
    reasons = store.unreadable()
    assert len(reasons) == 2 and all("repair it or delete the run's folder" in reason for reason in reasons)
    with pytest.raises(RunNotFound, match="cannot be read"):
        store.get(cut.id).config
    Arena(str(tmp_path))  # the app starts (it marked runs of dead processes on this store before)
    assert leaderboard(store).set_index("run").loc[listed.id, "status"] == "unreadable"
    assert main(["--runs-dir", str(tmp_path), "list"]) == 0
    out, err = capsys.readouterr()
    assert good.id in out and listed.id in out and err.count("left out: ") == 2 and cut.id in err


def test_the_command_line_lists_a_run_whose_process_died_as_interrupted(tmp_path, capsys):
    import subprocess

    from training.cli import main

    run = RunStore(tmp_path).create({"task": "sentiment", "method": "lora"})  # status running, this pid
    dead = subprocess.Popen(["true"])
    dead.wait()
    run.update_summary(pid=dead.pid)  # a `train` killed in its terminal, no app to notice
    assert main(["--runs-dir", str(tmp_path), "list"]) == 0
    assert "interrupted" in capsys.readouterr().out and run.status == "interrupted"


def test_summary_updates_are_whole_and_metrics_skip_a_partial_line(tmp_path):
    store = RunStore(tmp_path)
    run = store.create({"task": "sentiment", "method": "lora"})
    assert store.get(run.id).summary["status"] == "running"
    run.update_summary(status="completed", steps=3)
    assert run.summary["status"] == "completed" and "created_at" in run.summary
    run.append_metrics({"step": 1, "loss": 0.5})
    with open(run.dir / "metrics.jsonl", "a") as file:
        file.write('{"step": 2, "lo')  # a writer caught mid-line
    assert run.metrics() == [{"step": 1, "loss": 0.5}]
    assert not [p for p in run.dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def keep_in_place(run, step: int) -> None:
    """`keep_metrics_until`'s rewrite, into the same inode: what a reader sees when the
    filesystem gives the new file the old one's inode."""
    path = run.dir / "metrics.jsonl"
    inode = path.stat().st_ino
    kept = [line for line in path.read_text().splitlines(keepends=True) if json.loads(line)["step"] <= step]
    path.write_text("".join(kept))
    assert path.stat().st_ino == inode


@pytest.mark.parametrize("rewrite", [Run.keep_metrics_until, keep_in_place], ids=["new-file", "same-inode"])
def test_a_live_view_follows_a_resume_that_rewrites_the_metrics(tmp_path, rewrite):
    arena = Arena(str(tmp_path))  # what the page and the API read a run's metrics through
    run = arena.store.create({"task": "sentiment", "method": "lora"})
    for step in range(1, 14):  # the killed run logged up to step 13; its checkpoint is at 10
        run.append_metrics({"step": step, "loss": 1.0})
    assert len(arena.records(run.id)) == 13
    rewrite(run, 10)  # the resume
    for step in range(11, 16):  # retrained, with their own losses
        run.append_metrics({"step": step, "loss": 0.5})
    expected = [(step, 1.0) for step in range(1, 11)] + [(step, 0.5) for step in range(11, 16)]
    assert [(r["step"], r["loss"]) for r in arena.records(run.id)] == expected
    run.append_metrics({"step": 16, "loss": 0.4})
    assert [(r["step"], r["loss"]) for r in arena.records(run.id)] == [*expected, (16, 0.4)]


def test_offline_defaults_to_bundled_models(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert offline.is_offline()
    assert default_model("sentiment", offline=True) == BUNDLED_MINILM
    assert default_model("generation", offline=True) == BUNDLED_SMOLLM2
    assert default_model("sentiment", offline=False) == "distilbert/distilbert-base-uncased"
    with pytest.raises(ModelError, match="needs the Hugging Face Hub.*bundled/all-MiniLM-L6-v2"):
        resolve_model_path("distilbert/distilbert-base-uncased", offline=True)


def test_a_process_says_once_that_it_is_offline_and_why():
    # --offline first, after which the process has set HF_HUB_OFFLINE itself: one notice, not two
    script = "from training.core.offline import is_offline; is_offline(True); is_offline(); is_offline(True)"
    environment = {
        key: value for key, value in os.environ.items() if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=60)
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "is offline" in line] == [
        "LoRA Arena is offline (--offline): using the bundled models and data."
    ]


@pytest.fixture
def hub_probe():
    """offline.hub_reachable, asked afresh (it decides once per process)."""
    offline.hub_reachable.cache_clear()
    yield offline.hub_reachable
    offline.hub_reachable.cache_clear()


def test_the_hub_probe_gives_up_quickly(monkeypatch, hub_probe):
    def hang(*args, **kwargs):
        time.sleep(30)
        raise TimeoutError("timed out")  # as a real connection would, so the probe's thread ends cleanly

    monkeypatch.setattr(offline.socket, "create_connection", hang)
    monkeypatch.setattr(offline, "PROBE_TIMEOUT_S", 0.5)
    monkeypatch.setenv("HF_ENDPOINT", "https://example.invalid")
    started = time.perf_counter()
    assert hub_probe() is False
    assert time.perf_counter() - started < 2


def test_the_hub_probe_sees_a_refused_connection(monkeypatch, hub_probe, unused_port):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{unused_port}")
    assert hub_probe() is False


@pytest.fixture
def unused_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
