"""The job manager: training requests wait in a queue and run one at a time, each in its own
worker process (`python -m training train ... --run-id ID`).

With `standby`, while nothing trains the manager keeps one more process ready (`python -m
training standby`), its libraries already imported, and hands it the next run: the run skips
about 6-7 s of imports. Only while nothing trains, so that its imports never take a core from a run.

A worker process per run keeps the app serving when a run crashes or runs out of memory, gives
each run its own memory figures, and avoids two trainings fighting over the CPU cores (on 2 cores
that made steps 10-20x slower). The manager talks to its workers only through the run store: it
names the run before starting the worker, stops it with the store's stop file, and reads its
progress from `metrics.jsonl` like every other reader. It never imports a UI.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO

import psutil

from training.core import data, distributed, models
from training.core.config import FIELDS, ConfigError, TrainConfig, train_arguments
from training.core.environment import die_with_parent, process_slots
from training.core.errors import OwnershipError
from training.core.runs import FINISHED, Run, RunNotFound, RunStore, resumable

JOB_STATES = ("queued", "starting", "running", "finished", "failed", "cancelled")
PARALLEL_JOBS = int(os.environ.get("LORA_ARENA_PARALLEL_JOBS", "1"))
LOG = logging.getLogger("lora_arena")  # the app's server log


def owner_hash(token: str) -> str:
    """What a run records of its owner: a hash, never the session's token itself."""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Limits:
    """What one request may ask of a shared deployment; each is an environment variable."""

    max_steps: int = 2000  # LORA_ARENA_MAX_STEPS
    max_seq_len: int = 512  # LORA_ARENA_MAX_SEQ_LEN
    max_batch_size: int = 64  # LORA_ARENA_MAX_BATCH_SIZE
    max_queue: int = 8  # LORA_ARENA_MAX_QUEUE: jobs waiting at once
    max_processes: int = field(default_factory=process_slots)  # LORA_ARENA_MAX_PROCESSES: per run

    @classmethod
    def from_env(cls) -> Limits:
        values = {}
        for spec in fields(cls):
            variable = f"LORA_ARENA_{spec.name.upper()}"
            if variable in os.environ:
                values[spec.name] = int(os.environ[variable])
        return cls(**values)

    def check(self, config: TrainConfig) -> None:
        """Raise ConfigError naming the limit (and its variable) that `config` (resolved) exceeds."""
        if config.epochs is not None:
            raise ConfigError("this deployment takes a step budget (max_steps), not epochs")
        for name, value, limit in (
            ("max_steps", config.max_steps, self.max_steps),
            ("seq_len", config.seq_len, self.max_seq_len),
            ("batch_size", config.batch_size, self.max_batch_size),
            ("processes", config.processes, self.max_processes),
        ):
            if value > limit:
                variable = "LORA_ARENA_MAX_" + ("STEPS" if name == "max_steps" else name.upper())
                raise ConfigError(
                    f"{FIELDS[name].called} {value} is over this deployment's limit of {limit} ({variable})"
                )


@dataclass
class Job:
    id: str  # the id its run has (or will have) in the store
    config: TrainConfig
    resume: bool = False  # continue the existing run from its checkpoint
    submitted_at: float = field(default_factory=time.time)
    state: str = "queued"
    error: str | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    stopped_while_loading: bool = False  # its process was ended on request: it ends cancelled, not failed


def _state_of(status: str | None) -> str:
    """The job state of a run this process did not start (the CLI's, or an earlier app's), as a job
    of its own would have ended: failed when its process died or its files are damaged (a killed
    worker's job fails too), finished when it completed or was stopped."""
    if status in (None, "running"):  # None: created, its summary not yet written
        return "running"
    return "failed" if status in ("failed", "interrupted", "unreadable") else "finished"


def _process_tree(pid: int) -> set[int]:
    """`pid` and its descendants: a worker, or a launcher and the training processes it started."""
    try:
        return {pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return {pid}


def _last_error(*logs: Path) -> str:
    """The worker's error line, else its last line, from its output across `logs` (in order)."""
    text = "\n".join(log.read_text(encoding="utf-8", errors="replace") for log in logs if log.exists())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    return lines[-1] if lines else "the worker process ended without a message"


def _spawn(command: list[str], log: IO[str], stdin: int, environment: dict[str, str] | None) -> subprocess.Popen:
    """A worker process: its output into `log`, killed if this process dies, run from the project root."""
    return subprocess.Popen(
        command,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=stdin,
        env=environment,
        preexec_fn=die_with_parent,
        cwd=Path(__file__).resolve().parents[2],  # the project root, where `-m training` resolves
    )


@dataclass
class Spare:
    """A standby worker and the environment it started with (a run gets the environment of its request)."""

    process: subprocess.Popen
    environment: dict[str, str]


class JobManager:
    def __init__(
        self, store: RunStore, parallel: int = PARALLEL_JOBS, limits: Limits | None = None, standby: bool = False
    ) -> None:
        """`standby`: keep a worker process ready while nothing trains (see the module's docstring);
        `close` lets it go."""
        self.store, self.parallel, self.limits, self.standby = store, parallel, limits or Limits.from_env(), standby
        self.logs = store.root / ".jobs"  # not a run folder: run ids never start with a dot
        self.spare: Spare | None = None
        self.interrupted = store.mark_interrupted()  # runs an earlier app process left behind
        self._jobs: dict[str, Job] = {}
        self._queue: deque[str] = deque()
        self._changed = threading.Condition()
        # Workers are started from this one long-lived thread: the parent-death signal fires when
        # the thread that started a process exits, so it must not be a short-lived one.
        threading.Thread(target=self._dispatch, name="job-dispatcher", daemon=True).start()

    # -- requests ---------------------------------------------------------------------------

    def submit(self, config: TrainConfig, owner_token: str | None = None) -> Job:
        """Validate and queue a training request; raises ConfigError/HParamError/DataError, queuing
        nothing. With `owner_token`, only the same token may later stop, resume or delete the run."""
        resolved = config.resolved()
        self.limits.check(resolved)
        if resolved.dataset and data.is_user_file(resolved.dataset):
            data.load_user_file(Path(resolved.dataset), resolved.task)  # a bad upload fails now, not in a worker
        models.check_before_loading(resolved)
        config = replace(config, owner=owner_hash(owner_token) if owner_token else None)
        return self._enqueue(Job(self.store.new_id(resolved.task, resolved.method), config))

    def resume(self, run_id: str, owner_token: str | None = None) -> Job:
        """Queue a stopped, interrupted or failed run to continue from its latest checkpoint."""
        run = self._folder(run_id)
        self.check_owner(run_id, owner_token)
        if self._pending(run_id):
            raise ConfigError(f"run {run_id} is already queued or running")
        config, _ = resumable(run)
        run.clear_obeyed_stop_request()  # or the run would read as stopping while it waits and loads
        return self._enqueue(Job(run_id, config, resume=True))

    def _pending(self, run_id: str) -> bool:
        return run_id in self._queue or any(job.id == run_id for job in self.active())

    def _enqueue(self, job: Job) -> Job:
        with self._changed:
            if len(self._queue) >= self.limits.max_queue:
                raise ConfigError(
                    f"the queue is full ({self.limits.max_queue} waiting, LORA_ARENA_MAX_QUEUE); "
                    "try again when a run has finished"
                )
            self._jobs[job.id] = job
            self._queue.append(job.id)
            self._changed.notify_all()
        return job

    def check_owner(self, run_id: str, owner_token: str | None) -> None:
        """OwnershipError unless `owner_token` started the run (runs without an owner, started from
        the command line, are anyone's); RunNotFound for an unknown id."""
        job = self._jobs.get(run_id)
        owner = job.config.owner if job else self.store.get(run_id).config.get("owner")
        if owner and not owner_token:
            raise OwnershipError(f"run {run_id} belongs to the session that started it: give its owner_token")
        if owner and owner_hash(owner_token) != owner:
            raise OwnershipError(f"run {run_id} was started by another session; only that session can change it")

    def stop(self, job_id: str, owner_token: str | None = None) -> str:
        """Cancel a queued job or stop a running one within one step (its adapter is kept)."""
        self.check_owner(job_id, owner_token)  # raises RunNotFound for bad or unknown ids
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
            run = self._created(job_id)
            if run is not None and self._run_started(job, run.summary):
                run.request_stop()
                return f"{job_id}: stopping (within seconds: the current step or evaluation ends first)"
            # Still loading (a resumed run: before it took its run back): nothing of it to keep.
            job.stopped_while_loading = True
            job.process.terminate()
            return f"{job_id}: cancelled while its model loaded"

    def _stop_unmanaged(self, run_id: str) -> str:
        """A run started elsewhere (the CLI, an earlier app process) is stopped through its stop file."""
        run = self.store.get(run_id)
        if run.status != "running":
            return f"{run_id}: already {run.status}"
        run.request_stop()
        return f"{run_id}: stopping (within seconds: the current step or evaluation ends first)"

    def delete(self, run_id: str, owner_token: str | None = None) -> str:
        """Remove a finished run's folder (adapter, metrics, checkpoints) from the store; a job that
        ended before its run began (cancelled while it loaded) leaves the lists."""
        job = self._jobs.get(run_id)
        if job is not None and job.state in ("cancelled", "failed") and self._created(run_id) is None:
            self.check_owner(run_id, owner_token)
            self._jobs.pop(run_id, None)
            return f"{run_id}: removed (it ended before training began, so nothing was stored)"
        run = self._folder(run_id)
        self.check_owner(run_id, owner_token)
        if self._pending(run_id) or run.status == "running":
            raise ConfigError(f"run {run_id} is queued or running; stop it before deleting it")
        self.store.remove(run)
        self._jobs.pop(run_id, None)
        return f"{run_id}: deleted"

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
        if job is not None:  # its run may not exist yet
            run = self._created(job_id)
            summary, task, method = (run.summary if run else {}), job.config.task, job.config.method
        else:  # a run of an earlier app process or the CLI; an unknown id raises RunNotFound
            run = self.store.get(job_id)
            summary, task, method = run.summary, run.config.get("task"), run.config.get("method")
        state = job.state if job else _state_of(summary.get("status"))
        if job and job.state == "starting" and self._run_started(job, summary):
            state = "running"
        return {
            "id": job_id,
            "state": state,
            "queue_position": self.position(job_id),
            "status": summary.get("status"),
            "error": (job.error if job else None) or summary.get("error"),
            "summary": summary,
            # a stop asked for and not yet done: a live view says "stopping" at once
            "stop_requested": state in ("starting", "running") and run is not None and run.stop_requested(),
            "task": task,
            "method": method,
        }

    def actions(self, run_id: str) -> dict[str, bool]:
        """Whether `stop`, `resume` and `delete` would act on the run now, by the rules they apply:
        what a live view offers (it greys out the others)."""
        described = self.describe(run_id)
        live = described["state"] in ("queued", "starting", "running")
        exists = bool(described["summary"])  # a job cancelled before its run began has no folder
        ended_unbegun = not live and not exists and run_id in self._jobs  # delete takes it off the lists
        try:
            can_resume = not live and exists and bool(resumable(self.store.get(run_id)))
        except ConfigError:  # completed, or stopped before its first checkpoint
            can_resume = False
        return {
            "stop": live and not described["stop_requested"],
            "resume": can_resume,
            "delete": (not live and exists) or ended_unbegun,
        }

    def owned_by(self, owner_token: str) -> list[dict]:
        """Every job and run that `owner_token` started, newest first, as `describe` tells them."""
        owner = owner_hash(owner_token)
        ids = {job.id: job.submitted_at for job in self._jobs.values() if job.config.owner == owner}
        for run in self.store.runs():
            if run.id not in ids and run.config.get("owner") == owner:
                ids[run.id] = run.summary.get("created_at", 0.0)
        described = []
        for run_id in sorted(ids, key=ids.get, reverse=True):
            try:
                described.append(self.describe(run_id))
            except RunNotFound:  # deleted (from another tab) since the listing
                continue
        return described

    def waiting(self) -> list[dict]:
        """The queue, first to start first: id, position, task and method (no owner)."""
        with self._changed:
            queued = list(self._queue)
        return [
            {
                "id": job_id,
                "position": index,
                "task": self._jobs[job_id].config.task,
                "method": self._jobs[job_id].config.method,
            }
            for index, job_id in enumerate(queued, start=1)
        ]

    def _folder(self, run_id: str) -> Run:
        """The run in the store; for a job of this app whose worker has not made it (queued,
        loading, or ended before it began) a ConfigError that says so, not "no run"."""
        job = self._jobs.get(run_id)
        if job is not None and self._created(run_id) is None:
            if job.state in ("queued", "starting"):
                raise ConfigError(f"run {run_id} is {job.state} and has not begun training; stop it to cancel it")
            raise ConfigError(
                f"run {run_id} ended before it began training ({job.state}): there is nothing to resume; start a "
                "new run"
            )
        return self.store.get(run_id)

    def _created(self, job_id: str) -> Run | None:
        """The job's run once its worker has created it in the store; None before."""
        try:
            return self.store.get(job_id)
        except RunNotFound:
            return None

    # -- the worker loop --------------------------------------------------------------------

    def close(self) -> None:
        """Let the standby worker go and keep none from now on (queued and running jobs go on)."""
        with self._changed:
            self.standby = False
            spare, self.spare = self.spare, None
        if spare is not None:
            spare.process.kill()
            spare.process.wait()

    def _dispatch(self) -> None:
        while True:
            with self._changed:
                while not self._queue or len(self.active()) >= self.parallel:
                    if self.standby and self.spare is None and not self.active():
                        self._start_spare()
                    self._changed.wait()
                job = self._jobs[self._queue.popleft()]
                job.state = "starting"
                self._start(job)  # under the lock: no reader sees a starting job without its process

    def _start_spare(self) -> None:
        environment = dict(os.environ)
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            with open(self.logs / "standby.log", "w", encoding="utf-8") as log:  # its imports' output, if any
                process = _spawn([sys.executable, "-m", "training", "standby"], log, subprocess.PIPE, None)
        except OSError as error:  # out of memory or file handles: runs start without one, as before
            LOG.warning("no standby worker from now on: it could not be started (%s)", error)
            self.standby = False
            return
        self.spare = Spare(process, environment)

    def _take_spare(self, command: list[str], log_path: Path) -> subprocess.Popen | None:
        """The standby worker, given `command` to run with its output appended to `log_path`; None
        if there is none, it ended, or the environment changed since it started (it is let go)."""
        spare, self.spare = self.spare, None
        if spare is None:
            return None
        if spare.process.poll() is None and spare.environment == dict(os.environ):
            request = {"argv": command, "log": str(log_path), "started_at": time.time()}
            try:
                spare.process.stdin.write(json.dumps(request).encode() + b"\n")
                spare.process.stdin.close()
                return spare.process
            except BrokenPipeError:  # it ended just now
                pass
        spare.process.kill()
        spare.process.wait()
        return None

    def _start(self, job: Job) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{job.id}.log"
        work = ["resume", "--run-id", job.id] if job.resume else [*train_arguments(job.config), "--run-id", job.id]
        arguments = ["--runs-dir", str(self.store.root), *work]
        processes = job.config.processes
        command, environment = [sys.executable, "-m", "training", *arguments], None
        if processes > 1:  # torchrun starts the processes; the engine's rank 0 records the run
            command = distributed.launch_command(processes, arguments)
            environment = distributed.launch_environment(processes)
        with open(log_path, "a" if job.resume else "w", encoding="utf-8") as log:
            spare = self._take_spare(arguments, log_path) if processes == 1 else None
            job.process = spare or _spawn(command, log, subprocess.DEVNULL, environment)
        # A standby worker's output before the run (its imports, which can fail) is in its own log.
        logs = (self.logs / "standby.log", log_path) if spare else (log_path,)
        threading.Thread(target=self._watch, args=(job, logs), daemon=True).start()

    @staticmethod
    def _run_started(job: Job, summary: dict) -> bool:
        """The worker has created its run (a resumed one: written its own pid): loading passed."""
        if not summary:
            return False
        return not job.resume or (job.process is not None and summary.get("pid") in _process_tree(job.process.pid))

    def _watch(self, job: Job, logs: tuple[Path, ...]) -> None:
        # `running` as soon as the worker has created (or reopened) the run: loading passed.
        while job.process.poll() is None:
            if job.state == "starting":
                run = self._created(job.id)
                if run is not None and self._run_started(job, run.summary):
                    job.state = "running"
            time.sleep(0.2)
        code = job.process.returncode
        run = self._created(job.id)
        with self._changed:
            if run is not None and run.status not in FINISHED and job.stopped_while_loading:
                run.update_summary(status="stopped", finished_at=time.time())  # created as it was ended
            elif run is not None and run.status not in FINISHED:
                # killed (out of memory, a signal) before the engine could record it
                reason = f"the worker process ended with code {code}: {_last_error(*logs)}"
                run.update_summary(status="failed", error=reason, finished_at=time.time())
            if code == 0:
                job.state = "finished"
            elif job.stopped_while_loading:
                job.state = "cancelled"
            else:
                job.state = "failed"
                job.error = job.error or (run.summary.get("error") if run else None) or _last_error(*logs)
            self._changed.notify_all()
