"""The run store as one table: ordering, unfinished runs, and exports that are safe to open."""

from __future__ import annotations

import csv
import io

import pandas as pd
import pytest

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
    exported = list(csv.DictReader(io.StringIO(to_csv(leaderboard(store, "sentiment")))))
    assert [r["steps"] for r in exported if r["run"] == stopped.id] == ["4"]  # not 4.0 beside runs without a count


def test_a_classifier_answering_one_class_shows_it_in_macro_f1(tmp_path):
    store = RunStore(tmp_path)
    run = store.create({"task": "sentiment", "method": "lora", "model": "m", "dataset": "d"})
    one_class = {"accuracy": 0.52, "macro_f1": 0.34}  # the majority's accuracy, nothing learned
    run.update_summary(
        status="completed", primary_metric="accuracy", metrics={"validation": one_class, "test": one_class}
    )
    row = leaderboard(store).iloc[0]
    assert row["test"] == 0.52 and row["test macro-F1"] == 0.34


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
    _run(store, "generation", "hira", "perplexity", None)  # still training
    shown = presentation(leaderboard(store, "generation"), "generation").data
    assert shown["method"].tolist() == ["lora", "hira (running)"]
    assert len(shown) == 2 and shown.columns[:4].tolist() == [
        "method",
        "precision",
        "val perplexity",
        "test perplexity",
    ]
    assert shown.loc[0, "val perplexity"] == 40.0 and pd.isna(shown.loc[0, "test perplexity"])
    assert len(shown.columns) <= 10  # fits 1440 px; every column stays in leaderboard() and the exports


def test_the_presentation_gives_each_column_one_precision_and_keeps_numbers_underneath(tmp_path):
    store = RunStore(tmp_path)
    figures = [(0.8271, 1_682_660_000, 20.306, 546.4), (0.81, 1_883_000_000, 3.936, 147.0)]
    for accuracy, memory, step, wall in figures:
        run = store.create({"task": "sentiment", "method": "lora", "model": "m", "dataset": "d"})
        run.update_summary(
            status="completed",
            primary_metric="accuracy",
            metrics={"validation": {"accuracy": accuracy}},
            training_memory_bytes=memory,
            median_step_time_s=step,
            wall_time_s=wall,
        )
    styled = presentation(leaderboard(store, "sentiment"), "sentiment")
    rows = [line.split()[2:] for line in styled.to_string().splitlines()[1:]]
    # val, test, trainable %, base weights MB, training memory MB, step s, total time s
    assert [row[:7] for row in rows] == [
        ["82.7%", "n/a", "n/a", "n/a", "1,682.7", "20.306", "546"],
        ["81.0%", "n/a", "n/a", "n/a", "1,883.0", "3.936", "147"],
    ]
    assert styled.data["training memory MB"].tolist() == [1682.7, 1883.0]  # sorted by value, not by text


def test_one_colour_per_method_in_the_report_and_the_app():
    from training.core import colours  # plotly: imported where needed, as the CLI does
    from training.research import report  # plotly: imported where needed, as the CLI does
    from ui import charts

    cell = {"test_accuracy": {"mean": 0.7, "std": None, "n": 1}, "trainable_params": 10, "base_weight_memory_bytes": 1}
    results = {
        "plans": [{"name": "sentiment", "task": "sentiment"}],
        "aggregate": {"sentiment": {v: cell for v in ("lora", "hira")}},
        "speed": {"sentiment": []},
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


def test_the_trade_off_chart_keeps_a_method_s_shape_whatever_else_is_plotted():
    from ui import charts

    def shapes(methods: list[str], task: str = "sentiment") -> dict[str, str]:
        frame = pd.DataFrame(
            {"run": methods, "task": task, "method": methods, "metric": "accuracy", "validation": 0.7}
        ).assign(**{"trainable params": 100_000})  # one point: the shapes tell them apart
        figure = charts.tradeoff_figure(frame, "trainable parameters")
        return {trace.name: trace.marker.symbol for trace in figure.data}

    alone, beside = shapes(["lora", "sparselora"]), shapes(["dora", "hira", "sparselora", "sparselora-s50"])
    assert alone["sparselora"] == beside["sparselora"] == beside["sparselora-s50"]  # a variant: its family's
    assert len(set(beside.values())) == 3 and alone["lora"] != alone["sparselora"]  # dora, hira, sparselora


def _finished(store: RunStore, method: str, accuracy: float, steps: int) -> None:
    run = store.create({"task": "sentiment", "method": method, "model": "m", "dataset": "d"})
    run.update_summary(
        status="completed",
        steps=steps,
        primary_metric="accuracy",
        metrics={"validation": {"accuracy": accuracy}},
        trainable_params=100,
        median_step_time_s=0.2 if method == "lora" else 0.4,
    )


def test_the_stores_runs_answer_the_research_questions_on_equal_work_only(tmp_path):
    from training.research import report  # plotly: imported where needed, as the CLI does

    store = RunStore(tmp_path)
    for accuracy in (0.70, 0.80):
        _finished(store, "lora", accuracy, steps=20)
    _finished(store, "hira", 0.90, steps=20)
    _finished(store, "hira", 0.99, steps=40)  # no LoRA run of this budget: compared with nothing
    table = report.store_rows(store)
    assert [row.plan for row in table][0] == "sentiment: `m` on `d`, 40 steps"  # the largest budget first
    assert {(row.plan, row.variant, row.n) for row in table} == {
        ("sentiment: `m` on `d`, 40 steps", "hira", 1),
        ("sentiment: `m` on `d`, 20 steps", "lora", 2),
        ("sentiment: `m` on `d`, 20 steps", "hira", 1),
    }
    said = report.answers(table)["hira"]
    assert said.startswith("sentiment: `m` on `d`, 20 steps, rank 8") and "40 steps" not in said
    assert "HiRA 90.0% (n=1) vs LoRA 75.0% ± 7.1 (n=2) (+15.0 points), step 0.50x LoRA's speed" in said
    assert report.answers(table)["sparselora"] == ""  # not measured: the Guide says so


def test_one_smoothing_for_the_live_charts_and_the_report():
    from training.core.presentation import smooth
    from ui import charts

    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # debiased: not pulled towards 0
    assert smooth([0.0, 1.0], 0.5) == pytest.approx([0.0, 2 / 3])
    records = [{"kind": "train", "step": step, "loss": loss} for step, loss in enumerate((3.0, 1.0, 2.0), 1)]
    drawn = charts.loss_figure(records).data[1].y
    assert list(drawn) == pytest.approx(smooth([3.0, 1.0, 2.0], charts.SMOOTHING))


def test_the_quality_chart_bounds_an_accuracy_axis_to_0_and_1_and_leaves_perplexity_free():
    from ui import charts  # plotly: imported where needed, as the CLI does

    def one_run(metric: str, value: float):
        frame = pd.DataFrame({"run": ["a"], "task": "t", "method": ["lora"], "metric": metric, "validation": value})
        return charts.tradeoff_figure(frame.assign(**{"trainable params": [10]}), "trainable parameters").layout.yaxis

    accuracy = one_run("accuracy", 0.53)  # alone, plotly would pad it to an axis from about -0.5 to 1.5
    assert (accuracy.autorangeoptions.minallowed, accuracy.autorangeoptions.maxallowed) == (0, 1)
    assert accuracy.tickformat == ".0%"  # in percent, as the leaderboard beside it
    perplexity = one_run("perplexity", 41.0)
    assert perplexity.autorangeoptions.maxallowed is None and perplexity.tickformat is None
