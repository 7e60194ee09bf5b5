"""Plotly figures drawn from run-store records (metrics.jsonl lines and leaderboard rows)."""

from __future__ import annotations

import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from training.core.colours import METHOD_COLOURS, family, method_colour
from training.core.memory import MB, MEMORY_PARTS
from training.core.metrics import LOWER_IS_BETTER, SHARES, metric_text
from training.core.presentation import smooth

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


def _empty(title: str, message: str) -> go.Figure:
    figure = go.Figure(layout={**LAYOUT, "title": title})
    figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


def loss_figure(records: list[dict], x: str = "step") -> go.Figure:
    """Training loss (raw and smoothed); validation loss on the fixed subsample, from the base
    model's (step 0) on; and the final evaluation (every validation example unless eval_samples
    cuts it), marked apart."""
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return _empty("Loss", "waiting for the first step")
    key, label = X_AXES[x]
    shown = _thin(train)
    layout = {**LAYOUT, "height": 420, "title": "Loss", "xaxis_title": label, "yaxis_title": "loss"}
    figure = go.Figure(layout={**layout, "legend": {"orientation": "h", "y": -0.18}})
    xs = [r[key] for r in shown]
    # The raw loss is the first trace: the browser test counts its points.
    figure.add_scatter(
        x=xs, y=[r["loss"] for r in shown], name="training loss", line={"width": 1, "color": TRAIN_COLOUR}, opacity=0.35
    )
    figure.add_scatter(
        x=xs,
        y=smooth([r["loss"] for r in shown], SMOOTHING),
        name="smoothed",
        line={"width": 2.5, "color": TRAIN_COLOUR},
    )
    _add_evaluations(figure, [r for r in records if r.get("kind") == "eval" and "loss" in r], key)
    _whole_steps(figure, x, train[-1]["step"])
    return figure


def _whole_steps(figure: go.Figure, x: str, last_step: int) -> None:
    """Steps are whole: on a short run Plotly would otherwise tick at 0.5, 1.5, ..."""
    if x == "step" and last_step <= 10:
        figure.update_xaxes(dtick=1)


TRAIN_COLOUR, EVAL_COLOUR, BASE_COLOUR, FINAL_COLOUR = "#4f46e5", "#ea580c", "#6b7280", "#16a34a"


def _add_evaluations(figure: go.Figure, evals: list[dict], key: str) -> None:
    """The subsample's evaluations as one line (the base model's point starts it, so the first
    segment is what training changed), the base point and the final full-split one marked."""
    subsample = [r for r in evals if not r.get("final")]
    finals = [r for r in evals if r.get("final")]
    counted = f" ({finals[-1]['examples']:,} examples)" if finals and finals[-1].get("examples") else ""
    marks = (
        (subsample, "validation loss (subsample)", "markers+lines", {"size": 8, "symbol": "diamond"}, EVAL_COLOUR),
        (
            [r for r in subsample if r.get("base")],
            "base model (before training)",
            "markers",
            {"size": 12, "symbol": "square-open", "line": {"width": 2}},
            BASE_COLOUR,
        ),
        (
            finals,
            f"final validation{counted}",
            "markers",
            {"size": 16, "symbol": "star"},
            FINAL_COLOUR,
        ),
    )
    for points, name, mode, marker, colour in marks:
        if points:
            figure.add_scatter(
                x=[r[key] for r in points],
                y=[r["loss"] for r in points],
                name=name,
                mode=mode,
                marker={**marker, "color": colour},
                line={"color": colour},
            )


def resources_figure(records: list[dict], x: str = "step") -> go.Figure:
    """Training memory by part (stacked, MB = 1e6 bytes), the process's own memory (its resident set,
    and on CUDA the allocator's peak) in a panel of its own, and tokens/s below. Older runs without
    the parts draw RSS alone in the first panel."""
    train = _thin([r for r in records if r.get("kind") == "train"])
    if not train:
        return _empty("Memory and speed", "waiting for the first step")
    key, label = X_AXES[x]
    xs = [r[key] for r in train]
    parts = [(name, title) for name, title in MEMORY_PARTS if any(name in r for r in train)]
    # RSS is mostly the runtime (~1 GB of libraries): in the parts' panel it would flatten them, and
    # on a second axis over them it read as their ceiling. So it has its own panel.
    heights = [0.45, 0.22, 0.33] if parts else [0.62, 0.38]
    figure = make_subplots(rows=len(heights), cols=1, shared_xaxes=True, vertical_spacing=0.07, row_heights=heights)
    mode = "lines" if len(xs) > 1 else "lines+markers"  # an area needs two steps: the first is drawn as dots
    for (name, title), colour in zip(parts, MEMORY_COLOURS):
        megabytes = [r.get(name, 0) / MB for r in train]
        line = {"width": 0.5, "color": colour}
        figure.add_scatter(x=xs, y=megabytes, name=title, stackgroup="memory", mode=mode, line=line, row=1, col=1)
    process_row, speed_row = (2, 3) if parts else (1, 2)
    for name, title, dash in (("rss_bytes", "process RSS", "dash"), ("cuda_peak_bytes", "CUDA allocator peak", "dot")):
        if any(name in r for r in train):
            figure.add_scatter(
                x=xs,
                y=[r[name] / MB if name in r else None for r in train],
                name=title,
                line={"dash": dash, "width": 1.5, "color": BASE_COLOUR},
                row=process_row,
                col=1,
            )
    speed = [r.get("tokens_per_s") or 0.0 for r in train]
    figure.add_scatter(
        x=xs, y=speed, line={"width": 1, "color": TRAIN_COLOUR}, opacity=0.35, showlegend=False, row=speed_row, col=1
    )
    figure.add_scatter(
        x=xs, y=smooth(speed, SMOOTHING), name="tokens/s", line={"color": TRAIN_COLOUR}, row=speed_row, col=1
    )
    # The legend under the x axis's title, growing downwards as it wraps on a narrow page.
    legend = {"orientation": "h", "y": -0.12, "yanchor": "top", "traceorder": "normal"}
    figure.update_layout(
        **{**LAYOUT, "height": 500, "legend": legend, "margin": {**LAYOUT["margin"], "b": 110}},
        title="Training memory by part, and speed" if parts else "Memory and speed",
        hovermode="x unified",
    )
    # From zero: a flat series would otherwise autoscale to a 0.1 MB range.
    if parts:
        figure.update_yaxes(title_text="training MB", rangemode="tozero", row=1, col=1)
    figure.update_yaxes(title_text="process MB", rangemode="tozero", row=process_row, col=1)
    figure.update_yaxes(title_text="tokens/s", rangemode="tozero", row=speed_row, col=1)
    figure.update_xaxes(title_text=label, row=speed_row, col=1)
    _whole_steps(figure, x, train[-1]["step"])
    return figure


MEMORY_COLOURS = ("#93c5fd", "#fca5a5", "#fcd34d", "#86efac")  # weights, gradients, optimizer, activations


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
        figure.add_scatter(
            x=[r[key] for r in train], y=smooth([r["loss"] for r in train], SMOOTHING), name=name, line=line
        )
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


# Open markers, one shape per method as one colour per method: two runs at the same point (LoRA and
# SparseLoRA train the same parameters) both stay visible, one drawn around the other.
TRADEOFF_SYMBOLS = dict(
    zip(
        METHOD_COLOURS,
        (
            "circle-open",
            "diamond-open",
            "square-open",
            "triangle-up-open",
            "triangle-down-open",
            "pentagon-open",
            "hexagon-open",
            "star-open",
        ),
        strict=True,
    )
)


def _log_ticks(values: pd.Series) -> list[float]:
    """1, 2 and 5 times each power of ten around `values`: labels a reader can read (10k, 20k, 50k)
    where plotly's own log ticks crowd a short range with small digits."""
    positive = values[values > 0]  # a log axis leaves out zero
    if positive.empty:
        return []
    low, high = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
    return [digit * 10**power for power in range(low, high + 1) for digit in (1, 2, 5)]


def tradeoff_figure(frame: pd.DataFrame, x_axis: str) -> go.Figure:
    """Validation quality of one task's runs against a cost, one colour and shape per method."""
    column, scale = TRADEOFF_AXES[x_axis]
    finished = frame.dropna(subset=["validation", column]) if not frame.empty else frame
    if finished.empty:
        return _empty("Quality vs cost", f"no finished runs with a figure for {x_axis} yet")
    metric = finished["metric"].iloc[0]
    title = f"{finished['task'].iloc[0]} runs: quality vs cost"  # the axes name both: short enough for 800 px
    figure = go.Figure(layout={**LAYOUT, "height": 380, "title": title, "xaxis_title": x_axis})
    for method, group in finished.groupby("method"):
        figure.add_scatter(
            x=group[column],
            y=group["validation"],
            mode="markers",
            marker={
                "size": 13,
                "color": method_colour(method),
                "symbol": TRADEOFF_SYMBOLS.get(family(method) or "", "circle-open"),
                "line": {"width": 2.5, "color": method_colour(method)},
            },
            name=method,
            text=group["run"],
            customdata=[metric_text(metric, value) for value in group["validation"]],  # as the table writes it
            hovertemplate="%{text}<br>%{x}<br>%{customdata}<extra></extra>",
        )
    figure.update_xaxes(type=scale)
    if scale == "log":
        figure.update_xaxes(tickvals=_log_ticks(finished[column].astype(float)), tickformat="~s")
    better = "lower" if metric in LOWER_IS_BETTER else "higher"
    figure.update_yaxes(title_text=f"validation {metric} ({better} is better)")
    if metric in SHARES:  # one run alone would otherwise autoscale to an axis from -0.5 to 1.5
        figure.update_yaxes(autorangeoptions={"minallowed": 0, "maxallowed": 1}, tickformat=".0%")
    return figure
