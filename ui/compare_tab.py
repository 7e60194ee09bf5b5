"""Compare tab: one task's runs side by side (the figures a talk needs, every column a click
away and in the exports), their loss curves overlaid, quality against a cost."""

from __future__ import annotations

import hashlib
import tempfile
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from training.core.metrics import PRIMARY_METRICS
from training.research import report
from training.research.leaderboard import presentation, to_csv, to_markdown
from training.research.suite import RESULTS_DIR

from . import charts, export_panel
from .arena import Arena, kept_selection, user_errors

# One task at a time: accuracy and perplexity cannot share a column or an axis.
TASKS = list(PRIMARY_METRICS)
SORTS = {
    "best quality first": None,  # the leaderboard's own order
    "newest first": ("run", False),
    "fewest trainable parameters": ("trainable params", True),
    "fastest step": ("median step s", True),
    "least training memory": ("training memory MB", True),
    "least base-weight memory": ("base weights MB", True),
    "shortest total time": ("total time s", True),
}


def _table(arena: Arena, task: str, sort: str) -> pd.DataFrame:
    frame = arena.leaderboard(task)
    if SORTS.get(sort) and not frame.empty:
        column, ascending = SORTS[sort]
        frame = frame.sort_values(column, ascending=ascending, na_position="last", kind="stable")
    return frame


EXPORTS = Path(tempfile.mkdtemp(prefix="lora-arena-export-"))  # one folder for this app process


def _export(text: str, task: str, suffix: str) -> str:
    """A file holding `text`, named by its date and content: every refresh of the same table reuses
    it (a folder per refresh would grow without end on a long-running Space)."""
    digest = hashlib.sha1(text.encode()).hexdigest()[:8]
    path = EXPORTS / f"leaderboard-{task}-{time.strftime('%Y%m%d')}-{digest}{suffix}"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return str(path)


def build(demo: gr.Blocks, arena: Arena, tab: gr.Tab, results_dir: Path = RESULTS_DIR) -> None:
    with gr.Row():
        task = gr.Radio(TASKS, value=TASKS[0], label="Task")
        sort = gr.Dropdown(list(SORTS), value="best quality first", label="Sort")
        refresh = gr.Button("Refresh", scale=0)
    table = gr.Dataframe(
        label="Leaderboard (MB = 10^6 bytes; training memory: weights, gradients, optimizer state and saved "
        "activations at the peak step; n/a: not measured, e.g. the quality of a run stopped before its final "
        "evaluation)",
        interactive=False,
        wrap=True,
        max_height=420,
        elem_id="leaderboard",
    )
    with gr.Accordion("Every column (also in the CSV and Markdown downloads)", open=False):
        details = gr.Dataframe(interactive=False, wrap=False, max_height=420, show_label=False)
    with gr.Row():
        export_csv = gr.DownloadButton("Download CSV", variant="secondary")
        export_md = gr.DownloadButton("Download Markdown", variant="secondary")
    take_home = export_panel.download_row(arena, "Take a run home: its adapter as a .zip", "compare-take-home")
    with gr.Row():
        with gr.Column():
            selected = gr.Dropdown([], multiselect=True, label="Runs to overlay", elem_id="compare-runs")
            curve_x = gr.Radio(["step", "time"], value="step", label="x axis")
            curves = gr.Plot(label="Training loss", show_label=False)
        with gr.Column():
            tradeoff_x = gr.Radio(list(charts.TRADEOFF_AXES), value="trainable parameters", label="Cost axis")
            tradeoff = gr.Plot(label="Quality vs cost", show_label=False)

    filled = gr.State(False)  # whether the overlay list has had its default runs (per task shown)

    def show(task_name: str, sort_name: str, x_axis: str, chosen: list[str] | None, home: str | None, done: bool):
        frame = _table(arena, task_name, sort_name)
        runs = frame["run"].tolist()
        return (
            presentation(frame, task_name),
            frame,
            _export(to_csv(frame), task_name, ".csv"),
            _export(to_markdown(frame), task_name, ".md"),
            gr.update(choices=runs, value=kept_selection(chosen, runs, 3, done)),
            charts.tradeoff_figure(frame, x_axis),
            gr.update(choices=runs, value=home if home in runs else None),
            done or bool(runs),
        )

    def show_task(task_name: str, sort_name: str, x_axis: str, chosen: list[str] | None, home: str | None, done: bool):
        return show(task_name, sort_name, x_axis, chosen, home, done=False)  # another task: its best runs again

    outputs = [table, details, export_csv, export_md, selected, tradeoff, take_home.chooser, filled]
    inputs = [task, sort, tradeoff_x, selected, take_home.chooser, filled]
    take_home.follow(task.change(show_task, inputs, outputs, api_visibility="private"))
    for trigger in (refresh.click, sort.change, tradeoff_x.change, demo.load, tab.select):
        take_home.follow(trigger(show, inputs, outputs, api_visibility="private"))

    def draw_curves(chosen: list[str] | None, x_axis: str):
        with user_errors():
            methods = {run_id: arena.method_of(run_id) for run_id in chosen or []}  # RunNotFound: unknown id
            return charts.curves_figure({run_id: arena.records(run_id) for run_id in methods}, methods, x_axis)

    for trigger in (selected.change, curve_x.change):
        trigger(draw_curves, [selected, curve_x], curves, api_visibility="private")

    shipped = report.read(results_dir)
    if shipped is not None:
        with gr.Accordion("Benchmark results (make bench): every method under equal budgets", open=False):
            gr.Markdown(
                report.headline_tables(shipped)
                + "\nThe answers to the research questions and the figures are in the Guide tab; "
                f"the report is `{report.report_path(results_dir)}`."
            )
