"""The benchmark's figures (plotly), one per research question and two the report adds, drawn
from results.json: the Guide tab shows them and the report saves them as figures/*.json."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from training.core.colours import OTHER, method_colour
from training.core.memory import MB, MEMORY_PARTS
from training.core.presentation import smooth

from .answers import QUESTION_VARIANTS, quality_axis
from .queries import (
    Results,
    Row,
    find,
    headline_plans,
    memory_total,
    plan_rows,
    plans_with,
    ranking,
    rows,
    speed_ratio,
    timings,
)

# The legend under the panels: at its side it took a third of an 800 px page from four panels.
LAYOUT = {
    "template": "plotly_white",
    "margin": {"l": 60, "r": 20, "t": 60, "b": 50},
    "height": 460,
    "legend": {"orientation": "h", "y": -0.2, "yanchor": "top"},
}
LOSS_SMOOTHING = 0.8  # lighter than the live charts': these curves are already means over seeds

# Memory parts are no methods: greys, so no bar reads as a method's colour.
PART_COLOURS = dict(zip((key for key, _ in MEMORY_PARTS), ("#252525", "#636363", "#969696", "#cccccc")))


def _plans(results: Results) -> list[str]:
    """The suite's plans that have results, in the suite's order: one panel each."""
    return [plan["name"] for plan in results["plans"] if plan["name"] in results["aggregate"]]


def _panels(plans: list[str]) -> go.Figure:
    """One panel per plan, spaced so that each panel's axis titles clear its neighbour's."""
    return make_subplots(rows=1, cols=max(len(plans), 1), subplot_titles=plans, horizontal_spacing=0.1)


def _add(figure: go.Figure, column: int, trace: go.Scatter | go.Bar, colour: str) -> None:
    """`trace` in panel `column` in `colour`, with one legend entry per name across the panels."""
    shown = {existing.name for existing in figure.data}
    trace.update(legendgroup=trace.name, showlegend=trace.name not in shown, marker_color=colour)
    if isinstance(trace, go.Scatter):
        trace.update(line_color=colour)
    figure.add_trace(trace, row=1, col=column)


def _quality_axis(table: list[Row], plan: str) -> str:
    return quality_axis(next(iter(plan_rows(table, plan).values())))


def _scaled_quality(row: Row | None) -> tuple[float, float] | None:
    """Quality and its spread as the tables print them (accuracy in %)."""
    if row is None:
        return None
    scale = 100 if row.metric == "accuracy" else 1
    return scale * row.mean, scale * (row.std or 0)


def _scatter_by_plan(results: Results, key: str, title: str, x_title: str, x_of: Callable) -> go.Figure:
    """Test quality against `x_of(plan, variant)`, one panel per plan, the variants of question
    `key` only; no text beside the markers (they collide), the legend names them."""
    table = rows(results)
    plans = _plans(results)
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        for variant in filter(QUESTION_VARIANTS[key], plan_rows(table, plan)):
            x, y = x_of(plan, variant), _scaled_quality(find(table, plan, variant))
            if x is None or y is None:
                continue
            marker = go.Scatter(x=[x], y=[y[0]], error_y={"array": [y[1]]}, mode="markers", name=variant)
            marker.update(marker_size=12, hovertemplate=f"{variant}<br>%{{x}}<br>%{{y:.2f}}<extra></extra>")
            _add(figure, column, marker, method_colour(variant))
        figure.update_xaxes(title_text=x_title, row=1, col=column)
        figure.update_yaxes(title_text=_quality_axis(table, plan), row=1, col=column)
    figure.update_layout(**LAYOUT, title=title)
    return figure


def sparselora_speed(results: Results) -> go.Figure:
    def step(plan: str, variant: str) -> float | None:
        entry = timings(results, plan).get(variant)
        return entry["median_step_s"] if entry else None

    title = "SparseLoRA vs LoRA: test quality against step time (timed side by side)"
    return _scatter_by_plan(results, "sparselora", title, "median step s", step)


def qlora_memory(results: Results) -> go.Figure:
    """Training memory by part for the variants of the QLoRA question."""
    plans = [plan for plan in results["speed"] if results["speed"][plan]]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        entries = [e for e in results["speed"][plan] if QUESTION_VARIANTS["qlora"](e["label"])]
        for key, label in MEMORY_PARTS:
            parts = go.Bar(x=[e["label"] for e in entries], y=[e["memory"][key] / MB for e in entries], name=label)
            _add(figure, column, parts, PART_COLOURS[key])
        figure.update_yaxes(title_text="MB", row=1, col=column)
    figure.update_layout(
        **LAYOUT, barmode="stack", title="Training memory by part: QLoRA's 4-bit base vs LoRA and full"
    )
    return figure


def hira_quality(results: Results) -> go.Figure:
    """LoRA and HiRA side by side at each rank (equal trainable parameters within a rank)."""
    table = rows(results)
    plans = [plan for plan in _plans(results) if plan in plans_with(table, "hira", "lora")]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        measured = plan_rows(table, plan)
        for method in ("lora", "hira"):
            ranks = [(f"rank {r}", v) for r, v in ((8, method), (32, f"{method}-r32")) if v in measured]
            found = [_scaled_quality(measured[v]) for _, v in ranks]
            bars = go.Bar(x=[r for r, _ in ranks], y=[q[0] for q in found], name=method)
            bars.update(error_y={"array": [q[1] for q in found]})
            _add(figure, column, bars, method_colour(method))
        figure.update_yaxes(title_text=_quality_axis(table, plan), row=1, col=column)
    figure.update_layout(**LAYOUT, barmode="group", title="HiRA vs LoRA at equal trainable parameters")
    return figure


def task_ranking(results: Results) -> go.Figure:
    """Every variant's test quality per task, best at the top, names on the axis (no legend)."""
    table = rows(results)
    plans = headline_plans(table)
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        order = ranking(table, plan)[::-1]  # plotly draws the first category at the bottom
        found = [_scaled_quality(find(table, plan, v)) for v in order]
        # Dots, not bars: bars from zero would hide differences of a few points.
        dots = go.Scatter(y=order, x=[q[0] for q in found], mode="markers", name=plan, showlegend=False)
        dots.update(marker={"size": 12, "color": [method_colour(v) for v in order]})
        dots.update(error_x={"array": [q[1] for q in found]})
        figure.add_trace(dots, row=1, col=column)
        figure.update_xaxes(title_text=_quality_axis(table, plan), row=1, col=column)
    figure.update_layout(**{**LAYOUT, "height": 480}, title="Ranking per task (best at the top)", showlegend=False)
    return figure


def combinations_figure(results: Results) -> go.Figure:
    def training_memory(plan: str, variant: str) -> float | None:
        entry = timings(results, plan).get(variant)
        return memory_total(entry["memory"]) / MB if entry else None

    title = "Combinations: test quality against training memory (4-bit and sparse, alone and together)"
    return _scatter_by_plan(results, "combinations", title, "training memory MB", training_memory)


def loss_curves(results: Results) -> go.Figure:
    plans = _plans(results)
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        curves: dict[str, list[list[float]]] = {}
        for cell in results["cells"]:
            if cell["plan"] == plan:
                curves.setdefault(cell["variant"], []).append(cell["loss_curve"])
        for variant, runs in curves.items():
            mean = [statistics.fmean(values) for values in zip(*runs)]
            curve = go.Scatter(
                x=list(range(1, len(mean) + 1)), y=smooth(mean, LOSS_SMOOTHING), mode="lines", name=variant
            )
            _add(figure, column, curve, method_colour(variant))
        figure.update_xaxes(title_text="step", row=1, col=column)
        figure.update_yaxes(title_text="training loss (mean over seeds, smoothed)", row=1, col=column)
    figure.update_layout(**LAYOUT, title="Training loss")
    return figure


def sparsity_schedules(results: Results) -> go.Figure:
    plans = [p for p, entries in results["speed"].items() if any(e["flops_ratio_vs_lora"] for e in entries)]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        timed = timings(results, plan)
        entries = [e for e in timed.values() if e["flops_ratio_vs_lora"] is not None]
        labels = [e["label"] for e in entries]
        against = [timed.get("qlora" if "4bit" in e["method"] else "lora", {}).get("median_step_s") for e in entries]
        speedups = [speed_ratio(e["median_step_s"], step_s) for e, step_s in zip(entries, against)]
        speed = go.Bar(x=labels, y=speedups, name="step speed-up (vs LoRA; on 4-bit: vs QLoRA)")
        _add(figure, column, speed, method_colour("sparselora"))
        savings = [1 / e["flops_ratio_vs_lora"] for e in entries]
        _add(figure, column, go.Bar(x=labels, y=savings, name="linear-layer FLOPs: dense / sparse"), OTHER)
    figure.update_layout(
        **LAYOUT,
        barmode="group",
        title="SparseLoRA settings (sparsity, layer schedule, attention, 4-bit): speed-up and FLOPs saving",
    )
    return figure


# One figure per research question (keyed as QUESTIONS), then the two the report adds.
FIGURES = {
    "sparselora": sparselora_speed,
    "qlora": qlora_memory,
    "hira": hira_quality,
    "tasks": task_ranking,
    "combinations": combinations_figure,
    "loss_curves": loss_curves,
    "sparselora_schedules": sparsity_schedules,
}
