"""The job manager: training requests wait in a queue and run one at a time, each in its own
worker process (`python -m training train ... --run-id ID`).

A worker process per run keeps the app serving when a run crashes or runs out of memory, gives
each run its own memory figures, and avoids two trainings fighting over the CPU cores (on 2 cores
that made steps 10-20x slower). The manager talks to its workers only through the run store: it
names the run before starting the worker, stops it with the store's stop file, and reads its
progress from `metrics.jsonl` like every other reader. It never imports a UI.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from . import data
from .cli import train_arguments
from .engine import ConfigError, TrainConfig
from .runs import FINISHED, Run, RunStore

JOB_STATES = ("queued", "starting", "running", "finished", "failed", "cancelled")
MAX_QUEUE = int(os.environ.get("LORA_ARENA_MAX_QUEUE", "8"))
PARALLEL_JOBS = int(os.environ.get("LORA_ARENA_PARALLEL_JOBS", "1"))


@dataclass
class Job:
    id: str  # the id its run will have in the store
    config: TrainConfig
    submitted_at: float = field(default_factory=time.time)
    state: str = "queued"
    error: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)


def _die_with_parent() -> None:
    """In the worker, before exec: get SIGKILL when the app dies, so no orphan trains unseen.

    The run it leaves `running` is marked `interrupted` when the app starts again."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _last_error(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1] if lines else "the worker process ended without a message"


class JobManager:
    def __init__(self, store: RunStore, parallel: int = PARALLEL_JOBS, max_queue: int = MAX_QUEUE) -> None:
        self.store, self.parallel, self.max_queue = store, parallel, max_queue
        self.logs = store.root / ".jobs"  # not a run folder: run ids never start with a dot
        self.interrupted = store.mark_interrupted()  # runs an earlier app process left behind
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._changed = threading.Condition()
        # Workers are started from this one long-lived thread: the parent-death signal fires when
        # the thread that started a process exits, so it must not be a short-lived one.
        threading.Thread(target=self._dispatch, name="job-dispatcher", daemon=True).start()

    # -- requests ---------------------------------------------------------------------------

    def submit(self, config: TrainConfig) -> Job:
        """Validate and queue a training request; raises ConfigError/HParamError/DataError, queuing nothing."""
        resolved = config.resolved()
        if resolved.dataset and Path(resolved.dataset).suffix.lower() in (".csv", ".jsonl", ".json"):
            data.load_user_file(Path(resolved.dataset), resolved.task)  # a bad upload fails now, not in a worker
        with self._changed:
            if len(self._queue) >= self.max_queue:
                raise ConfigError(f"the queue is full ({self.max_queue} waiting); try again when a run has finished")
            job = Job(self.store.new_id(resolved.task, resolved.method), config)
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self._changed.notify_all()
        return job

    def stop(self, job_id: str) -> str:
        """Cancel a queued job or stop a running one within one step (its adapter is kept)."""
        with self._changed:
            job = self._jobs.get(job_id)
            if job is None:
                return self._stop_unmanaged(job_id)
            if job.state == "queued":
                self._queue.remove(job_id)
                job.state = "cancelled"
                self._changed.notify_all()
                return f"{job_id}: cancelled before it started"
            if job.state in ("finished", "failed", "cancelled"):
                return f"{job_id}: already {job.state}"
            run_dir = self.store.root / job_id
            if (run_dir / "config.json").exists():
                Run(run_dir).request_stop()
                return f"{job_id}: stopping at the end of the current step"
            job.process.terminate()  # still loading the model: nothing to keep
            job.error = "stopped before training began"
            return f"{job_id}: stopped before training began"

    def _stop_unmanaged(self, run_id: str) -> str:
        """A run started elsewhere (the CLI, an earlier app process) is stopped through its stop file."""
        run = self.store.get(run_id)  # raises RunNotFound for bad or unknown ids
        if run.status != "running":
            return f"{run_id}: already {run.status}"
        run.request_stop()
        return f"{run_id}: stopping at the end of the current step"

    # -- state ----------------------------------------------------------------------------

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start; None when not waiting."""
        with self._changed:
            return self._queue.index(job_id) + 1 if job_id in self._queue else None

    def active(self) -> list[Job]:
        return [job for job in self._jobs.values() if job.state in ("starting", "running")]

    def busy(self) -> bool:
        return bool(self.active())

    def latest(self) -> Job | None:
        """The running job, else the most recently submitted one."""
        jobs = self.active() or list(self._jobs.values())
        return max(jobs, key=lambda job: job.submitted_at, default=None)

    def describe(self, job_id: str) -> dict:
        """The job's state for a UI or API client, merged with its run's summary once it exists."""
        job = self._jobs.get(job_id)
        if job is None:
            summary = self.store.get(job_id).summary  # validates the id; RunNotFound if unknown
        else:
            run_dir = self.store.root / job.id
            summary = Run(run_dir).summary if (run_dir / "config.json").exists() else {}
        state = job.state if job else ("running" if summary.get("status") == "running" else "finished")
        if job and job.state == "starting" and summary:
            state = "running"
        return {
            "id": job_id,
            "state": state,
            "queue_position": self.position(job_id),
            "status": summary.get("status"),
            "error": (job.error if job else None) or summary.get("error"),
            "summary": summary,
        }

    # -- the worker loop --------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            with self._changed:
                while not self._queue or len(self.active()) >= self.parallel:
                    self._changed.wait()
                job = self._jobs[self._queue.popleft()]
                job.state = "starting"
            self._start(job)

    def _start(self, job: Job) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{job.id}.log"
        command = [
            sys.executable,
            "-m",
            "training",
            "--runs-dir",
            str(self.store.root),
            *train_arguments(job.config),
            "--run-id",
            job.id,
        ]
        with open(log_path, "w", encoding="utf-8") as log:
            job.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
                cwd=Path(__file__).resolve().parent.parent,
            )
        threading.Thread(target=self._watch, args=(job, log_path), daemon=True).start()

    def _watch(self, job: Job, log_path: Path) -> None:
        # `running` as soon as the worker has created the run (validation and loading passed).
        while job.process.poll() is None:
            if job.state == "starting" and (self.store.root / job.id / "config.json").exists():
                job.state = "running"
            time.sleep(0.2)
        code = job.process.returncode
        run_dir = self.store.root / job.id
        run = Run(run_dir) if (run_dir / "config.json").exists() else None
        with self._changed:
            if run is not None and run.status not in FINISHED:
                # killed (out of memory, a signal) before the engine could record it
                reason = f"the worker process ended with code {code}: {_last_error(log_path)}"
                run.update_summary(status="failed", error=reason, finished_at=time.time())
            if code == 0:
                job.state = "finished"
            else:
                job.state = "failed"
                job.error = job.error or (run.summary.get("error") if run else None) or _last_error(log_path)
            self._changed.notify_all()
