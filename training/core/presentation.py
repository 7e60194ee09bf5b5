"""Conventions every figure and table shares, whether the app draws it or the report writes it:
how a noisy curve is smoothed and how a Markdown table is written."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, debiased as TensorBoard's: without the correction the first
    points would be pulled towards zero (or towards the first value, if it seeded the average)."""
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def _cell(value: object) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[object], rows: Iterable[Iterable[object]]) -> str:
    """A GitHub-flavoured Markdown table; empty cells for missing values, pipes in cells escaped."""
    lines = ["| " + " | ".join(_cell(name) for name in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
