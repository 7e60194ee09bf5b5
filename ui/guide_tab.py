"""Guide tab, for a walkthrough: what each method does, with figures computed from real weights,
and the seed's research questions answered by the shipped benchmark report and this store's runs.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from lora_methods import METHODS, get_method
from lora_methods.sparselora import MOST_LAYERS, layer_schedule
from training.core.colours import method_colour
from training.research import report
from training.research.spectra import update_spectra
from training.research.suite import RESULTS_DIR

from .arena import Arena
from .charts import LAYOUT

METHOD_NOTES = """
| method | trains | what changes |
|---|---|---|
| Full fine-tuning | every weight | the reference: most memory, a whole model to save |
| LoRA | `B A` (rank r) beside a frozen `W` | `W + (alpha/r) B A`: a rank-r update, ~0.3% of the weights |
| QLoRA | LoRA's factors | the frozen `W` is stored in 4-bit NF4: 0.41-0.64x its bf16 weight memory |
| DoRA | LoRA's factors, a length per column | `W + B A` rescaled per column to a trained length `m` |
| HiRA | `B A` | `W + W * (B A)` element-wise: a high-rank update for LoRA's parameter count |
| SparseLoRA | LoRA's factors, dense | deep layers run the context's frozen FFN on channels picked per batch |
| ...on 4-bit | as above | SparseLoRA or HiRA over an NF4 base: the seed's "do they combine?" |
"""


def update_spectrum_figure(rank: int = 8) -> go.Figure:
    """Singular values of a LoRA update `B A` and a HiRA update `W * (B A)` from the same random
    rank-r factors (research.spectra computes them)."""
    source, spectra = update_spectra(rank)
    figure = go.Figure(
        layout={
            **LAYOUT,
            "height": 340,
            # the source on a line of its own: on one line the title ran under plotly's toolbar
            "title": {"text": "Rank of the update", "subtitle": {"text": f"rank-{rank} factors on {source}"}},
            "margin": {**LAYOUT["margin"], "t": 60, "l": 90},  # room for the log axis's title
            "xaxis_title": "singular value index",
            "yaxis_title": "singular value / largest",
            "yaxis_type": "log",
            "yaxis_exponentformat": "power",  # 10^-12, not plotly's SI "1p" for a ratio
        }
    )
    for method, label in (("lora", "LoRA: B A"), ("hira", "HiRA: W * (B A)")):
        figure.add_scatter(y=spectra[method], name=label, mode="lines", line_color=method_colour(method))
    return figure


def sparsity_schedule_figure() -> go.Figure:
    """SparseLoRA's per-layer FFN sparsity for context tokens, one panel per bundled model (their
    depths differ): the default (the paper's schedule), and on SmolLM2 the schedule it replaced
    (the suite's sparselora-most-layers)."""
    models = (("MiniLM-L6", 6), ("SmolLM2-135M", 30))  # short: the panels share a narrow page
    figure = make_subplots(rows=1, cols=2, column_widths=[0.22, 0.78], subplot_titles=[name for name, _ in models])
    figure.update_layout(
        {
            **LAYOUT,
            "height": 320,
            "title": "SparseLoRA's layer schedules",  # short enough for an 800 px page
            "barmode": "group",
            "margin": {**LAYOUT["margin"], "t": 70},  # room for the panels' titles under the figure's
        }
    )
    figure.update_annotations(font_size=13)  # the panels' titles
    figure.update_yaxes(range=[0, 1.05], title_text="context FFN channels skipped", col=1)
    figure.update_yaxes(range=[0, 1.05], showticklabels=False, col=2)
    figure.update_xaxes(title_text="layer (the last: output tokens only)", col=2)
    schedules = (
        ("default (the paper's)", {}, "sparselora", (1, 2)),
        ("most layers (the first default)", MOST_LAYERS, "sparselora-most-layers", (2,)),
    )
    for name, settings, colour, columns in schedules:
        hparams = get_method("sparselora").resolve_hparams(settings)
        for column in columns:
            layers = models[column - 1][1]
            schedule = layer_schedule(layers, hparams)
            if hparams["last_layer"] == "outputs":
                schedule[-1] = 1.0
            figure.add_bar(
                x=list(range(layers)),
                y=schedule,
                name=name,
                marker_color=method_colour(colour),
                legendgroup=name,
                showlegend=column == columns[-1],
                row=1,
                col=column,
            )
    return figure


def store_markdown(arena: Arena) -> str:
    """What this store's finished runs say about each question: the report's answers and tables,
    computed by the same functions from the store's rows (runs compared on equal work)."""
    table = arena.result_rows()
    said = report.answers(table)
    parts = []
    for key, question in report.QUESTIONS:
        found = (
            f"{said[key]}\n\n{report.question_table(table, key)}" if said[key] else "_not enough runs of equal work_\n"
        )
        parts.append(f"**{question}**\n\n{found}")
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

    def when(utc: str) -> str:  # "2026-12-01T16:16:30Z" -> "2026-12-01 16:16 UTC": a retime is often the same day
        return f"{utc[:10]} {utc[11:16]} UTC"

    retimed = f", steps timed again {when(results['timed']['started_at'])}" if results.get("timed") else ""
    gr.Markdown(
        f"## The research questions\nAnswered by the benchmark suite (`make bench`, {when(results['started_at'])}"
        f"{retimed}, {results['hardware']['cores']} cores, {results['hardware']['device']}, in "
        f"{results.get('precision', 'fp32')}); the same functions write the report. A run trained here in another "
        "precision shows other memory and speed figures: fp32 keeps weights at twice bf16's bytes."
    )
    table = report.rows(results)
    headlines, answers = report.headlines(table), report.answers(table)
    for key, question in report.QUESTIONS:
        gr.Markdown(f"### {question}\n**{headlines[key] or 'Not measured in this suite.'}**")
        if not headlines[key]:
            continue
        figure = report.FIGURES[key](results)
        gr.Plot(figure, label=figure.layout.title.text, show_label=False)
        gr.Markdown(report.question_table(table, key), elem_classes="arena-figures")
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
