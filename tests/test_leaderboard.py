"""The run store as one table: ordering, unfinished runs, and exports that are safe to open."""

from __future__ import annotations

import csv
import io

from training.leaderboard import leaderboard, to_csv, to_markdown
from training.runs import RunStore


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


def test_exports_keep_user_text_inert(tmp_path):
    store = RunStore(tmp_path)
    store.create({"task": "sentiment", "method": "lora", "model": "=HYPERLINK(1)|x", "dataset": "d"})
    frame = leaderboard(store)
    row = next(csv.DictReader(io.StringIO(to_csv(frame))))
    assert row["model"] == "'=HYPERLINK(1)|x"  # a spreadsheet shows it as text, never runs it
    assert "=HYPERLINK(1)\\|x" in to_markdown(frame)  # a pipe cannot break the Markdown table
