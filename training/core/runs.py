"""The run store: one folder per run, the only thing the UI and the CLI read back.

runs/<run_id>/
  config.json     everything needed to reproduce the run (written once, atomically)
  metrics.jsonl   one JSON object per logged step or evaluation, appended as whole lines
  summary.json    status and final figures (rewritten atomically as the run progresses)
  adapter/        the PEFT adapter (or, for full fine-tuning, the model folder) and tokenizer
  stop            present when a stop was requested
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from training.core.config import ConfigError, TrainConfig

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # whole names: fullmatch
STATUSES = ("running", "completed", "stopped", "failed", "interrupted")
FINISHED = ("completed", "stopped", "failed", "interrupted")


class RunNotFound(LookupError):
    """A run id that is malformed or not in the store."""


class RunUnreadable(RunNotFound):
    """A run whose config.json was damaged outside the app (cut short, not JSON, not UTF-8): the
    store leaves it out of every listing rather than failing them all."""


def _read_record(path: Path) -> dict:
    """A run file's JSON object; RunUnreadable naming the file if it is not one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunUnreadable(f"{path} cannot be read ({error}); repair it or delete the run's folder") from None
    if not isinstance(record, dict):
        raise RunUnreadable(f"{path} holds no JSON object; repair it or delete the run's folder")
    return record


@dataclass(frozen=True)
class MetricsCursor:
    """Where a reader of metrics.jsonl stopped: after which byte, and the line that ends there. A
    resume replaces the file (`Run.keep_metrics_until`); the line tells whether the file at that
    offset still holds what was read. A file's identity (device, inode) cannot: the filesystem
    may give the new file the old one's inode."""

    offset: int = 0
    last_line: bytes = b""


def default_runs_dir() -> Path:
    return Path(os.environ.get("LORA_ARENA_RUNS", "runs"))


def _process_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file in the same folder, then rename: readers never see half a file."""
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, default=str)
    os.replace(temp, path)


class Run:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.id = directory.name

    @property
    def adapter_dir(self) -> Path:
        return self.dir / "adapter"

    @cached_property
    def config(self) -> dict:  # written once, when the run is created
        try:
            return _read_record(self.dir / "config.json")
        except (FileNotFoundError, NotADirectoryError):
            raise RunNotFound(f"run {self.id} is no longer in the store (deleted)") from None

    @property
    def summary(self) -> dict:
        """What the run has recorded so far; a damaged summary reads as status "unreadable" with the
        reason as its error, so that the run still lists and can be deleted."""
        try:
            return _read_record(self.dir / "summary.json")
        except FileNotFoundError:  # not written yet, or the run was deleted while being read
            return {}
        except RunUnreadable as error:
            return {"status": "unreadable", "error": str(error)}

    def update_summary(self, **fields: Any) -> dict:
        summary = {**self.summary, **fields}
        write_json_atomic(self.dir / "summary.json", summary)
        return summary

    def append_metrics(self, record: dict) -> None:
        # One write() of one whole line in append mode: a reader never sees a partial record.
        line = json.dumps(record, default=float) + "\n"
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as file:
            file.write(line)

    def metrics(self) -> list[dict]:
        return self.metrics_since(MetricsCursor())[0]

    def metrics_since(self, cursor: MetricsCursor) -> tuple[list[dict], MetricsCursor, bool]:
        """Records appended after `cursor`, the cursor to continue from, and whether the records
        start from the file's beginning: then they replace whatever the reader held, because a
        resume rewrote the file since the reader's last call. A live view reads only what is new.
        A line still being written is left for the next call."""
        try:
            file = open(self.dir / "metrics.jsonl", "rb")
        except FileNotFoundError:
            return [], cursor, False
        with file:
            file.seek(cursor.offset - len(cursor.last_line))
            unchanged = file.read(len(cursor.last_line)) == cursor.last_line
            offset = cursor.offset if unchanged else 0
            file.seek(offset)
            chunk = file.read()
        complete = chunk[: chunk.rfind(b"\n") + 1]
        records = []
        for line in complete.decode("utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a damaged line (a crash mid-write in an old run): skip it, keep the rest
        if complete:
            last_line = complete[complete.rfind(b"\n", 0, len(complete) - 1) + 1 :]
        else:  # nothing new: the line read last is still the one before the offset
            last_line = cursor.last_line if unchanged else b""
        return records, MetricsCursor(offset + len(complete), last_line), offset == 0

    @property
    def status(self) -> str:
        return self.summary.get("status", "unknown")

    def keep_metrics_until(self, step: int) -> None:
        """Drop the records after `step` (a resume retrains them), replacing the file atomically."""
        kept = [record for record in self.metrics() if record.get("step", 0) <= step]
        handle, temp = tempfile.mkstemp(dir=self.dir, prefix=".metrics.jsonl.")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(record, default=float) + "\n" for record in kept)
        os.replace(temp, self.dir / "metrics.jsonl")

    def clear_obeyed_stop_request(self) -> None:
        """Withdraw the stop request the run's last segment ended on (made before it finished),
        keeping one made since: a stop asked for while a resume waits or loads."""
        path, finished = self.dir / "stop", self.summary.get("finished_at")
        try:
            if finished is None or path.stat().st_mtime <= finished:
                path.unlink()
        except FileNotFoundError:
            pass

    def request_stop(self) -> None:
        (self.dir / "stop").touch()

    def stop_requested(self) -> bool:
        return (self.dir / "stop").exists()


def check_run_id(run_id: Any) -> None:
    """RunNotFound unless `run_id` has a run id's form (a folder name in the store, never a path)."""
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id) or ".." in run_id:
        raise RunNotFound(f"{run_id!r} is not a valid run id (letters, digits, '.', '_' and '-' only)")


class RunStore:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_runs_dir()

    @staticmethod
    def new_id(task: str, method: str) -> str:
        return f"{time.strftime('%Y%m%d-%H%M%S')}-{task}-{method}-{secrets.token_hex(2)}"

    def check_new_id(self, run_id: str) -> None:
        """ConfigError unless `run_id` can name a new run here: a valid id that no run has yet."""
        check_run_id(run_id)
        if (self.root / run_id).exists():
            raise ConfigError(
                f"a run named {run_id!r} already exists in {self.root}; choose another name, or leave the run id "
                "out for a generated one (`resume` continues a stopped run)"
            )

    def create(self, config: dict, run_id: str | None = None) -> Run:
        """A new run folder; `run_id` lets a job manager name the run before its worker creates it."""
        run_id = run_id or self.new_id(config["task"], config["method"])
        self.check_new_id(run_id)
        self.root.mkdir(parents=True, exist_ok=True)
        run = Run(self.root / run_id)
        try:
            run.dir.mkdir()  # an existing id is an error, never an overwrite
        except FileExistsError:
            self.check_new_id(run_id)  # created since the check: the same message
            raise
        write_json_atomic(run.dir / "config.json", {"run_id": run_id, **config})
        # The pid tells a restarted app which "running" runs lost their process (see mark_interrupted).
        run.update_summary(status="running", created_at=time.time(), pid=os.getpid())
        return run

    def mark_interrupted(self) -> list[str]:
        """Runs left `running` by a process that no longer exists become `interrupted`; their ids."""
        marked = []
        for run in self.runs():
            summary = run.summary
            if summary.get("status") == "running" and not _process_alive(summary.get("pid")):
                run.update_summary(
                    status="interrupted",
                    error="the training process ended without finishing (killed or crashed)",
                    finished_at=time.time(),
                )
                marked.append(run.id)
        return marked

    def get(self, run_id: str) -> Run:
        check_run_id(run_id)
        run = Run(self.root / run_id)
        if not (run.dir / "config.json").exists():
            raise RunNotFound(f"no run {run_id!r} in {self.root}; `python -m training list` shows the runs")
        return run

    def resolve(self, run_ref: str) -> Run:
        """A run id in this store, or the path of a run folder."""
        path = Path(run_ref)
        if path.is_dir() and (path / "config.json").exists():
            return Run(path)
        if os.sep in run_ref and path.is_dir():
            raise RunNotFound(f"{run_ref} is a folder but not a run (it has no config.json)")
        return self.get(run_ref)

    def runs(self) -> Iterator[Run]:
        """Every run, its config already read: a run deleted while listed, or whose config is
        damaged (`unreadable` names those), is left out, not an error."""
        for run in self._folders():
            try:
                run.config  # read now, while the folder is certainly there
            except RunNotFound:
                continue
            yield run

    def unreadable(self) -> list[str]:
        """Why each run with a damaged config.json is left out of `runs`."""
        reasons = []
        for run in self._folders():
            try:
                run.config
            except RunUnreadable as error:
                reasons.append(str(error))
            except RunNotFound:
                continue
        return reasons

    def _folders(self) -> Iterator[Run]:
        if not self.root.is_dir():
            return
        for directory in sorted(self.root.iterdir()):
            if RUN_ID_PATTERN.fullmatch(directory.name):  # not e.g. a deleted run's folder being removed
                yield Run(directory)

    def remove(self, run: Run) -> None:
        """Delete the run's folder. It leaves the listing in one step (a rename to a hidden name,
        which no run id can have), so a listing never finds a run half deleted."""
        trash = self.root / f".deleted-{run.id}-{secrets.token_hex(4)}"
        run.dir.rename(trash)
        shutil.rmtree(trash)


def find_judge(store: RunStore, judge_run: str | None) -> Run | None:
    """The sentiment run that judges generated reviews: the one named, else the store's most accurate."""
    if judge_run:
        run = store.resolve(judge_run)
        if run.config.get("task") != "sentiment":
            raise ConfigError(f"judge run {judge_run} is not a sentiment run")
        return run
    candidates = [
        run
        for run in store.runs()
        if run.config.get("task") == "sentiment"
        and run.summary.get("status") == "completed"
        and run.adapter_dir.exists()
    ]
    return max(candidates, key=lambda r: r.summary["metrics"]["validation"]["accuracy"], default=None)


RESUMABLE = ("stopped", "interrupted", "failed")


def latest_checkpoint(run: Run) -> str | None:
    """The newest complete checkpoint: a process killed while saving leaves a folder without the
    trainer state the Trainer writes last, and the previous checkpoint is the one to resume."""

    processes = run.config.get("processes", 1)

    def complete(path: Path) -> bool:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        # rank 0 writes the trainer state; under several processes each writes its own RNG state
        shards = processes == 1 or all((path / f"rng_state_{rank}.pth").exists() for rank in range(processes))
        return shards and path.name.rsplit("-", 1)[1].isdigit()

    saved = [path for path in (run.dir / "checkpoints").glob("checkpoint-*") if complete(path)]
    return str(max(saved, key=lambda path: int(path.name.rsplit("-", 1)[1]))) if saved else None


def resumable(run: Run) -> tuple[TrainConfig, str]:
    """The config a run was started with and the checkpoint to continue from; ConfigError if the
    run cannot be resumed (still running, completed, or stopped before its first checkpoint)."""
    if run.status not in RESUMABLE:
        raise ConfigError(f"run {run.id} is {run.status}; only {', '.join(RESUMABLE)} runs can be resumed")
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise ConfigError(f"run {run.id} has no checkpoint to resume from (it stopped before the first one)")
    # Runs recorded before precision was a setting trained in fp32: they continue in it.
    return TrainConfig.from_record({"precision": "fp32", **run.config}), checkpoint
