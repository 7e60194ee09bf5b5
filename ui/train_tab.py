"""Train tab: choose task, model, data and method, start a run, watch it live.

The form is generated from the catalogs and the methods' hyperparameter schemas. A run belongs to
the job manager, not to the page: closing or reloading the tab changes nothing, and the page
re-attaches to the running job (or the browser's last run) when it opens.
"""

from __future__ import annotations

import functools
import html
import secrets
import statistics
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_methods import METHODS, TASKS, HParam
from training import data, models
from training.cli import command_line
from training.engine import TASK_DEFAULTS, TrainConfig

from . import charts
from .arena import USER_ERRORS, Arena, check_dataset_choice, check_model_choice, user_errors

REFRESH_SECONDS = 2.0
DEFAULT_METHOD = "lora"
PREVIEW_ROWS = 5


def _hparam_specs() -> dict[str, HParam]:
    """One form field per hyperparameter name across all methods (the first method's spec)."""
    specs: dict[str, HParam] = {}
    for method in METHODS.values():
        for spec in method.hparams:
            specs.setdefault(spec.name, spec)
    return specs


HPARAMS = _hparam_specs()


def _field(spec: HParam, initial_method: str) -> gr.components.Component:
    """A form field, visible (with the method's default) when the initial method takes it."""
    taken = {s.name: s for s in METHODS[initial_method].hparams}
    visible, value = spec.name in taken, taken[spec.name].default if spec.name in taken else spec.default
    label = f"{spec.name.replace('_', ' ')}" + (f"  ({spec.range_text()})" if spec.range_text() else "")
    if spec.choices:
        return gr.Dropdown(list(spec.choices), value=value, label=label, info=spec.help, visible=visible)
    if spec.kind is str:
        return gr.Textbox(value=value, label=label, info=spec.help, visible=visible)
    precision = 0 if spec.kind is int else None
    return gr.Number(value=value, label=label, info=spec.help, precision=precision, visible=visible)


def model_choices(task: str, offline: bool) -> list[tuple[str, str]]:
    return [
        (f"{entry.id}: {entry.description}" + (" [needs the Hub]" if offline and not entry.bundled else ""), entry.id)
        for entry in models.catalog(task)
    ]


def dataset_choices(task: str, offline: bool) -> list[tuple[str, str]]:
    return [
        (f"{entry.id}: {entry.description}" + (" [needs the Hub]" if offline and not entry.bundled else ""), entry.id)
        for entry in data.catalog(task)
    ]


@functools.lru_cache(maxsize=16)
def _dataset_overview(dataset: str, task: str, offline: bool) -> tuple[str, pd.DataFrame]:
    splits = data.load_splits(dataset, task, offline)
    sizes = splits.sizes()
    text = "**Splits** " + " · ".join(f"{name} {count:,}" for name, count in sizes.items())
    if splits.controlled:
        text += " · generations are judged for sentiment control"
    return text, splits.train.select(range(min(PREVIEW_ROWS, len(splits.train)))).to_pandas()


def _stale(task: str, model: str | None, dataset: str | None) -> bool:
    """An event that read the form while a task switch was being applied: the other task's
    catalog model or dataset next to this task. Its handler leaves the page alone."""
    other = [t for t in TASKS if t != task]
    return any(entry.id == model for entry in models.CATALOG if entry.task in other) or any(
        entry.id == dataset for entry in data.CATALOG if entry.task in other
    )


def _whole(value: Any) -> Any:
    """Form numbers arrive as floats; whole ones become ints (others fail validation with a message)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def form_config(
    task: str,
    model: str,
    dataset: str,
    upload: str | None,
    method: str,
    seed: float,
    max_steps: float,
    batch_size: float,
    seq_len: float,
    eval_steps: float | None,
    eval_samples: float | None,
    *hparam_values: Any,
) -> TrainConfig:
    values = dict(zip(HPARAMS, hparam_values))
    taken = {spec.name for spec in METHODS[method].hparams} if method in METHODS else set()
    return TrainConfig(
        task=task,
        method=method,
        model=model or None,
        dataset=upload or dataset or None,
        hparams={name: _whole(value) for name, value in values.items() if name in taken},
        max_steps=_whole(max_steps),
        batch_size=_whole(batch_size),
        seq_len=_whole(seq_len),
        seed=_whole(seed) if seed is not None else 0,
        eval_steps=_whole(eval_steps) or None,
        eval_samples=_whole(eval_samples) or None,
    )


def _progress_html(step: int, planned: int | None, step_times: list[float], state: str) -> str:
    if not planned:
        return ""
    share = min(1.0, step / planned)
    recent = statistics.median(step_times[-20:]) if step_times else None
    eta = f" · ETA {_duration((planned - step) * recent)}" if recent and state == "running" else ""
    speed = f" · {recent:.2f} s/step" if recent else ""
    return (
        f'<div class="arena-progress"><div class="arena-progress-bar" style="width:{100 * share:.1f}%"></div></div>'
        f'<div class="arena-progress-text">step {step} / {planned}{speed}{eta}</div>'
    )


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def _status_markdown(state: dict) -> str:
    run_id = html.escape(state["id"])
    messages = {
        "queued": f"**Queued**: position {state['queue_position']} in line",
        "starting": "**Starting**: loading the model and data",
        "running": "**Training**",
        "cancelled": "**Cancelled** before it started",
    }
    text = messages.get(state["state"])
    if text is None:
        status = state.get("status") or state["state"]
        text = f"**{status.capitalize()}**"
    if state.get("error"):
        text += f": {html.escape(state['error'])}"
    return f"{text} · run `{run_id}`"


def _summary_markdown(summary: dict, records: list[dict]) -> str:
    train = [r for r in records if r.get("kind") == "train"]
    rows = []
    if "trainable_params" in summary:
        rows.append(("trainable parameters", f"{summary['trainable_params']:,} ({summary['trainable_percent']:.2f}%)"))
    if train:
        peak = max(r.get("cuda_peak_bytes", r.get("rss_bytes", 0)) for r in train)
        rows.append(("peak memory", f"{peak / 2**20:,.0f} MB"))
        rows.append(("median step time", f"{statistics.median(r['step_time_s'] for r in train):.3f} s"))
        rows.append(("latest loss", f"{train[-1]['loss']:.4f}"))
    metric = summary.get("primary_metric")
    if metric and summary.get("base_metrics"):
        rows.append((f"base validation {metric}", f"{summary['base_metrics']['validation'][metric]:.4f}"))
    evals = [r for r in records if r.get("kind") == "eval" and metric in r]
    if evals:
        rows.append((f"validation {metric} (step {evals[-1]['step']})", f"{evals[-1][metric]:.4f}"))
    if summary.get("metrics"):
        for split in ("validation", "test"):
            rows.append((f"final {split} {metric}", f"{summary['metrics'][split][metric]:.4f}"))
        if summary["metrics"].get("control_share") is not None:
            rows.append(("sentiment-control share", f"{summary['metrics']['control_share']:.3f}"))
    if not rows:
        return ""
    return "| this run | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def build(demo: gr.Blocks, arena: Arena) -> None:
    offline = arena.offline
    connectivity = (
        "**Offline**: bundled models and data only (the Hub is not reachable)"
        if offline
        else "**Online**: bundled models and the Hugging Face Hub"
    )
    with gr.Row():
        with gr.Column(scale=5):
            task = gr.Radio(list(TASKS), value="sentiment", label="Task", info="classify reviews, or write text")
            gr.Markdown(connectivity, elem_classes="arena-connectivity")
            model = gr.Dropdown(
                model_choices("sentiment", offline),
                value=models.default_model("sentiment", offline),
                label="Model",
                info="a catalog model, or type a Hub id (owner/name) when online",
                allow_custom_value=True,
            )
            dataset = gr.Dropdown(
                dataset_choices("sentiment", offline),
                value=data.default_dataset("sentiment", offline),
                label="Dataset",
                allow_custom_value=True,  # checked on start; lets a stale event through without an error
            )
            upload = gr.File(
                label="...or upload a CSV / JSONL (sentiment: text,label; generation: text or prompt,completion)",
                file_types=[".csv", ".jsonl"],
                type="filepath",
                elem_id="dataset-upload",
            )
            dataset_info = gr.Markdown(elem_id="dataset-info")
            preview = gr.Dataframe(label="First rows of the training split", interactive=False, max_height=220)
        with gr.Column(scale=5):
            method = gr.Radio(
                [(f"{m.title}: {m.summary}", m.name) for m in METHODS.values()],
                value=DEFAULT_METHOD,
                label="Method",
                elem_classes="arena-method-cards",
            )
            with gr.Group():
                fields = {name: _field(spec, DEFAULT_METHOD) for name, spec in HPARAMS.items()}
            with gr.Accordion("Budget, seed and evaluation", open=False):
                with gr.Row():
                    max_steps = gr.Number(
                        TASK_DEFAULTS["sentiment"]["max_steps"], label="steps", precision=0, elem_id="max-steps"
                    )
                    seed = gr.Number(0, label="seed", precision=0)
                with gr.Row():
                    batch_size = gr.Number(TASK_DEFAULTS["sentiment"]["batch_size"], label="batch size", precision=0)
                    seq_len = gr.Number(TASK_DEFAULTS["sentiment"]["seq_len"], label="sequence length", precision=0)
                with gr.Row():
                    eval_steps = gr.Number(None, label="evaluate every N steps (empty: 5 times)", precision=0)
                    eval_samples = gr.Number(
                        None, label="validation examples (empty: task default)", precision=0, elem_id="eval-samples"
                    )
    command = gr.Code(label="The same run from a terminal", language="shell", interactive=False)
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="start-button", scale=3)
        stop = gr.Button("Stop", variant="stop", elem_id="stop-button", scale=1)
        resume = gr.Button("Resume", elem_id="resume-button", scale=1)
        delete = gr.Button("Delete run", elem_id="delete-button", scale=1)
    job_status = gr.Markdown(elem_id="job-status")
    progress = gr.HTML(elem_id="job-progress")
    with gr.Row():
        loss_x = gr.Radio(["step", "time"], value="step", label="Loss x axis", scale=1)
        summary = gr.Markdown(elem_id="job-summary")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
        resources_plot = gr.Plot(label="Memory and speed", elem_id="resources-plot")

    # The run this page shows, and this browser's owner token (only it may stop, resume or delete
    # the runs it started); both kept in the browser so a reload finds them again.
    current_run = gr.BrowserState(None, storage_key="lora-arena-current-run")
    owner = gr.BrowserState("", storage_key="lora-arena-owner")
    drawn = gr.State(None)  # what the charts show now: (records, state, status, x axis)
    timer = gr.Timer(REFRESH_SECONDS)

    form = [task, model, dataset, upload, method, seed, max_steps, batch_size, seq_len, eval_steps, eval_samples]
    form += list(fields.values())

    def on_task(task_name: str):
        defaults = TASK_DEFAULTS[task_name]
        return (
            gr.update(choices=model_choices(task_name, offline), value=models.default_model(task_name, offline)),
            gr.update(choices=dataset_choices(task_name, offline), value=data.default_dataset(task_name, offline)),
            defaults["max_steps"],
            defaults["batch_size"],
            defaults["seq_len"],
            None,
        )

    def on_method(method_name: str):
        taken = {spec.name: spec for spec in METHODS[method_name].hparams}
        return [
            gr.update(visible=name in taken, value=taken[name].default if name in taken else None) for name in HPARAMS
        ]

    def on_dataset(task_name: str, dataset_id: str, upload_path: str | None):
        source = upload_path or dataset_id
        if _stale(task_name, None, dataset_id):
            return gr.skip(), gr.skip()
        if not source:
            return "", None
        try:
            if not upload_path:
                check_dataset_choice(dataset_id, task_name)
            text, rows = _dataset_overview(source, task_name, offline)
        except USER_ERRORS as error:
            return f"**Cannot use this dataset**: {html.escape(str(error))}", None
        if upload_path:
            text = f"**Upload** `{html.escape(Path(upload_path).name)}` · " + text
        return text, rows

    def on_form(*values):
        if _stale(*values[:3]):
            return gr.skip()
        try:
            config = form_config(*values)
            check_model_choice(config.model, config.task, offline)
            if not values[form.index(upload)]:
                check_dataset_choice(config.dataset, config.task)
            config.resolved()
            return command_line(config)
        except (*USER_ERRORS, KeyError, TypeError) as error:
            return f"# cannot start yet: {error}"

    # Events chain explicitly (`.then`), and edits listen to `.input` (a person's change only): a
    # handler reading the form while another one's updates are still being applied in the browser
    # would see the other task's model against the new task's choices.
    private = {"api_visibility": "private", "show_progress": "hidden"}
    dataset_outputs = ([task, dataset, upload], [dataset_info, preview])
    task.input(on_task, task, [model, dataset, max_steps, batch_size, seq_len, upload], **private).then(
        on_form, form, command, **private
    ).then(on_dataset, *dataset_outputs, **private)
    method.input(on_method, method, list(fields.values()), **private).then(on_form, form, command, **private)
    for trigger in (dataset.input, upload.upload, upload.clear):
        trigger(on_dataset, *dataset_outputs, **private).then(on_form, form, command, **private)
    for component in form:
        if component not in (task, method, dataset, upload):
            component.input(on_form, form, command, **private)

    def on_start(owner_token: str, *values):
        with user_errors():
            run_id = arena.start(form_config(*values), owner_token, upload=values[form.index(upload)])
        gr.Info(f"Run {run_id} queued")
        return run_id, None

    start.click(on_start, [owner, *form], [current_run, drawn], api_visibility="private")

    def on_stop(run_id: str | None, owner_token: str):
        if not run_id:
            raise gr.Error("There is no run on this page to stop.")
        with user_errors():
            gr.Info(arena.jobs.stop(run_id, owner_token))

    stop.click(on_stop, [current_run, owner], None, api_visibility="private")

    def on_resume(run_id: str | None, owner_token: str):
        if not run_id:
            raise gr.Error("There is no run on this page to resume.")
        with user_errors():
            arena.jobs.resume(run_id, owner_token)
        gr.Info(f"Run {run_id} queued to resume from its last checkpoint")
        return None  # redraw from the run's history

    resume.click(on_resume, [current_run, owner], drawn, api_visibility="private")

    def on_delete(run_id: str | None, owner_token: str):
        if not run_id:
            raise gr.Error("There is no run on this page to delete.")
        with user_errors():
            gr.Info(arena.delete(run_id, owner_token))
        return None, None, "", "", charts.loss_figure([]), charts.resources_figure([]), ""

    delete.click(
        on_delete,
        [current_run, owner],
        [current_run, drawn, job_status, progress, loss_plot, resources_plot, summary],
        api_visibility="private",
    )

    def refresh(run_id: str | None, shown: tuple | None, x_axis: str):
        nothing = (gr.skip(),) * 6
        if not run_id:
            return nothing
        try:
            state = arena.jobs.describe(run_id)
            records = arena.records(run_id) if state["summary"] else []
        except USER_ERRORS:
            return nothing
        key = (len(records), state["state"], state.get("status"), x_axis)
        if shown is not None and tuple(shown) == key:
            return nothing  # nothing new since the last tick: leave the page as it is
        summary = state["summary"]
        train = [r for r in records if r.get("kind") == "train"]
        step = train[-1]["step"] if train else 0
        return (
            _status_markdown(state),
            _progress_html(step, summary.get("planned_steps"), [r["step_time_s"] for r in train], state["state"]),
            charts.loss_figure(records, x_axis),
            charts.resources_figure(records),
            _summary_markdown(summary, records),
            list(key),
        )

    outputs = [job_status, progress, loss_plot, resources_plot, summary, drawn]
    timer.tick(
        refresh,
        [current_run, drawn, loss_x],
        outputs,
        api_visibility="private",
        show_progress="hidden",
        concurrency_limit=None,
    )
    loss_x.change(refresh, [current_run, drawn, loss_x], outputs, api_visibility="private", show_progress="hidden")

    def attach(run_id: str | None, owner_token: str):
        """On page load: this browser's owner token (made once), and the running job if there is
        one, else this browser's last run."""
        owner_token = owner_token or secrets.token_urlsafe(16)
        active = arena.jobs.active()
        if active:
            return active[0].id, None, owner_token
        try:
            arena.jobs.describe(run_id or "")
        except USER_ERRORS:
            return None, None, owner_token  # none yet, or a run deleted since
        return run_id, None, owner_token

    demo.load(attach, [current_run, owner], [current_run, drawn, owner], api_visibility="private")
    demo.load(on_form, form, command, api_visibility="private")
    demo.load(on_dataset, [task, dataset, upload], [dataset_info, preview], api_visibility="private")
