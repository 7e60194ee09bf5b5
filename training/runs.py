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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATUSES = ("running", "completed", "stopped", "failed")


class RunNotFound(LookupError):
    """A run id that is malformed or not in the store."""


def default_runs_dir() -> Path:
    return Path(os.environ.get("LORA_ARENA_RUNS", "runs"))


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

    @property
    def config(self) -> dict:
        return json.loads((self.dir / "config.json").read_text(encoding="utf-8"))

    @property
    def summary(self) -> dict:
        path = self.dir / "summary.json"
        return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}

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
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written right now
        return records

    def request_stop(self) -> None:
        (self.dir / "stop").touch()

    def stop_requested(self) -> bool:
        return (self.dir / "stop").exists()


class RunStore:
    def __init__(self, root: Path | str | None = None) -> None:
        self.root = Path(root) if root is not None else default_runs_dir()

    def create(self, config: dict) -> Run:
        self.root.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_id = f"{stamp}-{config['task']}-{config['method']}-{secrets.token_hex(2)}"
        run = Run(self.root / run_id)
        run.dir.mkdir()
        write_json_atomic(run.dir / "config.json", {"run_id": run_id, **config})
        run.update_summary(status="running", created_at=time.time())
        return run

    def get(self, run_id: str) -> Run:
        if not RUN_ID_PATTERN.match(run_id) or ".." in run_id:
            raise RunNotFound(f"{run_id!r} is not a valid run id (letters, digits, '.', '_' and '-' only)")
        run = Run(self.root / run_id)
        if not (run.dir / "config.json").exists():
            raise RunNotFound(f"no run {run_id!r} in {self.root}; `python -m training list` shows the runs")
        return run

    def resolve(self, run_ref: str) -> Run:
        """A run id in this store, or the path of a run folder."""
        path = Path(run_ref)
        if path.is_dir() and (path / "config.json").exists():
            return Run(path)
        return self.get(run_ref)

    def runs(self) -> Iterator[Run]:
        if not self.root.is_dir():
            return
        for directory in sorted(self.root.iterdir()):
            if (directory / "config.json").exists():
                yield Run(directory)
