"""What each task is judged on: the engine records it in every summary, the leaderboard and the
research answers sort by it."""

from __future__ import annotations

PRIMARY_METRICS = {"sentiment": "accuracy", "generation": "perplexity"}
# Higher is better for every metric but perplexity.
LOWER_IS_BETTER = frozenset({"perplexity"})
# Shares of the examples: a chart of them never needs an axis beyond 0 and 1.
SHARES = frozenset({"accuracy"})


def primary_metric(task: str) -> str:
    """The metric a run of `task` is ranked by (perplexity for any task not named above)."""
    return PRIMARY_METRICS.get(task, "perplexity")


def metric_text(name: str, value: float) -> str:
    """A metric as every view writes it (run table, leaderboard, model card): a share in percent to
    a tenth of a point (82.7%), anything else to three decimals below 10 (macro-F1 0.362) and two
    above (perplexity 40.30, 1,203.45)."""
    if name in SHARES:
        return f"{value:.1%}"
    return f"{value:.3f}" if abs(value) < 10 else f"{value:,.2f}"
