"""The run store as one table: every run's task, method, quality, size, memory and time.

The Compare tab, its CSV/Markdown export and `python -m training list` all read this table.
"""

from __future__ import annotations

import pandas as pd

from .runs import RunStore

COLUMNS = (
    "run",
    "status",
    "task",
    "model",
    "method",
    "dataset",
    "steps",
    "metric",
    "validation",
    "test",
    "base validation",
    "control share",
    "trainable params",
    "trainable %",
    "peak memory MB",
    "base weights MB",
    "median step s",
    "total time s",
    "adapter MB",
)
# Higher is better for every metric but perplexity; the table sorts each task's best run first.
LOWER_IS_BETTER = {"perplexity"}


def _megabytes(value: float | None) -> float | None:
    return round(value / 2**20, 1) if value else None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if isinstance(value, (int, float)) else None


def leaderboard(store: RunStore, task: str | None = None) -> pd.DataFrame:
    """One row per run (of `task`, or all), best quality first within each task, unfinished runs last."""
    rows = []
    for run in store.runs():
        config, summary = run.config, run.summary
        if task and config.get("task") != task:
            continue
        metric = summary.get("primary_metric") or ("accuracy" if config.get("task") == "sentiment" else "perplexity")
        metrics = summary.get("metrics", {})
        rows.append(
            {
                "run": run.id,
                "status": summary.get("status", "unknown"),
                "task": config.get("task"),
                "model": config.get("model"),
                "method": config.get("method"),
                "dataset": config.get("dataset"),
                "steps": summary.get("steps"),
                "metric": metric,
                "validation": _rounded(metrics.get("validation", {}).get(metric)),
                "test": _rounded(metrics.get("test", {}).get(metric)),
                "base validation": _rounded(summary.get("base_metrics", {}).get("validation", {}).get(metric)),
                "control share": _rounded(metrics.get("control_share"), 3),
                "trainable params": summary.get("trainable_params"),
                "trainable %": _rounded(summary.get("trainable_percent"), 3),
                "peak memory MB": _megabytes(summary.get("peak_memory_bytes")),
                "base weights MB": _megabytes(summary.get("base_weight_memory_bytes")),
                "median step s": _rounded(summary.get("median_step_time_s"), 3),
                "total time s": _rounded(summary.get("train_time_s"), 1),
                "adapter MB": _megabytes(summary.get("adapter_size_bytes")),
            }
        )
    frame = pd.DataFrame(rows, columns=list(COLUMNS))
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


def to_csv(frame: pd.DataFrame) -> str:
    """CSV in which no cell can run as a spreadsheet formula (a model or dataset name is user text)."""

    def defuse(value):
        return "'" + value if isinstance(value, str) and value[:1] in ("=", "+", "-", "@") else value

    return frame.map(defuse).to_csv(index=False)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped), without extra dependencies."""

    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return ""
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"
