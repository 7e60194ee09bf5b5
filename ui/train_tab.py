"""Train tab: choose task, model, data and method, start a run, watch it live.

The form is generated from the catalogs and the methods' hyperparameter schemas. A run belongs to
the job manager, not to the page: closing or reloading the tab changes nothing. The page lists the
runs this browser started (its owner token lives in the browser) and shows the one picked there,
phase by phase, with its memory and speed.
"""

from __future__ import annotations

import functools
import html
import secrets
import statistics
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_methods import METHODS, TASKS, HParam
from training.core import data, defaults, models, progress
from training.core.catalog import CatalogEntry
from training.core.config import (
    RUN_FIELDS,
    TASK_DEFAULTS,
    ConfigError,
    RunField,
    TrainConfig,
    command_line,
    config_from,
)
from training.core.memory import MB, MEMORY_PARTS, TOTAL
from training.core.metrics import metric_text

from . import charts, export_panel
from .arena import USER_ERRORS, Arena, check_dataset_choice, check_model_choice, run_label, user_errors

REFRESH_SECONDS = 2.0
DEFAULT_METHOD = "lora"
PREVIEW_ROWS = 5
EVALUATIONS = ("base evaluation", "evaluation", "final evaluation")  # phases that count examples
OWN_WIDGETS = ("task", "model", "dataset", "hparams", "method")  # form settings with widgets of their own
# The run settings the form shows as generated fields: whole numbers, and choices (a dropdown).
FORM_SETTINGS = tuple(
    field
    for field in RUN_FIELDS
    if field.setting.on_form() and field.name not in OWN_WIDGETS and (field.kind is int or field.setting.choices)
)
# Number fields holding a task default: a new task puts its own defaults there.
TASK_FILLED = tuple(
    field for field in FORM_SETTINGS if not field.setting.form_blank and field.name in TASK_DEFAULTS["sentiment"]
)


# -- the form ------------------------------------------------------------------------------------


def _hparam_specs() -> dict[str, HParam]:
    """One form field per hyperparameter name across all methods (the first method's spec)."""
    specs: dict[str, HParam] = {}
    for method in METHODS.values():
        for spec in method.hparams:
            specs.setdefault(spec.name, spec)
    return specs


HPARAMS = _hparam_specs()


def arrow_step(spec: HParam) -> float:
    """The arrow keys' increment: a learning rate moves by 1e-4, a share by 0.05, not by 1."""
    if spec.kind is int:
        return 1
    if spec.log_scale:
        return 0.0001
    return 0.05 if spec.maximum is not None and spec.maximum <= 1 else 1


def _field(spec: HParam, values: dict[str, Any], info: str | None = None) -> gr.components.Component:
    """A form field, visible (with its default from `values`) when the initial method takes it."""
    visible, value, info = spec.name in values, values.get(spec.name, spec.default), info or spec.help
    label = f"{spec.name.replace('_', ' ')}" + (f"  ({spec.range_text()})" if spec.range_text() else "")
    if spec.choices:
        return gr.Dropdown(list(spec.choices), value=value, label=label, info=info, visible=visible)
    if spec.kind is str:
        return gr.Textbox(value=value, label=label, info=info, visible=visible)
    # precision=None: Gradio would round 2.5 to 2 silently; validation refuses it with a message.
    return gr.Number(value=value, label=label, info=info, step=arrow_step(spec), visible=visible)


def catalog_choices(entries: Iterable[CatalogEntry], offline: bool) -> list[tuple[str, str]]:
    """A model or dataset dropdown's (label, id) pairs: the id first (what a narrow dropdown keeps
    in view), then what it is, and whether it needs the Hub this page cannot reach."""
    choices = []
    for entry in entries:
        label = f"{entry.id} · {entry.description}"
        choices.append((label + (" [needs the Hub]" if offline and not entry.bundled else ""), entry.id))
    return choices


@functools.lru_cache(maxsize=16)
def _dataset_overview(dataset: str, task: str, offline: bool) -> tuple[str, pd.DataFrame]:
    splits = data.load_splits(dataset, task, offline)
    sizes = splits.sizes()
    text = "**Splits** " + " · ".join(f"{name} {count:,}" for name, count in sizes.items())
    if splits.controlled:
        text += " · generations are judged for sentiment control"
    rows = splits.train.select(range(min(PREVIEW_ROWS, len(splits.train)))).to_pandas()
    # The long text last: the short columns (label, prompt) stay in view however wide it is.
    return text, rows[[column for column in rows.columns if column != "text"] + ["text"]]


@functools.lru_cache(maxsize=16)
def _upload_refusal(path: str, task: str, offline: bool) -> str | None:
    """Why an uploaded file cannot train `task`, or None. Cached as a value: lru_cache keeps no
    exception, and the command preview asks on every change to the form."""
    try:
        _dataset_overview(path, task, offline)
    except USER_ERRORS as error:
        return str(error)
    return None


def _stale(task: str, model: str | None, dataset: str | None) -> bool:
    """An event that read the form while a task switch was being applied: a catalog model or
    dataset of the other task only (SmolLM2 serves both) next to this task. Its handler leaves the
    page alone."""

    def other_tasks_only(entries: tuple, value: str | None) -> bool:
        tasks = {entry.task for entry in entries if entry.id == value}
        return bool(tasks) and task not in tasks

    return other_tasks_only(models.CATALOG, model) or other_tasks_only(data.CATALOG, dataset)


def _whole(value: Any) -> Any:
    """Form numbers arrive as floats; whole ones become ints (others fail validation with a message)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def whole_number(value: float | str | None, label: str) -> int | None:
    """A budget field: empty means the default (None); a fraction or a word is refused with the
    field's name, never rounded."""
    if isinstance(value, str):
        value = value.strip()
        try:
            value = float(value) if value else None
        except ValueError:
            raise ConfigError(f"{label} must be a whole number (got {value!r})") from None
    if value is None:
        return None
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{label} must be a whole number (got {value:g})")
    return _whole(value)


def form_config(task: str, model: str, dataset: str, upload: str | None, method: str, *values: Any) -> TrainConfig:
    """The run the form describes from its values: the run settings in FORM_SETTINGS order, then the
    hyperparameter fields in HPARAMS order. Raises ConfigError for a fractional setting."""
    settings, hparam_values = values[: len(FORM_SETTINGS)], values[len(FORM_SETTINGS) :]
    numbers = {
        field.name: whole_number(value, field.called) if field.kind is int else value
        for field, value in zip(FORM_SETTINGS, settings)
    }
    taken = {spec.name for spec in METHODS[method].hparams} if method in METHODS else set()
    given = zip(HPARAMS, hparam_values)
    hparams = {name: _whole(value) for name, value in given if name in taken and value is not None}
    choices = {"task": task, "method": method, "model": model, "dataset": upload or dataset}
    return config_from({**choices, "hparams": hparams, **numbers})


# -- what the page shows of a run: pure functions of the job's description and its records ---------


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    minutes, seconds = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _state_word(state: dict) -> str:
    """One word for a run in the list: queued #2, loading, running, stopping, or how it ended."""
    if state["state"] == "queued":
        return f"queued #{state['queue_position']}" if state.get("queue_position") else "queued"
    if state["state"] == "starting":
        return "loading"
    if state["state"] == "running":
        return "stopping" if state.get("stop_requested") else "running"
    return state.get("status") or state["state"]


def run_choices(runs: list[dict]) -> list[tuple[str, str]]:
    """The "Your runs" list, newest first as given: each run's state first (what a look at the list
    is for, and never cut off), then the run."""
    return [(f"{_state_word(run)} · {run_label(run['id'], run.get('method'))}", run["id"]) for run in runs]


def queue_markdown(queue: list[dict], mine: set[str]) -> str:
    """Every waiting job with its position (this browser's marked), or nothing when none waits."""
    if not queue:
        return ""
    entries = [
        f"{job['position']}. `{html.escape(job['id'])}` ({job['task']}, {job['method']}"
        + (", yours)" if job["id"] in mine else ")")
        for job in queue
    ]
    return "**Queue** (one run trains at a time): " + " · ".join(entries)


def status_markdown(state: dict, records: list[dict]) -> str:
    """The run's state in one line (the phase it is in while it runs), its head in bold."""
    line = progress.phase_line(state, records)
    head, colon, rest = line.partition(": ")
    text = f"**{html.escape(head)}**{colon}{html.escape(rest)}"
    if state.get("error"):
        text += f": {html.escape(state['error'])}"
    return f"{text} · run `{html.escape(state['id'])}`"


def _bar(share: float, css: str) -> str:
    return f'<div class="{css}"><div class="arena-progress-bar" style="width:{100 * min(1.0, share):.1f}%"></div></div>'


def progress_html(state: dict, records: list[dict]) -> str:
    """The steps trained against the plan, the current evaluation's own examples, and the ETA
    (evaluations included) while the run goes on."""
    summary = state.get("summary") or {}
    planned = summary.get("planned_steps")
    if not planned:
        return ""
    train = [r for r in records if r.get("kind") == "train"]
    step = progress.steps_trained(summary, records)
    parts = [f"step {step} / {planned}"]
    recent = statistics.median(r["step_time_s"] for r in train[-20:]) if train else None
    if recent:
        parts.append(f"{recent:.2f} s/step")
    phase = summary.get("phase") or {}
    bars = [_bar(step / planned, "arena-progress")]
    live = state["state"] == "running" and not state.get("stop_requested")
    if live and phase.get("name") in EVALUATIONS and phase.get("total"):
        bars.append(_bar(phase["done"] / phase["total"], "arena-progress arena-progress-phase"))
        parts.append(f"{phase['name']} {phase['done']} / {phase['total']} examples")
    eta = progress.eta_seconds(summary, records) if live else None
    if eta is not None and eta >= 1:  # saving: nothing worth a countdown
        parts.append(f"ETA {_duration(eta)} (evaluations included)")
    return "".join(bars) + f'<div class="arena-progress-text">{html.escape(" · ".join(parts))}</div>'


def _mb(value: float | None) -> str:
    if value is None:
        return "n/a"
    megabytes = value / MB
    return f"{megabytes:,.1f} MB" if megabytes < 100 else f"{megabytes:,.0f} MB"


def _memory_rows(summary: dict, train: list[dict]) -> list[tuple[str, str]]:
    """Base weights, the training memory's peak and its parts (the finished run's figures, or the
    peak so far while it runs), then the process's resident set as a secondary figure."""
    peak, parts = summary.get("training_memory_bytes"), summary.get("memory_breakdown") or {}
    measured = [r for r in train if TOTAL in r]
    if peak is None and measured:
        top = max(measured, key=lambda r: r[TOTAL])
        peak, parts = top[TOTAL], {key: top[key] for key, _ in MEMORY_PARTS if key in top}
    rows = [
        ("base weight memory", _mb(summary.get("base_weight_memory_bytes"))),
        ("training memory (peak)", _mb(peak)),
    ]
    rows += [(f"↳ {label}", _mb(parts[key])) for key, label in MEMORY_PARTS if key in parts]
    rss = summary.get("peak_rss_bytes") or summary.get("peak_memory_bytes")  # the latter: older runs
    if rss is None and train:
        rss = max((r.get("rss_bytes", 0) for r in train), default=None)
    rows.append(("process memory (RSS peak, runtime included)", _mb(rss)))
    if summary.get("cuda_peak_bytes"):
        rows.append(("CUDA allocator peak", _mb(summary["cuda_peak_bytes"])))
    return rows


def _timing_rows(summary: dict) -> list[tuple[str, str]]:
    """Where a finished run's wall time went (written when it ends; older runs lack them)."""
    if summary.get("wall_time_s") is None:
        return []
    names = (
        ("load_time_s", "loading"),
        ("eval_time_s", "evaluation"),
        ("train_time_s", "training"),
        ("save_time_s", "saving"),
    )
    rows = [(f"time {label}", _duration(summary[key])) for key, label in names if summary.get(key) is not None]
    rows.append(("wall time", _duration(summary["wall_time_s"])))
    if summary.get("overhead_share") is not None:
        rows.append(("loading + evaluation share of wall time", f"{100 * summary['overhead_share']:.0f}%"))
    return rows


def _metric_rows(summary: dict, records: list[dict]) -> list[tuple[str, str]]:
    metric = summary.get("primary_metric")
    if not metric:
        return []
    rows = []
    counts = summary.get("split_examples") or {}  # runs recorded before it: no count shown

    def counted(split: str) -> str:
        return f" ({counts[split]:,} examples)" if split in counts else ""

    base = (summary.get("base_metrics") or {}).get("validation", {})
    if metric in base:  # on the final evaluation's examples: compare it with the final row, not a step's
        rows.append((f"base model validation {metric}{counted('validation')}", metric_text(metric, base[metric])))
    evals = [r for r in records if r.get("kind") == "eval" and metric in r and not r.get("base") and not r.get("final")]
    if evals:
        latest = evals[-1]
        examples = f", {latest['examples']:,} examples" if latest.get("examples") else ""
        rows.append((f"validation {metric} (step {latest['step']}{examples})", metric_text(metric, latest[metric])))
    final = summary.get("metrics") or {}
    for split in ("validation", "test"):
        if metric in final.get(split, {}):
            rows.append((f"final {split} {metric}{counted(split)}", metric_text(metric, final[split][metric])))
        # Beside accuracy: a classifier that answers one class for every review keeps the majority's
        # accuracy, and only its macro-F1 (at most about 0.4 then) shows it learned nothing.
        if "macro_f1" in final.get(split, {}):
            rows.append((f"final {split} macro-F1", metric_text("macro_f1", final[split]["macro_f1"])))
    if final.get("control_share") is not None:
        rows.append(("sentiment-control share", f"{final['control_share']:.3f}"))
    return rows


def summary_markdown(summary: dict, records: list[dict]) -> str:
    """The run's figures as a two-column table: size, memory, speed, timings and metrics."""
    train = [r for r in records if r.get("kind") == "train"]
    rows = []
    if summary.get("precision"):
        rows.append(("precision", f"{summary['precision']} ({summary.get('precision_source', 'given')})"))
    if summary.get("attention"):
        rows.append(("attention kernel", f"{summary['attention']} ({summary.get('attention_source', 'given')})"))
    if summary.get("processes", 1) > 1:
        processes, batch = summary["processes"], summary["global_batch_size"]
        rows.append(("processes", f"{processes} (global batch {batch}): memory per process, speed of all"))
    if "trainable_params" in summary:
        rows.append(("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.2f}%)"))
    if "base_weight_memory_bytes" in summary or train:
        rows += _memory_rows(summary, train)
    if train:
        rows.append(("median step time", f"{statistics.median(r['step_time_s'] for r in train):.3f} s"))
        rows.append(("latest training loss", f"{train[-1]['loss']:.4f}"))
    rows += _timing_rows(summary) + _metric_rows(summary, records)
    if not rows:
        return ""
    return "| this run | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


# -- the page: components -------------------------------------------------------------------------


@dataclass
class Form:
    """The form's components; `inputs` is the order `form_config` takes them in."""

    task: gr.Radio
    model: gr.Dropdown
    dataset: gr.Dropdown
    upload: gr.File
    dataset_info: gr.Markdown
    preview: gr.Dataframe
    method: gr.Radio
    fields: dict[str, gr.components.Component]  # the hyperparameters, by name
    settings: dict[str, gr.components.Component]  # the FORM_SETTINGS, by name
    command: gr.Code | None = None

    @property
    def inputs(self) -> list[gr.components.Component]:
        choices = [self.task, self.model, self.dataset, self.upload, self.method]
        return [*choices, *self.settings.values(), *self.fields.values()]


@dataclass
class Panel:
    """What shows the runs: the picker, the buttons acting on the picked run, its live views, and
    the browser-kept run id and owner token (only that token may stop, resume or delete its runs)."""

    start: gr.Button
    picker: gr.Dropdown
    stop: gr.Button
    resume: gr.Button
    delete: gr.Button
    download: gr.DownloadButton  # the picked run's archive, once it has finished or stopped
    export_note: gr.Markdown  # why the download is not ready yet (training, failed), or nothing
    queue: gr.Markdown
    status: gr.Markdown
    progress: gr.HTML
    x_axis: gr.Radio
    summary: gr.Markdown
    loss_plot: gr.Plot
    resources_plot: gr.Plot
    current_run: gr.BrowserState
    owner: gr.BrowserState
    shown: gr.State  # what the page shows now, per part, so a tick redraws only what changed

    @property
    def views(self) -> list[gr.components.Component]:
        return [self.status, self.progress, self.loss_plot, self.resources_plot, self.summary]


def _data_inputs(offline: bool) -> tuple:
    task = gr.Radio(list(TASKS), value="sentiment", label="Task", info="classify reviews, or write text")
    connectivity = (
        "**Offline**: bundled models and data only (the Hub is not reachable)"
        if offline
        else "**Online**: bundled models and the Hugging Face Hub"
    )
    gr.Markdown(connectivity, elem_classes="arena-connectivity")
    model = gr.Dropdown(
        catalog_choices(models.catalog("sentiment"), offline),
        value=models.default_model("sentiment", offline),
        label="Model",
        info="a catalog model, or type a Hub id (owner/name) when online",
        allow_custom_value=True,
    )
    dataset = gr.Dropdown(
        catalog_choices(data.catalog("sentiment"), offline),
        value=data.default_dataset("sentiment", offline),
        label="Dataset",
        allow_custom_value=True,  # checked on start; lets a stale event through without an error
    )
    upload = gr.File(
        label="...or upload a CSV, JSONL or JSON file (sentiment: text,label; generation: text or prompt,completion)",
        file_types=list(data.USER_FILE_SUFFIXES),
        type="filepath",
        elem_id="dataset-upload",
    )
    dataset_info = gr.Markdown(elem_id="dataset-info")
    preview = gr.Dataframe(
        label="First rows of the training split",
        interactive=False,
        max_height=220,
        wrap=True,  # long texts wrap instead of running off the panel
        elem_id="dataset-preview",
    )
    return task, model, dataset, upload, dataset_info, preview


def _setting_inputs(task: str) -> dict[str, gr.components.Component]:
    """The run settings' fields, two to a row, with `task`'s defaults."""
    settings = {}
    with gr.Accordion("Budget, precision, seed and evaluation", open=False):
        for start in range(0, len(FORM_SETTINGS), 2):
            with gr.Row():
                for field in FORM_SETTINGS[start : start + 2]:
                    settings[field.name] = _setting_field(field, task)
    return settings


def _setting_field(field: RunField, task: str) -> gr.components.Component:
    label, info, elem_id = field.setting.label, field.setting.help, field.name.replace("_", "-")
    if field.setting.choices:
        return gr.Dropdown(list(field.setting.choices), value=field.default, label=label, info=info, elem_id=elem_id)
    if field.setting.form_blank:
        # A textbox: Gradio's Number shows (and sends) 0 for an empty value, and empty is the default here.
        placeholder = f"empty: {field.default_text()}"
        return gr.Textbox("", label=label, info=info, placeholder=placeholder, elem_id=elem_id)
    # No precision: Gradio would round 2.5 silently; `whole_number` refuses it with the field's label.
    value = TASK_DEFAULTS[task].get(field.name, field.default)
    if field.default_text():  # emptied, the field is its default: say which, as the textboxes' placeholders do
        info = f"{info}; empty: {field.default_text()}"
    return gr.Number(value, label=label, info=info, elem_id=elem_id)


def _form(offline: bool) -> Form:
    with gr.Row():
        with gr.Column(scale=5):
            data_inputs = _data_inputs(offline)
        with gr.Column(scale=5):
            method = gr.Radio(
                [(f"{m.title}: {m.summary}", m.name) for m in METHODS.values()],
                value=DEFAULT_METHOD,
                label="Method",
                elem_classes="arena-method-cards",
            )
            task, model = data_inputs[0].value, data_inputs[1].value
            initial = defaults.hparam_defaults(task, model, DEFAULT_METHOD)
            rate_info = {"learning_rate": _rate_info(task, model, DEFAULT_METHOD)}
            with gr.Group():
                fields = {name: _field(spec, initial, rate_info.get(name)) for name, spec in HPARAMS.items()}
            settings = _setting_inputs(task)
    form = Form(*data_inputs, method, fields, settings)
    form.command = gr.Code(label="The same run from a terminal", language="shell", interactive=False)
    return form


def _rate_info(task: str, model: str | None, method: str) -> str:
    """The learning-rate field's help, with where its default comes from for this task and model."""
    return f"{HPARAMS['learning_rate'].help}; default {defaults.note(task, model, method)}"


def _panel() -> Panel:
    start = gr.Button("Start training", variant="primary", elem_id="start-button")
    with gr.Row(equal_height=True):
        picker = gr.Dropdown(
            [],
            value=None,
            label="Your runs (this browser's)",
            elem_id="run-picker",
            scale=4,
            min_width=420,  # a run's id, method and state stay readable: on a narrow page the buttons wrap below
            interactive=True,
        )
        # Each offered only where it applies to the picked run (_actions_view); none before a pick.
        stop = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1, interactive=False)
        resume = gr.Button("Resume", elem_id="resume-button", scale=1, interactive=False)
        delete = gr.Button("Delete run", elem_id="delete-button", scale=1, interactive=False)
        download = export_panel.download_button("download-button")
    export_note = gr.Markdown(elem_id="export-note")
    queue = gr.Markdown(elem_id="run-queue")
    status = gr.Markdown(elem_id="job-status")
    progress_bar = gr.HTML(elem_id="job-progress")
    # Charts stacked beside the figures table: the table is as tall as the two of them.
    with gr.Row():
        with gr.Column(scale=3):
            x_axis = gr.Radio(["step", "time"], value="step", label="Charts' x axis", elem_id="charts-x")
            loss_plot = gr.Plot(label="Loss", show_label=False, elem_id="loss-plot")  # the figure has a title
            resources_plot = gr.Plot(label="Memory and speed", show_label=False, elem_id="resources-plot")
        with gr.Column(scale=2):
            summary = gr.Markdown(elem_id="job-summary")
    return Panel(
        start,
        picker,
        stop,
        resume,
        delete,
        download,
        export_note,
        queue,
        status,
        progress_bar,
        x_axis,
        summary,
        loss_plot,
        resources_plot,
        current_run=gr.BrowserState(None, storage_key="lora-arena-current-run"),
        owner=gr.BrowserState("", storage_key="lora-arena-owner"),
        shown=gr.State(None),
    )


# -- the page: events ------------------------------------------------------------------------------

PRIVATE = {"api_visibility": "private", "show_progress": "hidden"}


def _on_task(offline: bool, task: str) -> tuple:
    return (
        gr.update(choices=catalog_choices(models.catalog(task), offline), value=models.default_model(task, offline)),
        gr.update(choices=catalog_choices(data.catalog(task), offline), value=data.default_dataset(task, offline)),
        *(TASK_DEFAULTS[task][field.name] for field in TASK_FILLED),
        None,  # the upload was for the other task
    )


def on_method(task: str, model: str | None, method: str) -> list:
    """Show the method's own fields with its defaults (the tuned learning rate for this model)."""
    values = defaults.hparam_defaults(task, model, method)
    updates = {name: gr.update(visible=name in values, value=values.get(name)) for name in HPARAMS}
    updates["learning_rate"]["info"] = _rate_info(task, model, method)
    return list(updates.values())


def on_model(task: str, model: str | None, method: str) -> Any:
    """A new task or model may have its own tuned learning rate; the other fields stay as set."""
    if _stale(task, model, None):
        return gr.skip()
    rate = defaults.hparam_defaults(task, model, method).get("learning_rate")
    return gr.update(value=rate, info=_rate_info(task, model, method))


def _on_dataset(offline: bool, task: str, dataset_id: str, upload_path: str | None) -> tuple:
    source = upload_path or dataset_id
    if _stale(task, None, dataset_id):
        return gr.skip(), gr.skip()
    if not source:
        return "", None
    try:
        if not upload_path:
            check_dataset_choice(dataset_id, task, offline)
        text, rows = _dataset_overview(source, task, offline)
    except USER_ERRORS as error:
        return f"**Cannot use this dataset**: {html.escape(str(error))}", None
    if upload_path:
        text = f"**Upload** `{html.escape(Path(upload_path).name)}` · " + text
    return text, gr.update(value=rows, column_widths=_preview_widths(list(rows.columns)))


def _preview_widths(columns: list[str]) -> list[str]:
    """Each column's width: Gradio would give the last column the whole panel's width, pushing each
    line's end out of view. A label needs a few characters; the texts (a prompt, a text) share what
    is left of the narrowest panel (Gradio takes pixels or percentages, not their difference)."""
    label = "label" in columns
    share = f"{(80 if label else 100) / (len(columns) - label):g}%"
    return ["64px" if column == "label" else share for column in columns]


def _on_form(offline: bool, *values: Any) -> Any:
    """The equivalent command line, or why the form cannot start yet."""
    if _stale(*values[:3]):
        return gr.skip()
    try:
        config = form_config(*values)
        check_model_choice(config.model, config.task, offline)
        if values[3]:  # an upload: refused here as the dataset note refuses it
            refusal = _upload_refusal(values[3], config.task, offline)
            if refusal:
                return f"# cannot start yet: {refusal}"
        else:  # no upload: the dataset must be a catalog one
            check_dataset_choice(config.dataset, config.task, offline)
        config.resolved()
        command = command_line(config)
        if values[3]:
            command = "# --dataset: the server's copy of your upload; in your own terminal, give your file\n" + command
        return command
    except (*USER_ERRORS, KeyError, TypeError) as error:
        return f"# cannot start yet: {error}"


def _wire_form(demo: gr.Blocks, form: Form, offline: bool) -> None:
    # Events chain explicitly (`.then`), and edits listen to `.input` (a person's change only): a
    # handler reading the form while another one's updates are still being applied in the browser
    # would see the other task's model against the new task's choices. A choice made while the
    # previous one is still being applied is applied after it (`always_last`), not dropped
    # (Gradio's default): a quick second click left the radio on Full with HiRA's fields and rate.
    edit = {**PRIVATE, "trigger_mode": "always_last"}
    inputs = form.inputs
    on_dataset = functools.partial(_on_dataset, offline)
    dataset = (on_dataset, [form.task, form.dataset, form.upload], [form.dataset_info, form.preview])
    choice = [form.task, form.model, form.method]
    rate = (on_model, choice, form.fields["learning_rate"])
    budget = [*(form.settings[field.name] for field in TASK_FILLED), form.upload]
    form.task.input(functools.partial(_on_task, offline), form.task, [form.model, form.dataset, *budget], **edit).then(
        *rate, **PRIVATE
    ).then(*dataset, **PRIVATE)
    form.method.input(on_method, choice, list(form.fields.values()), **edit)
    form.model.input(*rate, **edit)
    for trigger in (form.dataset.input, form.upload.upload, form.upload.clear):
        trigger(*dataset, **edit)
    demo.load(*dataset, api_visibility="private")
    # The command follows the form whoever changed it, through one listener: a change arriving while
    # it computes is not dropped (Gradio's default for a pending listener) but computed after it, so
    # the last command shown is the last form's, however fast a person types. A half-applied task
    # switch reads as stale (_on_form skips it) and its last field's change computes the whole form.
    gr.on(
        [demo.load, *(component.change for component in inputs)],
        functools.partial(_on_form, offline),
        inputs,
        form.command,
        **edit,
    )


def _picker_update(runs: list[dict], run_id: str | None, shown: dict) -> Any:
    """The run list, sent only when a run was added, removed or changed state (an open list is
    not redrawn under the person's pointer every tick)."""
    key = [(run["id"], _state_word(run)) for run in runs]
    if shown.get("runs") == key:
        return gr.skip()
    shown["runs"] = key
    listed = run_id if any(run["id"] == run_id for run in runs) else None
    return gr.update(choices=run_choices(runs), value=listed)


def _run_views(arena: Arena, run_id: str | None, shown: dict, x_axis: str) -> list:
    """Status, progress, loss chart, memory chart and summary of the picked run; each part only
    when what it draws from has changed since the last tick."""
    views: list[Any] = [gr.skip()] * 5
    if not run_id:
        return views
    try:
        state = arena.describe(run_id)
        records = arena.records(run_id) if state["summary"] else []
    except USER_ERRORS:
        return views
    summary = state["summary"]
    phase = summary.get("phase") or {}
    lines = (state["state"], state.get("status"), state.get("stop_requested"), state.get("queue_position"))
    status_key = [run_id, *lines, phase.get("name"), phase.get("step"), phase.get("done"), len(records)]
    # the phase too: the table gains the model's figures (parameters, base memory) before any record
    chart_key = [run_id, len(records), state["state"], state.get("status"), x_axis, phase.get("name")]
    if shown.get("status") != status_key:
        shown["status"] = status_key
        views[0:2] = status_markdown(state, records), progress_html(state, records)
    if shown.get("charts") != chart_key:
        shown["charts"] = chart_key
        views[2:5] = (
            charts.loss_figure(records, x_axis),
            charts.resources_figure(records, x_axis),
            summary_markdown(summary, records),
        )
    return views


class PagePicks:
    """The run each open page picked last: by Start, the picker, Delete or a reload.

    A tick carries the run its page had picked when the tick was sent. One sent just before a
    Start and answered after it would draw the old run over the new one (CI saw the status name
    the finished run again after Start); such a tick draws nothing."""

    def __init__(self, pages: int = 10_000) -> None:
        self._picked: OrderedDict[str, str | None] = OrderedDict()
        self._pages = pages  # the oldest pages are forgotten; their ticks then draw as before
        self._lock = threading.Lock()

    def pick(self, page: str, run_id: str | None) -> None:
        with self._lock:
            self._picked[page] = run_id
            self._picked.move_to_end(page)
            while len(self._picked) > self._pages:
                self._picked.popitem(last=False)

    def is_current(self, page: str, run_id: str | None) -> bool:
        """False once `page` has picked another run than `run_id`."""
        with self._lock:
            return self._picked.get(page, run_id) == run_id


def refresh_views(arena: Arena, run_id: str | None, shown: dict | None, x_axis: str, owner_token: str) -> tuple:
    """One tick: this browser's runs, the queue, and the picked run's views."""
    shown = dict(shown or {})
    runs = arena.runs_of(owner_token) if owner_token else []
    queue = queue_markdown(arena.queue(), {run["id"] for run in runs})
    queue_update = gr.skip() if shown.get("queue") == queue else queue
    shown["queue"] = queue
    return (_picker_update(runs, run_id, shown), queue_update, *_run_views(arena, run_id, shown, x_axis), shown)


def attach_browser(arena: Arena, run_id: str | None, owner_token: str) -> tuple:
    """On page load: this browser's owner token (made once), and its last picked run if it is
    still one of its own, else its newest run. Never anyone else's."""
    owner_token = owner_token or secrets.token_urlsafe(16)
    own = [run["id"] for run in arena.runs_of(owner_token)]
    return (run_id if run_id in own else (own[0] if own else None)), None, owner_token


def _picked(run_id: str | None, action: str) -> str:
    if not run_id:
        raise gr.Error(f"Pick one of your runs to {action} first.")
    return run_id


def _stop(arena: Arena, run_id: str | None, owner_token: str) -> None:
    with user_errors():
        gr.Info(arena.stop(_picked(run_id, "stop"), owner_token))


def _resume(arena: Arena, run_id: str | None, owner_token: str) -> None:
    """Queue the picked run to continue from its checkpoint; the page redraws it from scratch."""
    with user_errors():
        gr.Info(arena.resume(_picked(run_id, "resume"), owner_token))


def _actions_view(arena: Arena, run_id: str | None) -> tuple:
    """Stop, Resume and Delete, each clickable only when it would act on the picked run."""
    try:
        allowed = arena.actions(run_id) if run_id else {}
    except USER_ERRORS:  # deleted meanwhile
        allowed = {}
    return tuple(gr.update(interactive=allowed.get(action, False)) for action in ("stop", "resume", "delete"))


def _wire_runs(demo: gr.Blocks, form: Form, panel: Panel, arena: Arena) -> None:
    # Each handler that picks a run tells `pages`, so that a tick sent before the pick draws nothing.
    pages = PagePicks()
    views = [panel.picker, panel.queue, *panel.views, panel.shown]

    def tick(request: gr.Request, run_id: str | None, shown: dict | None, x_axis: str, owner_token: str) -> tuple:
        if not pages.is_current(request.session_hash, run_id):
            return (gr.skip(),) * len(views)
        return refresh_views(arena, run_id, shown, x_axis, owner_token)

    def start(request: gr.Request, owner_token: str, *values: Any) -> tuple:
        with user_errors():
            run_id = arena.start(form_config(*values), owner_token, upload=values[form.inputs.index(form.upload)])
        pages.pick(request.session_hash, run_id)
        gr.Info(f"Run {run_id} queued")
        return run_id, None  # the new run is picked, and drawn from scratch

    def pick(request: gr.Request, run_id: str | None) -> tuple:
        pages.pick(request.session_hash, run_id)
        return run_id, None  # drawn from scratch

    def delete(request: gr.Request, run_id: str | None, owner_token: str) -> tuple:
        """Delete the picked run and empty the views it filled (the next tick lists the rest)."""
        with user_errors():
            gr.Info(arena.delete(_picked(run_id, "delete"), owner_token))
        pages.pick(request.session_hash, None)
        return None, None, "", "", charts.loss_figure([]), charts.resources_figure([]), ""

    def attach(request: gr.Request, run_id: str | None, owner_token: str) -> tuple:
        run_id, shown, owner_token = attach_browser(arena, run_id, owner_token)
        pages.pick(request.session_hash, run_id)
        return run_id, shown, owner_token

    refresh = (tick, [panel.current_run, panel.shown, panel.x_axis, panel.owner], views)
    # Ticks and the redraw after an action skip the queue: they only read files.
    now = {**PRIVATE, "concurrency_limit": None}
    picked = [panel.current_run, panel.owner]
    panel.start.click(
        start, [panel.owner, *form.inputs], [panel.current_run, panel.shown], api_visibility="private"
    ).then(*refresh, **now)
    panel.picker.input(pick, panel.picker, [panel.current_run, panel.shown], **PRIVATE).then(*refresh, **now)
    panel.stop.click(functools.partial(_stop, arena), picked, None, api_visibility="private").then(*refresh, **now)
    resume = functools.partial(_resume, arena)
    panel.resume.click(resume, picked, panel.shown, api_visibility="private").then(*refresh, **now)
    cleared = [panel.current_run, panel.shown, *panel.views]
    panel.delete.click(delete, picked, cleared, api_visibility="private").then(*refresh, **now)
    gr.Timer(REFRESH_SECONDS).tick(*refresh, **now)
    # The status line changes with every change of state (a pick, a stop asked for, a run ending).
    actions = [panel.stop, panel.resume, panel.delete]
    panel.status.change(functools.partial(_actions_view, arena), panel.current_run, actions, **now)
    panel.x_axis.change(*refresh, **now)
    demo.load(attach, picked, [panel.current_run, panel.shown, panel.owner], api_visibility="private").then(
        *refresh, **now
    )


def build(demo: gr.Blocks, arena: Arena) -> None:
    """The Train tab inside `demo`: the form, the run panel, and their events."""
    form = _form(arena.offline)
    panel = _panel()
    home = export_panel.owner_panel(arena.offline)
    _wire_form(demo, form, arena.offline)
    _wire_runs(demo, form, panel, arena)
    export_panel.wire(arena, home, panel.download, panel.export_note, panel.status, panel.current_run, panel.owner)
