"""The run store as one table: ordering, unfinished runs, and exports that are safe to open."""

from __future__ import annotations

import csv
import io

import pandas as pd

from lora_methods import METHODS
from training.core.runs import RunStore
from training.research.leaderboard import leaderboard, presentation, to_csv, to_markdown


def _run(store: RunStore, task: str, method: str, metric: str, value: float | None) -> str:
    run = store.create({"task": task, "method": method, "model": "m", "dataset": "d"})
    if value is not None:
        run.update_summary(status="completed", primary_metric=metric, metrics={"validation": {metric: value}})
    return run.id


def test_best_run_first_per_task_and_unfinished_runs_last(tmp_path):
    store = RunStore(tmp_path)
    weak = _run(store, "sentiment", "lora", "accuracy", 0.70)
    strong = _run(store, "sentiment", "full", "accuracy", 0.80)
    running = _run(store, "sentiment", "hira", "accuracy", None)
    low_ppl = _run(store, "generation", "lora", "perplexity", 40.0)
    high_ppl = _run(store, "generation", "qlora", "perplexity", 60.0)
    frame = leaderboard(store)
    assert frame["run"].tolist() == [low_ppl, high_ppl, strong, weak, running]  # perplexity: lower is better
    assert leaderboard(store, "generation")["run"].tolist() == [low_ppl, high_ppl]
    assert frame.loc[frame["run"] == running, "status"].item() == "running"
    # A run stopped before its final evaluation has its row, without a quality figure.
    stopped = store.create({"task": "sentiment", "method": "lora", "model": "m", "dataset": "d"})
    stopped.update_summary(status="stopped", primary_metric="accuracy", metrics=None, steps=4)
    row = leaderboard(store, "sentiment").set_index("run").loc[stopped.id]
    assert row["status"] == "stopped" and row["steps"] == 4 and pd.isna(row["validation"])


def test_exports_keep_user_text_inert(tmp_path):
    store = RunStore(tmp_path)
    store.create({"task": "sentiment", "method": "lora", "model": "=HYPERLINK(1)|x", "dataset": "d"})
    frame = leaderboard(store)
    row = next(csv.DictReader(io.StringIO(to_csv(frame))))
    assert row["model"] == "'=HYPERLINK(1)|x"  # a spreadsheet shows it as text, never runs it
    assert "=HYPERLINK(1)\\|x" in to_markdown(frame)  # a pipe cannot break the Markdown table


def test_memory_is_in_megabytes_of_a_million_bytes_and_old_runs_have_no_training_memory(tmp_path):
    store = RunStore(tmp_path)
    new = store.create({"task": "sentiment", "method": "qlora", "model": "m", "dataset": "d"})
    new.update_summary(status="completed", base_weight_memory_bytes=53_200_000, training_memory_bytes=199_800_000)
    old = store.create({"task": "sentiment", "method": "lora", "model": "m", "dataset": "d"})
    old.update_summary(status="completed", peak_memory_bytes=1_142_616_064)  # the process's RSS, as recorded then
    frame = leaderboard(store).set_index("run")
    assert frame.loc[new.id, "base weights MB"] == 53.2 and frame.loc[new.id, "training memory MB"] == 199.8
    assert pd.isna(frame.loc[old.id, "training memory MB"]) and frame.loc[old.id, "process memory MB"] == 1142.6


def test_the_presentation_is_one_task_with_the_metric_in_its_headers(tmp_path):
    store = RunStore(tmp_path)
    _run(store, "sentiment", "lora", "accuracy", 0.7)
    _run(store, "generation", "lora", "perplexity", 40.0)
    shown = presentation(leaderboard(store, "generation"), "generation")
    assert len(shown) == 1 and shown.columns[:3].tolist() == ["method", "val perplexity", "test perplexity"]
    assert shown.loc[0, "val perplexity"] == 40.0 and shown.loc[0, "test perplexity"] == "n/a"
    assert len(shown.columns) <= 9  # fits 1440 px; every column stays in leaderboard() and the exports


def test_one_colour_per_method_in_the_report_and_the_app():
    from training.core import colours  # plotly: imported where needed, as the CLI does
    from training.research import report  # plotly: imported where needed, as the CLI does
    from ui import charts

    results = {
        "aggregate": {
            "sentiment": {v: {"test_accuracy": {"mean": 0.7, "std": None, "n": 1}} for v in ("lora", "hira")}
        },
        "speed": {"sentiment": [{"label": v, "median_step_s": 0.1} for v in ("lora", "hira")]},
    }
    dots = report.FIGURES["tasks"](results).data[0]
    drawn = dict(zip(dots.y, dots.marker.color))
    frame = pd.DataFrame(
        {"run": ["a", "b"], "task": "sentiment", "method": ["lora", "hira"], "metric": "accuracy", "validation": 0.7}
    ).assign(**{"trainable params": [1, 2]})
    plotted = {trace.name: trace.marker.color for trace in charts.tradeoff_figure(frame, "trainable parameters").data}
    assert drawn == plotted == {"lora": colours.method_colour("lora"), "hira": colours.method_colour("hira")}
    assert colours.method_colour("sparselora-s50") != colours.method_colour("sparselora")  # a shade of its family
    assert colours.family("sparselora-4bit") == "sparselora-4bit" and colours.family("lora-r32") == "lora"
    assert set(METHODS) <= set(colours.METHOD_COLOURS)  # a new method needs its colour
