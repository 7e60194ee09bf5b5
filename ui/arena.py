"""What every tab and API endpoint shares: the run store, the job manager and the adapter pool.

The UI only ever reads the run store and talks to the job manager; it never touches a training
loop. Errors the user can fix become `gr.Error` with the library's own message. Models and
datasets are catalog ids (or Hub ids when the Hub is reachable); server-side paths are refused
unless the app runs with LORA_ARENA_ALLOW_LOCAL_PATHS=1 (a trusted, local deployment, and the tests).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd
import torch

from lora_methods import TASKS, get_method
from training.core import catalog, data, environment, models
from training.core.config import ConfigError, TrainConfig
from training.core.errors import USER_ERRORS, InferenceError
from training.core.offline import is_offline
from training.core.runs import MetricsCursor, Run, RunStore
from training.jobs import JobManager
from training.research.leaderboard import leaderboard
from training.research.report import Row, store_rows
from training.serving import export
from training.serving.playground import classify_side_by_side, generate_side_by_side
from training.serving.pool import AdapterPool

LOG = logging.getLogger("lora_arena")


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a fixable mistake as a readable message in the UI (and to API clients), and log it as
    one line: a traceback would make a user's typo look like a server fault."""
    try:
        yield
    except USER_ERRORS as error:
        LOG.info("refused: %s: %s", type(error).__name__, error)
        raise gr.Error(str(error), title="Please check the input", print_exception=False) from None


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def local_paths_allowed() -> bool:
    return os.environ.get("LORA_ARENA_ALLOW_LOCAL_PATHS") == "1"


def check_model_choice(model: str | None, task: str, offline: bool) -> None:
    """A catalog id, a Hub id when online, or (trusted deployments only) a local folder. A catalog
    model this server cannot use (the Hub unreachable, a bundled package not installed) is refused
    now, with the reason, rather than failing in a worker after it was queued."""
    model = model or models.default_model(task, offline)
    listed = next((entry for name in TASKS for entry in models.catalog(name) if entry.id == model), None)
    if listed is not None:
        if catalog.unusable_because(listed, offline):
            models.resolve_model_path(model, offline)  # raises the reason and what to choose instead
        return
    if local_paths_allowed() and Path(model).is_dir():
        models.resolve_model_path(model, offline)  # a folder must hold a model
        return
    if not HUB_ID.match(model) or ".." in model:
        choices = ", ".join(entry.id for entry in models.catalog(task))
        raise ConfigError(f"model {model!r} is not a catalog id or a Hub id (owner/name); choose one of {choices}")
    if offline:
        models.resolve_model_path(model, offline)  # raises the 'needs the Hub' message


def check_dataset_choice(dataset: str | None, task: str, offline: bool) -> None:
    """A catalog id of the task, or (trusted deployments only) a user's file on the server. A
    catalog dataset this server cannot use is refused with the reason (as check_model_choice)."""
    dataset = dataset or data.default_dataset(task, offline)
    listed = next((entry for entry in data.catalog(task) if entry.id == dataset), None)
    if listed is not None:
        if catalog.unusable_because(listed, offline):
            data.load_splits(dataset, task, offline)  # raises the reason and what to choose instead
        return
    if local_paths_allowed() and data.is_user_file(dataset) and Path(dataset).is_file():
        return  # validated by the job manager before anything is queued
    choices = ", ".join(entry.id for entry in data.catalog(task))
    raise ConfigError(f"dataset {dataset!r} is not in the catalog; choose one of {choices} (upload files in the UI)")


def catalog_answer(task: str | None, offline: bool) -> dict[str, Any]:
    """Which catalog models and datasets this server can train with, and why not the others: what
    a visitor (or an API client) needs when the Hub is unreachable or the bundled packages are
    missing. Local folders and uploaded files are not listed."""

    def rows(entries: list[catalog.CatalogEntry]) -> list[dict[str, Any]]:
        listed = []
        for entry in entries:
            reason = catalog.unusable_because(entry, offline)
            listed.append(
                {
                    "id": entry.id,
                    "task": entry.task,
                    "description": entry.description,
                    "bundled": entry.bundled,
                    "usable": reason is None,
                    "unusable_because": reason,
                }
            )
        return listed

    tasks = [task] if task else list(TASKS)
    model_rows = rows([entry for name in tasks for entry in models.catalog(name)])
    dataset_rows = rows([entry for name in tasks for entry in data.catalog(name)])
    usable = list(dict.fromkeys(row["id"] for row in model_rows if row["usable"]))
    hub = "offline: the Hugging Face Hub is not reachable" if offline else "online: the Hugging Face Hub is reachable"
    if usable:
        message = f"{hub}; models this server can train: {', '.join(usable)}"
    else:
        message = (
            f"{hub}, and the bundled models are not installed ({catalog.BUNDLED_INSTALL}): no catalog "
            "model can be trained here"
        )
    return {"offline": offline, "message": message, "models": model_rows, "datasets": dataset_rows}


def run_label(run_id: str, method: str | None, *details: str) -> str:
    """A run as every run list names it: its id, the method where the id does not say it (a run
    given an id of its own), then `details`, joined by " · "."""
    said = not method or f"-{method}-" in run_id
    return " · ".join([run_id, *([] if said else [method]), *details])


def kept_selection(chosen: list[str] | None, available: list[str], defaults: int, filled: bool) -> list[str]:
    """A multi-run list's selection after a refresh: the chosen runs still available, or, the first
    time the list has runs to offer (`filled` false), its first `defaults` (the best). A selection the
    user emptied stays empty."""
    return [run for run in chosen or [] if run in available] if filled else available[:defaults]


class Arena:
    def __init__(self, runs_dir: str | None = None, standby: bool = False) -> None:
        """`standby`: keep a training worker ready while nothing trains (JobManager)."""
        self.store = RunStore(runs_dir)
        self.offline = is_offline()
        self.jobs = JobManager(self.store, standby=standby)
        for reason in self.store.unreadable():
            LOG.warning("a run is left out of every list: %s", reason)
        self.pool = AdapterPool()
        self._tails: dict[str, tuple[MetricsCursor, list[dict]]] = {}
        self._tail_lock = threading.Lock()
        self._cores = environment.cpu_threads()
        # Archives for download live beside the store, never in it: the store holds what runs wrote.
        self.exports = Path(tempfile.mkdtemp(prefix="lora-arena-downloads-"))

    def start(self, config: TrainConfig, owner_token: str | None, upload: str | None = None) -> str:
        """Queue a run; its id. `upload` is a file the UI received (it replaces the dataset); the
        worker uses the Hub only if this app can reach it."""
        resolved = config.resolved()  # task, method and numbers first: the catalog checks need a task
        check_model_choice(resolved.model, resolved.task, self.offline)
        if not (upload and resolved.dataset == upload):  # a file the UI received is the user's own
            check_dataset_choice(resolved.dataset, resolved.task, self.offline)
        return self.jobs.submit(replace(config, offline=config.offline or self.offline), owner_token).id

    def catalog(self, task: str | None = None) -> dict[str, Any]:
        """The catalog models and datasets, each with whether this server can use it (catalog_answer)."""
        return catalog_answer(task, self.offline)

    def describe(self, run_id: str) -> dict:
        """A run's or queued job's state, summary and whether a stop is on its way (JobManager.describe)."""
        return self.jobs.describe(run_id)

    def runs_of(self, owner_token: str | None) -> list[dict]:
        """The runs this browser (or API client) started, newest first; none without a token."""
        return self.jobs.owned_by(owner_token) if owner_token else []

    def queue(self) -> list[dict]:
        """Every waiting job with its position (1: starts next), task and method."""
        return self.jobs.waiting()

    def stop(self, run_id: str, owner_token: str | None) -> str:
        return self.jobs.stop(run_id, owner_token)

    def actions(self, run_id: str) -> dict[str, bool]:
        """Which of stop, resume and delete apply to the run now (JobManager.actions)."""
        return self.jobs.actions(run_id)

    def resume(self, run_id: str, owner_token: str | None) -> str:
        self.jobs.resume(run_id, owner_token)
        return f"{run_id}: queued to resume from its last checkpoint"

    def delete(self, run_id: str, owner_token: str | None) -> str:
        message = self.jobs.delete(run_id, owner_token)
        self.pool.forget(run_id)
        with self._tail_lock:
            self._tails.pop(run_id, None)
        return message

    def _finished(self, run_id: str) -> Run:
        """The run, unless it is queued or training (a queued resume too: its adapter is about to change)."""
        described = self.jobs.describe(run_id)  # RunNotFound: unknown id
        if described["state"] in ("queued", "starting", "running"):
            raise InferenceError(
                f"run {run_id} is still running (queued, training or evaluating); it can be taken home once it has "
                "finished or been stopped"
            )
        if not described["summary"]:
            raise InferenceError(f"run {run_id} ended before training began: there is nothing to take home")
        return self.store.get(run_id)

    def download(self, run_id: str, merged: bool = False, owner_token: str | None = None) -> Path:
        """The run's archive (.zip). Anyone may download a run, as anyone sees it on the leaderboard;
        the merged model costs a model load and a merge, so only the run's owner may ask for it."""
        run = self._finished(run_id)
        if merged:
            self.jobs.check_owner(run_id, owner_token)
        return export.archive(run, self.exports, merged)

    def push(self, run_id: str, repo_id: str, token: str, merged: bool = False, owner_token: str | None = None) -> dict:
        """Upload the run's export to a private Hub repository: the run's owner only. The token goes
        to this one upload (training.serving.export.push_run) and is kept nowhere."""
        run = self._finished(run_id)
        self.jobs.check_owner(run_id, owner_token)
        return export.push_run(run, repo_id, token, merged)

    def leaderboard(self, task: str | None = None) -> pd.DataFrame:
        """Every run in the store (of one task) as a row of figures, best first."""
        return leaderboard(self.store, task)

    def result_rows(self) -> list[Row]:
        """The store's finished runs as the results report's rows: the Guide answers from them."""
        return store_rows(self.store)

    def method_of(self, run_id: str) -> str:
        return self.store.get(run_id).config["method"]

    def has_adapter(self, run_id: str) -> bool:
        """Whether the run has saved an adapter the Playground can serve."""
        return self.store.get(run_id).adapter_dir.exists()

    def classify(
        self, run_ids: list[str], text: str, include_base: bool = True, compare_merged: bool = False
    ) -> list[dict]:
        """`text` classified by each run (and the base model) side by side (playground.classify_side_by_side)."""
        self._check_not_waiting(run_ids)
        return classify_side_by_side(self.pool, self.store, run_ids, text, include_base, compare_merged)

    def generate(
        self, run_ids: list[str], prompt: str, include_base: bool = True, compare_merged: bool = False, **sampling: Any
    ) -> list[dict]:
        """`prompt` continued by each run (and the base model) with the same sampling settings
        (playground.generate_side_by_side)."""
        self._check_not_waiting(run_ids)
        return generate_side_by_side(self.pool, self.store, run_ids, prompt, include_base, compare_merged, **sampling)

    def _check_not_waiting(self, run_ids: list[str]) -> None:
        """A job whose run has not begun has no folder yet: say why, rather than that it does not exist."""
        for run_id in run_ids if isinstance(run_ids, list) else ():
            if not isinstance(run_id, str) or self.jobs.job(run_id) is None:
                continue
            described = self.jobs.describe(run_id)
            if described["summary"]:
                continue
            if described["state"] in ("queued", "starting"):
                raise InferenceError(f"run {run_id} is {described['state']}; it can be used once it has trained")
            raise InferenceError(f"run {run_id} ended before training began: it has no adapter")

    def merge_note(self, run_id: str) -> str | None:
        """Why the run cannot be exported merged (its method's reason), or None when it can."""
        return get_method(self.method_of(run_id)).merge_blocker

    def records(self, run_id: str) -> list[dict]:
        """All metrics of a run, reading only the lines appended since the last call."""
        run = self.store.get(run_id)
        with self._tail_lock:
            cursor, records = self._tails.get(run_id, (MetricsCursor(), []))
            new, moved, from_start = run.metrics_since(cursor)
            # From the start: a resume rewrote the metrics, so what was held may be steps retrained since.
            records = new if from_start else records + new
            self._tails[run_id] = (moved, records)
            return records

    @contextmanager
    def inference_threads(self) -> Iterator[None]:
        """While a run trains, the Playground takes one core and leaves the rest to training:
        two PyTorch processes each using every core run many times slower."""
        torch.set_num_threads(1 if self.jobs.busy() else self._cores)
        yield
