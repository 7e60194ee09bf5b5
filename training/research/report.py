"""The suite's results as the presentation needs them: answers to the seed's five questions, a
Markdown report and plotly figures, all computed from results.json alone so the report's numbers
are the JSON's numbers (`python -m training bench --report` rewrites them without training).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from training.core.colours import OTHER, method_colour
from training.core.memory import MB, MEMORY_PARTS
from training.core.runs import write_json_atomic

Results = Mapping[str, Any]
LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 60, "b": 50}, "height": 420}


# -- reading the results ---------------------------------------------------------------------


def _cells(results: Results, plan: str) -> Mapping[str, dict]:
    return results["aggregate"].get(plan, {})


def _speed(results: Results, plan: str) -> dict[str, dict]:
    return {entry["label"]: entry for entry in results["speed"].get(plan, [])}


def speedup(results: Results, plan: str, label: str, against: str = "lora") -> float | None:
    """How many times faster `label`'s median step is than `against`'s, timed side by side."""
    speed = _speed(results, plan)
    if label not in speed or against not in speed:
        return None
    return speed[against]["median_step_s"] / speed[label]["median_step_s"]


def _plan(results: Results, name: str) -> dict:
    return next(plan for plan in results["plans"] if plan["name"] == name)


def quality(results: Results, plan: str, variant: str) -> tuple[str, float, float | None, int] | None:
    """The figure a plan is judged on, on the test split (validation chose the learning rates):
    sentiment accuracy, generation perplexity (mean, standard deviation over seeds, seeds)."""
    cell = _cells(results, plan).get(variant)
    if cell is None:
        return None
    name = "test_accuracy" if "test_accuracy" in cell else "test_perplexity"
    figure = cell[name]
    return name, figure["mean"], figure["std"], figure["n"]


def _format_quality(results: Results, plan: str, variant: str) -> str:
    found = quality(results, plan, variant)
    if found is None:
        return "n/a"
    name, mean, std, n = found
    if name == "test_accuracy":
        return f"{100 * mean:.1f}%" + (f" ± {100 * std:.1f}" if std is not None else "") + f" (n={n})"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _difference(results: Results, plan: str, variant: str, reference: str) -> str:
    a, b = quality(results, plan, variant), quality(results, plan, reference)
    if a is None or b is None:
        return "n/a"
    if a[0] == "test_accuracy":
        return f"{100 * (a[1] - b[1]):+.1f} points"
    return f"{100 * (a[1] / b[1] - 1):+.1f}% perplexity"


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def _memory_total(entry: Mapping[str, Any]) -> int:
    return sum(entry["memory"][key] for key, _ in MEMORY_PARTS)


def _mb(value: float | None) -> str:
    return f"{value / MB:,.1f}" if value is not None else "n/a"


# -- the five answers --------------------------------------------------------------------------


def _plans_with(results: Results, *variants: str) -> list[str]:
    return [plan for plan, cells in results["aggregate"].items() if all(v in cells for v in variants)]


def _sparselora(results: Results) -> str:
    lines = []
    for plan in _plans_with(results, "sparselora", "lora"):
        speed = _speed(results, plan)
        variants = [v for v in _cells(results, plan) if v.startswith("sparselora") and not v.endswith("4bit")]
        described = []
        for variant in sorted(variants):
            entry = speed.get(variant, {})
            recall = entry.get("estimator_recall")
            described.append(
                f"`{variant}` {_format_quality(results, plan, variant)} "
                f"({_difference(results, plan, variant, 'lora')}), "
                f"{_ratio(speedup(results, plan, variant))} LoRA's speed, "
                f"FLOPs {entry.get('flops_ratio_vs_lora', float('nan')):.2f} of LoRA's"
                + (f", estimator recall {recall:.2f}" if recall is not None else "")
            )
        lines.append(f"{plan}: LoRA {_format_quality(results, plan, 'lora')}; " + "; ".join(described))
    return ". ".join(lines) + "." if lines else ""


def _qlora(results: Results) -> str:
    lines = []
    for plan in _plans_with(results, "qlora", "lora"):
        cells = _cells(results, plan)
        weights = cells["qlora"]["base_weight_memory_bytes"] / cells["lora"]["base_weight_memory_bytes"]
        speed = _speed(results, plan)
        total = (
            _memory_total(speed["qlora"]) / _memory_total(speed["lora"])
            if "qlora" in speed and "lora" in speed
            else None
        )
        lines.append(
            f"{plan}: base weights {_mb(cells['qlora']['base_weight_memory_bytes'])} MB vs "
            f"{_mb(cells['lora']['base_weight_memory_bytes'])} MB ({weights:.2f}x), "
            f"training memory (weights, gradients, optimizer, activations) {_ratio(total)} LoRA's; "
            f"quality {_format_quality(results, plan, 'qlora')} vs {_format_quality(results, plan, 'lora')} "
            f"({_difference(results, plan, 'qlora', 'lora')}); "
            f"step {_ratio(speedup(results, plan, 'qlora'))} LoRA's speed"
        )
    return "; ".join(lines) + "." if lines else ""


def _hira(results: Results) -> str:
    lines = []
    for plan in _plans_with(results, "hira", "lora"):
        cells = _cells(results, plan)
        parts = [
            f"{plan}, rank 8 ({cells['hira']['trainable_params']:,} vs {cells['lora']['trainable_params']:,} "
            f"trainable): HiRA {_format_quality(results, plan, 'hira')} vs LoRA "
            f"{_format_quality(results, plan, 'lora')} ({_difference(results, plan, 'hira', 'lora')}), "
            f"step {_ratio(speedup(results, plan, 'hira'))} LoRA's speed"
        ]
        if "hira-r32" in cells and "lora-r32" in cells:
            parts.append(
                f"rank 32: {_format_quality(results, plan, 'hira-r32')} vs "
                f"{_format_quality(results, plan, 'lora-r32')} ({_difference(results, plan, 'hira-r32', 'lora-r32')})"
            )
        lines.append(", ".join(parts))
    return "; ".join(lines) + "." if lines else ""


def ranking(results: Results, plan: str) -> list[str]:
    """Variants best first by the plan's quality figure."""
    found = {v: quality(results, plan, v) for v in _cells(results, plan)}
    higher = next(iter(found.values()))[0] == "test_accuracy" if found else True
    return sorted(found, key=lambda v: found[v][1], reverse=higher)


def _tasks(results: Results) -> str:
    orders = {plan: ranking(results, plan) for plan in ("sentiment", "generation") if plan in results["aggregate"]}
    lines = [
        f"{plan} ({'test accuracy' if plan == 'sentiment' else 'test perplexity'}): " + " > ".join(order)
        for plan, order in orders.items()
    ]
    if len(orders) == 2:
        common = [v for v in orders["sentiment"] if v in orders["generation"]]
        ranks = {
            plan: {v: i for i, v in enumerate([x for x in order if x in common])} for plan, order in orders.items()
        }
        rho = _spearman([ranks["sentiment"][v] for v in common], [ranks["generation"][v] for v in common])
        lines.append(f"rank correlation between the tasks (Spearman) {rho:.2f} over {len(common)} variants")
    return "; ".join(lines) + "." if lines else ""


def _spearman(a: list[int], b: list[int]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


def _combinations(results: Results) -> str:
    lines = []
    for plan in _plans_with(results, "sparselora-4bit", "qlora", "sparselora"):
        cells = _cells(results, plan)
        lines.append(
            f"{plan}: SparseLoRA on 4-bit {_format_quality(results, plan, 'sparselora-4bit')} "
            f"vs QLoRA {_format_quality(results, plan, 'qlora')} "
            f"({_difference(results, plan, 'sparselora-4bit', 'qlora')}), "
            f"step {_ratio(speedup(results, plan, 'sparselora-4bit', 'qlora'))} QLoRA's speed, base weights "
            f"{_mb(cells['sparselora-4bit']['base_weight_memory_bytes'])} MB vs SparseLoRA's "
            f"{_mb(cells['sparselora']['base_weight_memory_bytes'])} MB"
        )
    for plan in _plans_with(results, "hira-4bit", "hira"):
        cells = _cells(results, plan)
        lines.append(
            f"{plan}: HiRA on 4-bit {_format_quality(results, plan, 'hira-4bit')} vs HiRA "
            f"{_format_quality(results, plan, 'hira')} ({_difference(results, plan, 'hira-4bit', 'hira')}), "
            f"base weights {_mb(cells['hira-4bit']['base_weight_memory_bytes'])} MB vs "
            f"{_mb(cells['hira']['base_weight_memory_bytes'])} MB, "
            f"step {_ratio(speedup(results, plan, 'hira-4bit', 'hira'))} HiRA's speed"
        )
    return "; ".join(lines) + "." if lines else ""


def answers(results: Results) -> dict[str, str]:
    """One factual paragraph per research question (the Guide tab shows them)."""
    return {
        "sparselora": _sparselora(results),
        "qlora": _qlora(results),
        "hira": _hira(results),
        "tasks": _tasks(results),
        "combinations": _combinations(results),
    }


# -- one slide per question: a sentence, a figure, a small table -------------------------------

# The variants each question is about: its table and its figure show these alone.
QUESTION_VARIANTS = {
    "sparselora": lambda v: v == "lora" or (v.startswith("sparselora") and not v.endswith("4bit")),
    "qlora": lambda v: v in ("full", "lora", "qlora"),
    "hira": lambda v: v in ("lora", "hira", "lora-r32", "hira-r32"),
    "tasks": lambda v: True,
    "combinations": lambda v: v in ("lora", "qlora", "sparselora", "sparselora-4bit", "hira", "hira-4bit"),
}
# A task's rows appear in a question's table only where it measured the question's method.
QUESTION_SUBJECTS = {"sparselora": "sparselora", "qlora": "qlora", "hira": "hira", "combinations": "sparselora-4bit"}
HEADLINE_PLANS = ("sentiment", "generation")  # the seed's two tasks; the sentence stays one sentence


def _clauses(results: Results, clause: Callable[[str], str], *variants: str) -> str:
    """`clause(plan)` for each of the seed's tasks that measured `variants`, joined."""
    plans = [plan for plan in _plans_with(results, *variants) if plan in HEADLINE_PLANS]
    return ", ".join(clause(plan) for plan in plans)


def headlines(results: Results) -> dict[str, str]:
    """One sentence per research question, the default settings only (the tables hold the rest)."""

    def weights(plan: str, variant: str, against: str) -> str:
        cells = _cells(results, plan)
        return _ratio(cells[variant]["base_weight_memory_bytes"] / cells[against]["base_weight_memory_bytes"])

    said = {
        "sparselora": _clauses(
            results,
            lambda p: (
                f"{_ratio(speedup(results, p, 'sparselora'))} LoRA's step speed for "
                f"{_difference(results, p, 'sparselora', 'lora')} on {p}"
            ),
            "sparselora",
            "lora",
        ),
        "qlora": _clauses(
            results,
            lambda p: (
                f"{weights(p, 'qlora', 'lora')} LoRA's base-weight memory for "
                f"{_difference(results, p, 'qlora', 'lora')} on {p}"
            ),
            "qlora",
            "lora",
        ),
        "hira": _clauses(
            results,
            lambda p: (
                f"{_difference(results, p, 'hira', 'lora')} against LoRA at "
                f"{_ratio(speedup(results, p, 'hira'))} its step speed on {p}"
            ),
            "hira",
            "lora",
        ),
        "tasks": _ranking_sentence(results),
        "combinations": _clauses(
            results,
            lambda p: (
                f"{_ratio(speedup(results, p, 'sparselora-4bit', 'qlora'))} QLoRA's speed for "
                f"{_difference(results, p, 'sparselora-4bit', 'qlora')} on {p}"
            ),
            "sparselora-4bit",
            "qlora",
        ),
    }
    openings = {
        "sparselora": "SparseLoRA trains at ",
        "qlora": "QLoRA's 4-bit base needs ",
        "hira": "At LoRA's parameter count HiRA scores ",
        "tasks": "",
        "combinations": "SparseLoRA on a 4-bit base (QLoRA's memory) trains at ",
    }
    return {key: openings[key] + text + "." if text else "" for key, text in said.items()}


def _ranking_sentence(results: Results) -> str:
    orders = {plan: ranking(results, plan) for plan in HEADLINE_PLANS if plan in results["aggregate"]}
    best = "; ".join(f"on {plan} {order[0]} leads, then {order[1]}" for plan, order in orders.items())
    if len(orders) < 2:
        return best
    common = [v for v in orders["sentiment"] if v in orders["generation"]]
    ranks = {plan: [[x for x in order if x in common].index(v) for v in common] for plan, order in orders.items()}
    rho = _spearman(ranks["sentiment"], ranks["generation"])
    return f"The two tasks rank the methods alike only in part (Spearman {rho:.2f} over {len(common)} variants): {best}"


def _cell_figure(results: Results, plan: str, variant: str, column: str) -> str:
    """One cell of a question's table."""
    cell, timed = _cells(results, plan)[variant], _speed(results, plan).get(variant)
    flops = (timed or {}).get("flops_ratio_vs_lora")
    figures = {
        "test quality": lambda: _format_quality(results, plan, variant),
        "vs LoRA": lambda: _difference(results, plan, variant, "lora"),
        "speed vs LoRA": lambda: _ratio(speedup(results, plan, variant)),
        "FLOPs vs LoRA": lambda: f"{flops:.2f}" if flops is not None else "n/a",
        "trainable": lambda: f"{cell['trainable_params']:,}",
        "base weights MB": lambda: _mb(cell["base_weight_memory_bytes"]),
        "training memory MB": lambda: _mb(_memory_total(timed)) if timed else "n/a",
    }
    return figures[column]()


QUESTION_COLUMNS = {
    "sparselora": ("test quality", "vs LoRA", "speed vs LoRA", "FLOPs vs LoRA"),
    "qlora": ("base weights MB", "training memory MB", "test quality", "vs LoRA", "speed vs LoRA"),
    "hira": ("trainable", "test quality", "vs LoRA", "speed vs LoRA"),
    "combinations": ("test quality", "speed vs LoRA", "base weights MB", "training memory MB"),
}


def question_table(results: Results, key: str) -> str:
    """The figures behind one answer, best first per task: the Guide and the report show this."""
    if key == "tasks":
        return _ranking_table(results)
    rows = [
        [plan, f"`{variant}`", *(_cell_figure(results, plan, variant, c) for c in QUESTION_COLUMNS[key])]
        for plan in _plans_with(results, QUESTION_SUBJECTS[key])
        for variant in ranking(results, plan)
        if QUESTION_VARIANTS[key](variant)
    ]
    return _table(["task", "variant", *QUESTION_COLUMNS[key]], rows) if rows else ""


def _ranking_table(results: Results) -> str:
    """Each variant's place and test figure on each task, in the first task's order."""
    orders = {plan: ranking(results, plan) for plan in HEADLINE_PLANS if plan in results["aggregate"]}
    variants = next(iter(orders.values()), [])
    rows = [
        [
            f"`{v}`",
            *(f"{o.index(v) + 1}. {_format_quality(results, p, v)}" if v in o else "n/a" for p, o in orders.items()),
        ]
        for v in variants
    ]
    return _table(["variant", *(f"{plan}: place, {_quality_axis(results, plan)}" for plan in orders)], rows)


# -- the report --------------------------------------------------------------------------------

QUESTIONS = (
    ("sparselora", "1. What does SparseLoRA's sparsity cost in accuracy and buy in speed, against LoRA?"),
    ("qlora", "2. How much memory does QLoRA's 4-bit base save, and what does it cost in accuracy?"),
    ("hira", "3. Does HiRA's high-rank update beat LoRA at equal parameter count, and at what cost in step time?"),
    ("tasks", "4. How do the methods rank on sentiment classification vs text generation?"),
    ("combinations", "5. Do combinations (SparseLoRA or HiRA on a 4-bit base) keep both benefits?"),
)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _spread_text(figure: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if figure is None:
        return "n/a"
    text = f"{scale * figure['mean']:.{digits}f}"
    return text + (f" ± {scale * figure['std']:.{digits}f}" if figure["std"] is not None else "")


def headline_table(results: Results, plan: str) -> str:
    """Quality, size, speed and memory of every variant of one plan (the README quotes it)."""
    speed = _speed(results, plan)
    rows = []
    for variant in ranking(results, plan):
        cell = _cells(results, plan)[variant]
        timed = speed.get(variant)
        if "test_accuracy" in cell:
            figures = [
                _spread_text(cell["test_accuracy"], 100, 1),
                _spread_text(cell["validation_accuracy"], 100, 1),
            ]
        else:
            figures = [
                _spread_text(cell["test_perplexity"], digits=2),
                _spread_text(cell["validation_perplexity"], digits=2),
            ]
            if "control_share" in cell:
                figures.append(_spread_text(cell["control_share"], digits=2))
        rows.append(
            [
                f"`{variant}`",
                f"{cell['learning_rate']:g}",
                f"{cell['trainable_params']:,} ({cell['trainable_percent']:.2f}%)",
                *figures,
                f"{timed['median_step_s']:.3f}" if timed else "n/a",
                _ratio(speedup(results, plan, variant)),
                _mb(cell["base_weight_memory_bytes"]),
                _mb(_memory_total(timed)) if timed else "n/a",
            ]
        )
    first = next(iter(_cells(results, plan).values()))
    if "test_accuracy" in first:
        quality_header = ["test accuracy %", "validation accuracy %"]
    else:
        quality_header = ["test perplexity", "validation perplexity"]
        if "control_share" in first:
            quality_header.append("sentiment control share")
    header = [
        "variant",
        "learning rate",
        "trainable",
        *quality_header,
        "step s",
        "speed vs LoRA",
        "base weights MB",
        "training memory MB",
    ]
    return _table(header, rows)


def headline_tables(results: Results) -> str:
    """Every plan's headline table under a line naming its model and budget."""
    return "\n".join(
        f"**{plan['name']}**: `{plan['model']}` on `{plan['dataset']}`, {plan['steps']} steps, "
        f"seeds {', '.join(str(s) for s in plan['seeds'])}\n\n" + headline_table(results, plan["name"])
        for plan in results["plans"]
        if plan["name"] in results["aggregate"]
    )


def speed_table(results: Results, plan: str) -> str:
    rows = []
    for entry in results["speed"].get(plan, []):
        memory = entry["memory"]
        rows.append(
            [
                f"`{entry['label']}`",
                f"{entry['median_step_s']:.3f}",
                f"{entry['tokens_per_s']:,.0f}",
                _ratio(speedup(results, plan, entry["label"])),
                f"{entry['flops_ratio_vs_lora']:.2f}" if entry["flops_ratio_vs_lora"] is not None else "",
                f"{entry['estimator_recall']:.2f}" if entry["estimator_recall"] is not None else "",
                *(_mb(memory[key]) for key, _ in MEMORY_PARTS),
            ]
        )
    header = ["entry", "median step s", "tokens/s", "speed vs LoRA", "FLOPs vs LoRA", "recall"]
    return _table(header + [f"{label} MB" for _, label in MEMORY_PARTS], rows)


def _training_text(results: Results) -> str:
    training = results["training"]
    reused = training["runs"] - training["trained_now"]
    return (
        f"It trained {training['trained_now']} of the {training['runs']} runs behind these figures"
        + (
            f" and reused {reused} that an earlier invocation had completed with the same configuration"
            if reused
            else ""
        )
        + f"; the {training['runs']} runs took {training['run_time_s'] / 60:.0f} minutes in all, between "
        f"{training['first_started_at']} and {training['last_finished_at']}. Library versions:"
    )


def _answers_markdown(results: Results) -> list[str]:
    """Each question as the Guide shows it: one sentence, (the figure's file), the table, then the detail."""
    said, short = answers(results), headlines(results)
    parts = []
    for key, question in QUESTIONS:
        parts.append(f"### {question}\n")
        if not said[key]:
            parts.append("_Not measured in this suite._\n")
            continue
        parts.append(f"**{short[key]}** (figure: `figures/{key}.json`)\n\n{question_table(results, key)}")
        parts.append(f"In detail: {said[key]}\n")
    return parts


def markdown(results: Results) -> str:
    hardware, versions = results["hardware"], results["versions"]
    parts = [
        "# LoRA Arena benchmark results\n",
        f"Produced by `{results['command']}` ({results['suite']} suite) on {results['started_at']}, "
        f"in {results['duration_s'] / 60:.0f} minutes on {hardware['cores']} cores of {hardware['cpu']} "
        f"({hardware['device']}, {hardware['memory_bytes'] / 2**30:.0f} GiB). {_training_text(results)} "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + ". Every figure below is in `results.json` beside this file; the figures the app's Guide "
        "tab draws are in `figures/`.\n",
        "**How it was measured.** Each plan trains every variant on the same model, data, split, "
        "steps, batch, sequence length and seeds (AdamW, linear decay, 5% warm-up). Quality comes from "
        "those runs: sentiment test accuracy on the held-out test split (mean ± standard deviation over "
        "seeds), generation perplexity on validation and test. Step time and memory come from one process "
        "per plan that steps every variant in turn (A B C ... A B C) on the same batches after a warm-up; "
        "the ratios are between medians of that one process. Memory is counted from the tensors "
        "(weights as stored, gradients, optimizer state, the activations autograd saves for one batch). "
        + (
            "Learning rates: a sweep on the validation split (first seed) for full fine-tuning and for "
            "LoRA and HiRA at each rank; LoRA's rate also serves QLoRA and SparseLoRA, HiRA's serves HiRA "
            "on 4-bit. Quality is therefore read on the test split.\n"
            if results["sweep"]
            else "Learning rates: each method's default (this suite has no sweep).\n"
        ),
        "## Answers\n",
    ]
    parts += _answers_markdown(results)
    for plan in results["plans"]:
        name = plan["name"]
        if name not in results["aggregate"]:
            continue
        parts.append(
            f"## {name}: `{plan['model']}` on `{plan['dataset']}`\n\n"
            f"{plan['steps']} steps, batch {plan['batch_size']}, sequence {plan['seq_len']}, "
            f"seeds {', '.join(str(s) for s in plan['seeds'])}"
            + (f", {plan['eval_samples']} evaluation examples" if plan["eval_samples"] else "")
            + (f", {plan['control_samples']} judged reviews" if plan["control_samples"] else "")
            + ".\n"
        )
        parts.append(headline_table(results, name))
        cell = next(iter(results["aggregate"][name].values()))
        base = cell["base_validation"]
        parts.append(
            "Base model (no training), validation: "
            + ", ".join(f"{k} {v:.3f}" for k, v in base.items())
            + (
                f"; sentiment control share {cell['base_control_share']['mean']:.2f}"
                if "base_control_share" in cell
                else ""
            )
            + ".\n"
        )
        if results["speed"].get(name):
            first = results["speed"][name][0]
            parts.append(
                f"Speed and memory, {first['steps']} interleaved steps after {first['warmup']} warm-up steps:\n"
            )
            parts.append(speed_table(results, name))
    if results["sweep"]:
        parts.append("## Learning-rate sweep (validation split, first seed)\n")
        rows = []
        for trial in results["sweep"]:
            metric = next(k for k in trial if k.startswith("validation_"))
            rows.append(
                [
                    trial["plan"],
                    trial["family"],
                    f"{trial['learning_rate']:g}",
                    f"{metric.removeprefix('validation_')} {trial[metric]:.4f}",
                    "chosen" if trial.get("chosen") else "",
                ]
            )
        parts.append(_table(["plan", "family", "learning rate", "validation", ""], rows))
    if results.get("judge"):
        judge = results["judge"]
        parts.append(
            f"Generated reviews were judged by `{judge['cell']}` (run `{judge['run']}`, validation "
            f"accuracy {judge['validation_accuracy']:.3f}).\n"
        )
    parts.append(
        "## Reproduce\n\n`make bench` reruns everything (completed cells in `runs/bench-suite` are "
        "reused; delete that folder to start over). One cell: "
        "`python -m training bench --only sentiment/lora --seed 0` trains it again from the recorded "
        "configuration and prints the new figures beside these.\n"
    )
    return "\n".join(parts)


# -- figures -----------------------------------------------------------------------------------

# Memory parts are no methods: greys, so no bar reads as a method's colour.
PART_COLOURS = dict(zip((key for key, _ in MEMORY_PARTS), ("#252525", "#636363", "#969696", "#cccccc")))
PLANS = ("sentiment", "generation", "continuation")


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


def _quality_axis(results: Results, plan: str) -> str:
    first = next(iter(_cells(results, plan).values()))
    return "test accuracy %" if "test_accuracy" in first else "test perplexity"


def _scaled_quality(results: Results, plan: str, variant: str) -> tuple[float, float] | None:
    """Test quality and its spread as the tables print them (accuracy in %)."""
    found = quality(results, plan, variant)
    if found is None:
        return None
    scale = 100 if found[0] == "test_accuracy" else 1
    return scale * found[1], scale * (found[2] or 0)


def _scatter_by_plan(results: Results, key: str, title: str, x_title: str, x_of: Callable) -> go.Figure:
    """Test quality against `x_of(plan, variant)`, one panel per plan, the variants of question
    `key` only; no text beside the markers (they collide), the legend names them."""
    plans = [plan for plan in PLANS if plan in results["aggregate"]]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        for variant in filter(QUESTION_VARIANTS[key], _cells(results, plan)):
            x, y = x_of(plan, variant), _scaled_quality(results, plan, variant)
            if x is None or y is None:
                continue
            marker = go.Scatter(x=[x], y=[y[0]], error_y={"array": [y[1]]}, mode="markers", name=variant)
            marker.update(marker_size=12, hovertemplate=f"{variant}<br>%{{x}}<br>%{{y:.2f}}<extra></extra>")
            _add(figure, column, marker, method_colour(variant))
        figure.update_xaxes(title_text=x_title, row=1, col=column)
        figure.update_yaxes(title_text=_quality_axis(results, plan), row=1, col=column)
    figure.update_layout(**LAYOUT, title=title)
    return figure


def sparselora_speed(results: Results) -> go.Figure:
    def step(plan: str, variant: str) -> float | None:
        entry = _speed(results, plan).get(variant)
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
    plans = [plan for plan in PLANS if plan in _plans_with(results, "hira", "lora")]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        for method in ("lora", "hira"):
            ranks = [(f"rank {r}", v) for r, v in ((8, method), (32, f"{method}-r32")) if v in _cells(results, plan)]
            found = [_scaled_quality(results, plan, v) for _, v in ranks]
            bars = go.Bar(x=[r for r, _ in ranks], y=[q[0] for q in found], name=method)
            bars.update(error_y={"array": [q[1] for q in found]})
            _add(figure, column, bars, method_colour(method))
        figure.update_yaxes(title_text=_quality_axis(results, plan), row=1, col=column)
    figure.update_layout(**LAYOUT, barmode="group", title="HiRA vs LoRA at equal trainable parameters")
    return figure


def task_ranking(results: Results) -> go.Figure:
    """Every variant's test quality per task, best at the top, names on the axis (no legend)."""
    plans = [plan for plan in HEADLINE_PLANS if plan in results["aggregate"]]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        order = ranking(results, plan)[::-1]  # plotly draws the first category at the bottom
        found = [_scaled_quality(results, plan, v) for v in order]
        # Dots, not bars: bars from zero would hide differences of a few points.
        dots = go.Scatter(y=order, x=[q[0] for q in found], mode="markers", name=plan, showlegend=False)
        dots.update(marker={"size": 12, "color": [method_colour(v) for v in order]})
        dots.update(error_x={"array": [q[1] for q in found]})
        figure.add_trace(dots, row=1, col=column)
        figure.update_xaxes(title_text=_quality_axis(results, plan), row=1, col=column)
    figure.update_layout(**{**LAYOUT, "height": 480}, title="Ranking per task (best at the top)", showlegend=False)
    return figure


def combinations_figure(results: Results) -> go.Figure:
    def training_memory(plan: str, variant: str) -> float | None:
        entry = _speed(results, plan).get(variant)
        return _memory_total(entry) / MB if entry else None

    title = "Combinations: test quality against training memory (4-bit and sparse, alone and together)"
    return _scatter_by_plan(results, "combinations", title, "training memory MB", training_memory)


def loss_curves(results: Results) -> go.Figure:
    plans = [plan for plan in PLANS if plan in results["aggregate"]]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        curves: dict[str, list[list[float]]] = {}
        for cell in results["cells"]:
            if cell["plan"] == plan:
                curves.setdefault(cell["variant"], []).append(cell["loss_curve"])
        for variant, runs in curves.items():
            mean = [statistics.fmean(values) for values in zip(*runs)]
            curve = go.Scatter(x=list(range(1, len(mean) + 1)), y=_smooth(mean), mode="lines", name=variant)
            _add(figure, column, curve, method_colour(variant))
        figure.update_xaxes(title_text="step", row=1, col=column)
        figure.update_yaxes(title_text="training loss (mean over seeds, smoothed)", row=1, col=column)
    figure.update_layout(**LAYOUT, title="Training loss")
    return figure


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    smoothed, last = [], values[0] if values else 0.0
    for value in values:
        last = weight * last + (1 - weight) * value
        smoothed.append(last)
    return smoothed


def sparsity_schedules(results: Results) -> go.Figure:
    plans = [p for p, entries in results["speed"].items() if any(e["flops_ratio_vs_lora"] for e in entries)]
    figure = _panels(plans)
    for column, plan in enumerate(plans, start=1):
        entries = [e for e in results["speed"][plan] if e["flops_ratio_vs_lora"] is not None]
        labels = [e["label"] for e in entries]
        speedups = [speedup(results, plan, e["label"], "qlora" if "4bit" in e["method"] else "lora") for e in entries]
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


def write(results: Results, out: Path | str) -> Path:
    """results.json (with the answers), report.md and figures/*.json in `out`."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    results = {**results, "answers": answers(results)}
    (out / "report.md").write_text(markdown(results), encoding="utf-8")
    for name, build in FIGURES.items():
        (out / "figures" / f"{name}.json").write_text(build(results).to_json(), encoding="utf-8")
    write_json_atomic(out / "results.json", results)  # last: the app shows results once all of them exist
    return out / "report.md"


def report_path(out: Path | str) -> str:
    """The report's path as someone in the app's folder finds it."""
    return os.path.relpath(Path(out) / "report.md")


def read(out: Path | str) -> dict[str, Any] | None:
    """The results `write` saved, or None when there are none."""
    path = Path(out) / "results.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
