"""The seed's five research questions answered in prose from rows (queries.Row): the report
answers them from results.json, the Guide from the store's runs too, through these functions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from training.core.memory import MB
from training.core.presentation import markdown_table

from .queries import Row, find, headline_plans, plan_rows, plans_with, ranking, speedup

QUESTIONS = (
    ("sparselora", "1. What does SparseLoRA's sparsity cost in accuracy and buy in speed, against LoRA?"),
    ("qlora", "2. How much memory does QLoRA's 4-bit base save, and what does it cost in accuracy?"),
    ("hira", "3. Does HiRA's high-rank update beat LoRA at equal parameter count, and at what cost in step time?"),
    ("tasks", "4. How do the methods rank on sentiment classification vs text generation?"),
    ("combinations", "5. Do combinations (SparseLoRA or HiRA on a 4-bit base) keep both benefits?"),
)


def is_sparselora_setting(variant: str) -> bool:
    """A SparseLoRA variant on an unquantized base: the ones question 1 compares with LoRA."""
    return variant.startswith("sparselora") and not variant.endswith("4bit")


# The variants each question is about: its table and its figure show these alone.
QUESTION_VARIANTS: dict[str, Callable[[str], bool]] = {
    "sparselora": lambda v: v in ("lora", "lora-nodrop") or is_sparselora_setting(v),
    "qlora": lambda v: v in ("full", "lora", "qlora"),
    "hira": lambda v: v in ("lora", "hira", "lora-r32", "hira-r32"),
    "tasks": lambda v: True,
    "combinations": lambda v: v in ("lora", "qlora", "sparselora", "sparselora-4bit", "hira", "hira-4bit"),
}
# A task's rows appear in a question's table only where it measured the question's method.
QUESTION_SUBJECTS = {"sparselora": "sparselora", "qlora": "qlora", "hira": "hira", "combinations": "sparselora-4bit"}
QUESTION_COLUMNS = {
    "sparselora": ("quality", "vs LoRA", "speed vs LoRA", "FLOPs vs LoRA"),
    "qlora": ("base weights MB", "training memory MB", "quality", "vs LoRA", "speed vs LoRA"),
    "hira": ("trainable", "quality", "vs LoRA", "speed vs LoRA"),
    "combinations": ("quality", "speed vs LoRA", "base weights MB", "training memory MB"),
}


FLOPS_ALONE = (
    ' "By FLOPs alone" is one over the FLOPs ratio: the speed a step would gain if its time fell with'
    " its FLOPs. A speed below it is the part of a step that sparsity does not shrink (norms, attention's"
    " softmax, the LM head, the estimator, the gathers of kept channels); one above it, LoRA's dropout"
    " masks, which SparseLoRA (dropout 0) does not draw."
)


def ratio_text(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "n/a"


def megabytes_text(value: float | None) -> str:
    return f"{value / MB:,.1f}" if value is not None else "n/a"


def quality_axis(row: Row) -> str:
    """The name of a row's quality figure as tables and axes print it ("test accuracy %")."""
    return f"{row.split} {row.metric}" + (" %" if row.metric == "accuracy" else "")


def quality_text(table: Sequence[Row], plan: str, variant: str) -> str:
    row = find(table, plan, variant)
    if row is None:
        return "n/a"
    if row.metric == "accuracy":
        spread = f" ± {100 * row.std:.1f}" if row.std is not None else ""
        return f"{100 * row.mean:.1f}%{spread} (n={row.n})"
    return f"{row.mean:.2f}" + (f" ± {row.std:.2f}" if row.std is not None else "")


def _difference(table: Sequence[Row], plan: str, variant: str, reference: str) -> str:
    a, b = find(table, plan, variant), find(table, plan, reference)
    if a is None or b is None:
        return "n/a"
    if a.metric == "accuracy":
        return f"{100 * (a.mean - b.mean):+.1f} points"
    return f"{100 * (a.mean / b.mean - 1):+.1f}% perplexity"


def _memory_ratio(table: Sequence[Row], plan: str, variant: str, against: str, field: str) -> float | None:
    a, b = getattr(find(table, plan, variant), field), getattr(find(table, plan, against), field)
    return a / b if a is not None and b else None


# How close to LoRA's quality counts as keeping it: a point of accuracy, 2% of perplexity.
KEEPS_QUALITY = {"accuracy": 0.01, "perplexity": 0.02}


KEEPS_QUALITY_TEXT = (
    f"{100 * KEEPS_QUALITY['accuracy']:g} point of LoRA's accuracy or {100 * KEEPS_QUALITY['perplexity']:g}% of its "
    "perplexity"
)


def _quality_lost(table: Sequence[Row], plan: str, variant: str) -> float:
    """Accuracy points (as a fraction) or the relative perplexity `variant` gives up against LoRA."""
    row, lora = find(table, plan, variant), find(table, plan, "lora")
    return lora.mean - row.mean if row.metric == "accuracy" else row.mean / lora.mean - 1


def _fastest_keeping_quality(table: Sequence[Row], plan: str) -> str:
    """The fastest SparseLoRA setting within KEEPS_QUALITY of LoRA, or, when none is, the closest."""
    settings = [
        row.variant
        for row in plan_rows(table, plan).values()
        if is_sparselora_setting(row.variant) and speedup(table, plan, row.variant) and math.isfinite(row.mean)
    ]
    if not settings or not math.isfinite(find(table, plan, "lora").mean):
        return ""
    metric = find(table, plan, settings[0]).metric
    kept = [v for v in settings if _quality_lost(table, plan, v) <= KEEPS_QUALITY[metric]]
    if kept:
        best = max(kept, key=lambda v: speedup(table, plan, v))
        return f"{plan} `{best}` at {ratio_text(speedup(table, plan, best))} LoRA's speed"
    closest = min(settings, key=lambda v: _quality_lost(table, plan, v))
    return (
        f"{plan} none (the closest, `{closest}`, {_difference(table, plan, closest, 'lora')} at "
        f"{ratio_text(speedup(table, plan, closest))} LoRA's speed)"
    )


def _sparselora(table: Sequence[Row]) -> str:
    lines = []
    for plan in plans_with(table, "sparselora", "lora"):
        described = []
        for row in sorted(plan_rows(table, plan).values(), key=lambda row: row.variant):
            if not is_sparselora_setting(row.variant):
                continue
            ratio = row.flops_ratio
            flops = f"{ratio:.2f} of LoRA's ({ratio_text(1 / ratio)} by FLOPs alone)" if ratio else "n/a"
            recall = f", estimator recall {row.estimator_recall:.2f}" if row.estimator_recall is not None else ""
            described.append(
                f"`{row.variant}` {quality_text(table, plan, row.variant)} "
                f"({_difference(table, plan, row.variant, 'lora')}), "
                f"{ratio_text(speedup(table, plan, row.variant))} LoRA's speed, "
                f"FLOPs {flops}{recall}"
            )
        if find(table, plan, "lora-nodrop"):  # SparseLoRA runs without dropout: LoRA without it too
            described.insert(
                0,
                f"`lora-nodrop` (LoRA at SparseLoRA's dropout 0) {quality_text(table, plan, 'lora-nodrop')} "
                f"({_difference(table, plan, 'lora-nodrop', 'lora')}), "
                f"{ratio_text(speedup(table, plan, 'lora-nodrop'))} LoRA's speed",
            )
        lines.append(f"{plan}: LoRA {quality_text(table, plan, 'lora')}; " + "; ".join(described))
    explained = FLOPS_ALONE if any(row.flops_ratio for row in table) else ""  # the store's runs count none
    fastest = [text for text in (_fastest_keeping_quality(table, plan) for plan in plans_with(table, "lora")) if text]
    kept = f" The fastest setting within {KEEPS_QUALITY_TEXT}: " + "; ".join(fastest) + "." if fastest else ""
    return ". ".join(lines) + "." + explained + kept if lines else ""


def _qlora(table: Sequence[Row]) -> str:
    lines = []
    for plan in plans_with(table, "qlora", "lora"):
        qlora, lora = find(table, plan, "qlora"), find(table, plan, "lora")
        weights = _memory_ratio(table, plan, "qlora", "lora", "base_weight_bytes")
        total = _memory_ratio(table, plan, "qlora", "lora", "training_memory_bytes")
        lines.append(
            f"{plan}: base weights {megabytes_text(qlora.base_weight_bytes)} MB vs "
            f"{megabytes_text(lora.base_weight_bytes)} MB ({ratio_text(weights)}), "
            f"training memory (weights, gradients, optimizer, activations) {ratio_text(total)} LoRA's; "
            f"quality {quality_text(table, plan, 'qlora')} vs {quality_text(table, plan, 'lora')} "
            f"({_difference(table, plan, 'qlora', 'lora')}); "
            f"step {ratio_text(speedup(table, plan, 'qlora'))} LoRA's speed"
        )
    return "; ".join(lines) + "." if lines else ""


def _hira(table: Sequence[Row]) -> str:
    lines = []
    for plan in plans_with(table, "hira", "lora"):
        measured = plan_rows(table, plan)
        parts = [
            f"{plan}, rank 8 ({measured['hira'].trainable_params:,} vs {measured['lora'].trainable_params:,} "
            f"trainable): HiRA {quality_text(table, plan, 'hira')} vs LoRA "
            f"{quality_text(table, plan, 'lora')} ({_difference(table, plan, 'hira', 'lora')}), "
            f"step {ratio_text(speedup(table, plan, 'hira'))} LoRA's speed"
        ]
        if "hira-r32" in measured and "lora-r32" in measured:
            parts.append(
                f"rank 32: {quality_text(table, plan, 'hira-r32')} vs {quality_text(table, plan, 'lora-r32')} "
                f"({_difference(table, plan, 'hira-r32', 'lora-r32')})"
            )
        lines.append(", ".join(parts))
    return "; ".join(lines) + "." if lines else ""


def _spearman(a: list[int], b: list[int]) -> float:
    n = len(a)
    if n < 2:
        return float("nan")
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(a, b)) / (n * (n * n - 1))


def _orders(table: Sequence[Row]) -> dict[str, list[str]]:
    """Each task's headline plan: its variants best first."""
    return {plan: ranking(table, plan) for plan in headline_plans(table)}


def _rank_correlation(orders: dict[str, list[str]]) -> tuple[float, int]:
    """Spearman's correlation between the first two plans' orders over the variants both measured."""
    first, second = list(orders.values())[:2]
    common = [v for v in first if v in second]
    places = [[[x for x in order if x in common].index(v) for v in common] for order in (first, second)]
    return _spearman(*places), len(common)


def _tasks(table: Sequence[Row]) -> str:
    orders = _orders(table)
    lines = [
        f"{plan} ({quality_axis(find(table, plan, order[0])).removesuffix(' %')}): " + " > ".join(order)
        for plan, order in orders.items()
    ]
    if len(orders) >= 2:
        rho, count = _rank_correlation(orders)
        lines.append(f"rank correlation between the tasks (Spearman) {rho:.2f} over {count} variants")
    return "; ".join(lines) + "." if lines else ""


def _combinations(table: Sequence[Row]) -> str:
    lines = []
    for plan in plans_with(table, "sparselora-4bit", "qlora", "sparselora"):
        measured = plan_rows(table, plan)
        lines.append(
            f"{plan}: SparseLoRA on 4-bit {quality_text(table, plan, 'sparselora-4bit')} "
            f"vs QLoRA {quality_text(table, plan, 'qlora')} "
            f"({_difference(table, plan, 'sparselora-4bit', 'qlora')}), "
            f"step {ratio_text(speedup(table, plan, 'sparselora-4bit', 'qlora'))} QLoRA's speed, base weights "
            f"{megabytes_text(measured['sparselora-4bit'].base_weight_bytes)} MB vs SparseLoRA's "
            f"{megabytes_text(measured['sparselora'].base_weight_bytes)} MB"
        )
    for plan in plans_with(table, "hira-4bit", "hira"):
        measured = plan_rows(table, plan)
        lines.append(
            f"{plan}: HiRA on 4-bit {quality_text(table, plan, 'hira-4bit')} vs HiRA "
            f"{quality_text(table, plan, 'hira')} ({_difference(table, plan, 'hira-4bit', 'hira')}), "
            f"base weights {megabytes_text(measured['hira-4bit'].base_weight_bytes)} MB vs "
            f"{megabytes_text(measured['hira'].base_weight_bytes)} MB, "
            f"step {ratio_text(speedup(table, plan, 'hira-4bit', 'hira'))} HiRA's speed"
        )
    return "; ".join(lines) + "." if lines else ""


def answers(table: Sequence[Row]) -> dict[str, str]:
    """One factual paragraph per research question (empty where nothing answers it)."""
    return {
        "sparselora": _sparselora(table),
        "qlora": _qlora(table),
        "hira": _hira(table),
        "tasks": _tasks(table),
        "combinations": _combinations(table),
    }


def _clauses(table: Sequence[Row], clause: Callable[[str], str], *variants: str, every_plan: bool = False) -> str:
    """`clause(plan)` for each task's headline plan (or `every_plan`) that measured `variants`, joined."""
    headline = headline_plans(table)
    return ", ".join(clause(plan) for plan in plans_with(table, *variants) if every_plan or plan in headline)


def _ranking_sentence(table: Sequence[Row]) -> str:
    orders = _orders(table)
    best = "; ".join(f"on {plan} {order[0]} leads, then {order[1]}" for plan, order in orders.items() if len(order) > 1)
    if len(orders) < 2:
        return best
    rho, count = _rank_correlation(orders)
    return f"The two tasks rank the methods alike only in part (Spearman {rho:.2f} over {count} variants): {best}"


def headlines(table: Sequence[Row]) -> dict[str, str]:
    """One sentence per research question, the headline plans only (the tables hold the rest)."""

    def weights(plan: str, variant: str, against: str) -> str:
        return ratio_text(_memory_ratio(table, plan, variant, against, "base_weight_bytes"))

    def versus(variant: str, against: str, text: Callable[[str], str], every_plan: bool = False) -> str:
        return _clauses(table, text, variant, against, every_plan=every_plan)

    said = {
        # every plan: SparseLoRA's cost differs between an encoder and a decoder on one task
        "sparselora": versus(
            "sparselora",
            "lora",
            lambda p: (
                f"{ratio_text(speedup(table, p, 'sparselora'))} LoRA's step speed for "
                f"{_difference(table, p, 'sparselora', 'lora')} on {p}"
            ),
            every_plan=True,
        ),
        "qlora": versus(
            "qlora",
            "lora",
            lambda p: (
                f"{weights(p, 'qlora', 'lora')} LoRA's base-weight memory for "
                f"{_difference(table, p, 'qlora', 'lora')} on {p}"
            ),
        ),
        "hira": versus(
            "hira",
            "lora",
            lambda p: (
                f"{_difference(table, p, 'hira', 'lora')} against LoRA at "
                f"{ratio_text(speedup(table, p, 'hira'))} its step speed on {p}"
            ),
        ),
        "tasks": _ranking_sentence(table),
        "combinations": versus(
            "sparselora-4bit",
            "qlora",
            lambda p: (
                f"{ratio_text(speedup(table, p, 'sparselora-4bit', 'qlora'))} QLoRA's speed for "
                f"{_difference(table, p, 'sparselora-4bit', 'qlora')} on {p}"
            ),
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


def _flops_text(row: Row, variant: str) -> str:
    """FLOPs against LoRA's: LoRA's own is the unit (the bench counts FLOPs for sparse entries only)."""
    if variant == "lora":
        return "1.00"
    return f"{row.flops_ratio:.2f}" if row.flops_ratio is not None else "n/a"


def _cell_figure(table: Sequence[Row], plan: str, variant: str, column: str) -> str:
    """One cell of a question's table."""
    row = find(table, plan, variant)
    figures = {
        "quality": lambda: quality_text(table, plan, variant),
        "vs LoRA": lambda: _difference(table, plan, variant, "lora"),
        "speed vs LoRA": lambda: ratio_text(speedup(table, plan, variant)),
        "FLOPs vs LoRA": lambda: _flops_text(row, variant),
        "trainable": lambda: f"{row.trainable_params:,}",
        "base weights MB": lambda: megabytes_text(row.base_weight_bytes),
        "training memory MB": lambda: megabytes_text(row.training_memory_bytes),
    }
    return figures[column]()


def question_table(table: Sequence[Row], key: str) -> str:
    """The figures behind one answer, best first per plan: the Guide and the report show this."""
    if key == "tasks":
        return _ranking_table(table)
    plans = plans_with(table, QUESTION_SUBJECTS[key])
    shown = [
        [plan, f"`{variant}`", *(_cell_figure(table, plan, variant, c) for c in QUESTION_COLUMNS[key])]
        for plan in plans
        for variant in ranking(table, plan)
        if QUESTION_VARIANTS[key](variant)
    ]
    if not shown:
        return ""
    split = find(table, plans[0], QUESTION_SUBJECTS[key]).split
    columns = [f"{split} quality" if column == "quality" else column for column in QUESTION_COLUMNS[key]]
    return markdown_table(["task", "variant", *columns], shown)


def _ranking_table(table: Sequence[Row]) -> str:
    """Each variant's place and quality on each task, in the first task's order."""
    orders = _orders(table)
    if not orders:
        return ""
    shown = [
        [
            f"`{v}`",
            *(f"{o.index(v) + 1}. {quality_text(table, p, v)}" if v in o else "n/a" for p, o in orders.items()),
        ]
        for v in next(iter(orders.values()))
    ]
    header = [f"{plan}: place, {quality_axis(find(table, plan, order[0]))}" for plan, order in orders.items()]
    return markdown_table(["variant", *header], shown)
