"""The run store as one table: every run's task, method, precision, quality, size, memory and time.

The Compare tab, its CSV/Markdown export, the `/list_runs` endpoint and `python -m training list`
all read this table; `presentation` is the few columns a talk needs, for one task.
"""

from __future__ import annotations

import functools

import pandas as pd
from pandas.io.formats.style import Styler

from training.core.memory import MB
from training.core.metrics import LOWER_IS_BETTER, PRIMARY_METRICS, metric_text, primary_metric
from training.core.presentation import markdown_table
from training.core.runs import RunStore

COLUMNS = (
    "run",
    "status",
    "task",
    "model",
    "method",
    "precision",
    "dataset",
    "steps",
    "metric",
    "validation",
    "test",
    "base validation",
    "test macro-F1",
    "control share",
    "trainable params",
    "trainable %",
    "base weights MB",
    "training memory MB",
    "process memory MB",
    "median step s",
    "train time s",
    "total time s",
    "adapter MB",
)
# What a presentation shows, in this order; the rest stays in the details view and the exports.
KEY_COLUMNS = (
    "method",
    "precision",
    "validation",
    "test",
    "trainable %",
    "base weights MB",
    "training memory MB",
    "median step s",
    "total time s",
    "run",
)


def _megabytes(value: float | None) -> float | None:
    return round(value / MB, 1) if value else None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if isinstance(value, (int, float)) else None


def _row(run_id: str, config: dict, summary: dict) -> dict:
    """One run's leaderboard row. Memory is the tensor accounting (weights, gradients, optimizer
    state, saved activations): runs recorded before it have only the process's resident set,
    which is mostly the runtime, so their training memory stays empty rather than wrong."""
    metric = summary.get("primary_metric") or primary_metric(config.get("task"))
    metrics = summary.get("metrics") or {}  # none for a run stopped before its final evaluation
    return {
        "run": run_id,
        "status": summary.get("status", "unknown"),
        "task": config.get("task"),
        "model": config.get("model"),
        "method": config.get("method"),
        "precision": config.get("precision", "fp32"),  # runs recorded before the setting trained in fp32
        "dataset": config.get("dataset"),
        "steps": summary.get("steps"),
        "metric": metric,
        "validation": _rounded(metrics.get("validation", {}).get(metric)),
        "test": _rounded(metrics.get("test", {}).get(metric)),
        "base validation": _rounded(summary.get("base_metrics", {}).get("validation", {}).get(metric)),
        # sentiment: a run answering one class keeps the majority's accuracy; this column shows it
        "test macro-F1": _rounded(metrics.get("test", {}).get("macro_f1")),
        "control share": _rounded(metrics.get("control_share"), 3),
        "trainable params": summary.get("trainable_params"),
        "trainable %": _rounded(summary.get("trainable_percent"), 3),
        "base weights MB": _megabytes(summary.get("base_weight_memory_bytes")),
        "training memory MB": _megabytes(summary.get("training_memory_bytes")),
        "process memory MB": _megabytes(summary.get("peak_rss_bytes") or summary.get("peak_memory_bytes")),
        "median step s": _rounded(summary.get("median_step_time_s"), 3),
        "train time s": _rounded(summary.get("train_time_s"), 1),
        "total time s": _rounded(summary.get("wall_time_s"), 1),
        "adapter MB": _megabytes(summary.get("adapter_size_bytes")),
    }


def leaderboard(store: RunStore, task: str | None = None) -> pd.DataFrame:
    """One row per run (of `task`, or all), best quality first within each task (the metric's
    better direction), unfinished runs last."""
    rows = [_row(run.id, run.config, run.summary) for run in store.runs() if not task or run.config.get("task") == task]
    # Counts stay whole numbers where a run lacks one (20, not 20.0, in the table and the exports).
    frame = pd.DataFrame(rows, columns=list(COLUMNS)).astype({"steps": "Int64", "trainable params": "Int64"})
    if frame.empty:
        return frame
    # Sort key: finished runs by quality (sign-flipped where lower is better), then the rest.
    score = frame["validation"].astype(float) * frame["metric"].map(lambda m: 1 if m in LOWER_IS_BETTER else -1)
    return (
        frame.assign(_score=score)
        .sort_values(["task", "_score", "run"], na_position="last")
        .drop(columns="_score")
        .reset_index(drop=True)
    )


def presentation(frame: pd.DataFrame, task: str) -> Styler:
    """`frame` (one task's rows) cut to KEY_COLUMNS, the metric named in the quality headers
    ("val accuracy"), an unfinished run's status beside its method, and each figure at one
    precision down its column (82.7%, 1,682.7 MB, 0.500 s a step), so a slide needs no legend. The figures
    stay numbers underneath: a column sorts by value, not by its text."""
    metric = PRIMARY_METRICS[task]
    shown = frame[list(KEY_COLUMNS)].copy()
    # A run still training, stopped or failed says so where the eye starts: its n/a figures are not a result.
    unfinished = frame["status"] != "completed"
    shown.loc[unfinished, "method"] = shown.loc[unfinished, "method"] + " (" + frame.loc[unfinished, "status"] + ")"
    quality = functools.partial(metric_text, metric)
    formats = {
        f"val {metric}": quality,
        f"test {metric}": quality,
        "trainable %": "{:.3f}",
        "base weights MB": "{:,.1f}",
        "training memory MB": "{:,.1f}",
        "step s": "{:.3f}",
        "total time s": "{:,.0f}",
    }
    shown = shown.rename(columns={"validation": f"val {metric}", "test": f"test {metric}", "median step s": "step s"})
    return shown.style.format(formats, na_rep="n/a").hide(axis="index")


def to_csv(frame: pd.DataFrame) -> str:
    """CSV in which no cell can run as a spreadsheet formula (a model or dataset name is user text)."""

    def defuse(value):
        return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value

    return frame.map(defuse).to_csv(index=False)


def to_markdown(frame: pd.DataFrame) -> str:
    """The table as GitHub-flavoured Markdown (the Compare tab's download)."""
    return markdown_table(list(frame.columns), frame.itertuples(index=False))
