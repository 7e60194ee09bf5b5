"""Plotly figures drawn from run-store records (metrics.jsonl lines and leaderboard rows)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from training.colours import method_colour

MAX_POINTS = 400  # per trace: a long run's chart stays light to send and draw
SMOOTHING = 0.9  # exponential moving average weight, as TensorBoard's default
LAYOUT = {
    "template": "plotly_white",
    "height": 300,
    "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
    "legend": {"orientation": "h", "y": -0.25},
}
X_AXES = {"step": ("step", "step"), "time": ("elapsed_s", "wall-clock time (s)")}


def _thin(records: list[dict]) -> list[dict]:
    stride = max(1, -(-len(records) // MAX_POINTS))
    thinned = records[::stride]
    if records and thinned[-1] is not records[-1]:
        thinned.append(records[-1])  # always show the latest point
    return thinned


def smooth(values: list[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: the first points are not pulled towards zero."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def _empty(title: str, message: str) -> go.Figure:
    figure = go.Figure(layout={**LAYOUT, "title": title})
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


def loss_figure(records: list[dict], x: str = "step") -> go.Figure:
    """Training loss (raw and smoothed) and, where evaluated, validation loss."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "loss" in r]
    if not train:
        return _empty("Loss", "waiting for the first step")
    key, label = X_AXES[x]
    shown = _thin(train)
    figure = go.Figure(layout={**LAYOUT, "title": "Loss", "xaxis_title": label, "yaxis_title": "loss"})
    xs = [r[key] for r in shown]
    figure.add_scatter(x=xs, y=[r["loss"] for r in shown], name="training loss", line={"width": 1}, opacity=0.35)
    figure.add_scatter(x=xs, y=smooth([r["loss"] for r in shown]), name="smoothed", line={"width": 2.5})
    if evals:
        figure.add_scatter(
            x=[r[key] for r in evals],
            y=[r["loss"] for r in evals],
            name="validation loss",
            mode="markers+lines",
            marker={"size": 9, "symbol": "diamond"},
        )
    return figure


def resources_figure(records: list[dict]) -> go.Figure:
    """Memory (resident set, or CUDA peak) and throughput over wall-clock time, on two rows."""
    train = _thin([r for r in records if r.get("kind") == "train"])
    if not train:
        return _empty("Memory and speed", "waiting for the first step")
    figure = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.12)
    times = [r["elapsed_s"] for r in train]
    memory_key = "cuda_peak_bytes" if "cuda_peak_bytes" in train[-1] else "rss_bytes"
    memory_name = "CUDA peak (MB)" if memory_key == "cuda_peak_bytes" else "process memory (MB)"
    figure.add_scatter(x=times, y=[r.get(memory_key, 0) / 2**20 for r in train], name=memory_name, row=1, col=1)
    speed = [r.get("tokens_per_s") or 0.0 for r in train]
    figure.add_scatter(x=times, y=speed, name="tokens/s", line={"width": 1}, opacity=0.35, row=2, col=1)
    figure.add_scatter(x=times, y=smooth(speed), name="tokens/s (smoothed)", row=2, col=1)
    figure.update_layout(**{**LAYOUT, "height": 380}, title="Memory and speed")
    figure.update_yaxes(title_text="MB", row=1, col=1)
    figure.update_yaxes(title_text="tokens/s", row=2, col=1)
    figure.update_xaxes(title_text="wall-clock time (s)", row=2, col=1)
    return figure


def curves_figure(curves: dict[str, list[dict]], methods: dict[str, str], x: str = "step") -> go.Figure:
    """Smoothed training loss of several runs (of one task: losses of different tasks do not share
    a scale) on one chart, each in its method's colour; runs of one method differ by dash."""
    if not curves:
        return _empty("Loss curves", "select runs to overlay their loss curves")
    key, label = X_AXES[x]
    figure = go.Figure(layout={**LAYOUT, "height": 380, "title": "Training loss (smoothed)", "xaxis_title": label})
    seen: dict[str, int] = {}
    for name, records in curves.items():
        method = methods.get(name, "")
        dash = DASHES[seen.get(method, 0) % len(DASHES)]
        seen[method] = seen.get(method, 0) + 1
        train = _thin([r for r in records if r.get("kind") == "train"])
        line = {"color": method_colour(method), "dash": dash}
        figure.add_scatter(x=[r[key] for r in train], y=smooth([r["loss"] for r in train]), name=name, line=line)
    figure.update_yaxes(title_text="training loss")
    return figure


DASHES = ("solid", "dash", "dot", "dashdot")
TRADEOFF_AXES = {
    "trainable parameters": ("trainable params", "log"),
    "median step time (s)": ("median step s", "linear"),
    "training memory (MB)": ("training memory MB", "linear"),
    "base weights (MB)": ("base weights MB", "linear"),
    "total time (s)": ("total time s", "linear"),
}


def tradeoff_figure(frame: pd.DataFrame, x_axis: str) -> go.Figure:
    """Validation quality of one task's runs against a cost, one colour per method."""
    column, scale = TRADEOFF_AXES[x_axis]
    finished = frame.dropna(subset=["validation", column]) if not frame.empty else frame
    if finished.empty:
        return _empty("Quality vs cost", f"no finished runs with a {x_axis} yet")
    metric = finished["metric"].iloc[0]
    title = f"{finished['task'].iloc[0]}: validation {metric} vs {x_axis}"
    figure = go.Figure(layout={**LAYOUT, "height": 380, "title": title, "xaxis_title": x_axis})
    for method, group in finished.groupby("method"):
        figure.add_scatter(
            x=group[column],
            y=group["validation"],
            mode="markers",
            marker={"size": 12, "color": method_colour(method)},
            name=method,
            text=group["run"],
            hovertemplate="%{text}<br>%{x}<br>%{y:.4f}<extra></extra>",
        )
    figure.update_xaxes(type=scale)
    figure.update_yaxes(title_text=f"validation {metric}")
    return figure
