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
