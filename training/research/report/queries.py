"""Measured results as one row per (plan, variant), whether they come from the benchmark's
results.json or from a run store's finished runs, and the questions every answer asks of them.

A plan is a set of runs compared on equal work (same model, data and steps): a suite plan, or a
store's runs grouped by task, model, dataset and steps.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from training.core.memory import MEMORY_PARTS
from training.core.metrics import LOWER_IS_BETTER, PRIMARY_METRICS, primary_metric
from training.core.runs import RunStore

Results = Mapping[str, Any]
FINISHED = ("completed", "stopped")  # runs that reached their final evaluation or were stopped


@dataclass(frozen=True)
class Row:
    """One variant of one plan: its quality (mean, spread and count over seeds or runs), size,
    step time and training memory; None where it was not measured."""

    plan: str
    task: str
    variant: str
    metric: str  # "accuracy" or "perplexity"
    split: str  # the split the quality was read on
    mean: float
    std: float | None
    n: int
    trainable_params: int
    base_weight_bytes: float | None
    step_s: float | None
    training_memory_bytes: float | None
    flops_ratio: float | None
    estimator_recall: float | None


def timings(results: Results, plan: str) -> dict[str, dict]:
    """The plan's side-by-side timing entries by label (extra SparseLoRA settings included)."""
    return {entry["label"]: entry for entry in results["speed"].get(plan, [])}


def memory_total(parts: Mapping[str, int]) -> int:
    """Weights, gradients, optimizer state and saved activations together."""
    return sum(parts[key] for key, _ in MEMORY_PARTS)


def rows(results: Results) -> list[Row]:
    """results.json's aggregate cells, each with its timing entry, in the suite's order."""
    tasks = {plan["name"]: plan["task"] for plan in results["plans"]}
    found = []
    for plan, cells in results["aggregate"].items():
        timed = timings(results, plan)
        for variant, cell in cells.items():
            metric = "accuracy" if "test_accuracy" in cell else "perplexity"
            quality, entry = cell[f"test_{metric}"], timed.get(variant) or {}
            found.append(
                Row(
                    plan=plan,
                    task=tasks[plan],
                    variant=variant,
                    metric=metric,
                    split="test",
                    mean=quality["mean"],
                    std=quality["std"],
                    n=quality["n"],
                    trainable_params=cell["trainable_params"],
                    base_weight_bytes=cell["base_weight_memory_bytes"],
                    step_s=entry.get("median_step_s"),
                    training_memory_bytes=memory_total(entry["memory"]) if entry else None,
                    flops_ratio=entry.get("flops_ratio_vs_lora"),
                    estimator_recall=entry.get("estimator_recall"),
                )
            )
    return found


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _store_row(plan: str, task: str, method: str, summaries: list[dict]) -> Row:
    """One method's finished runs of one plan, their validation figure averaged."""
    metric = summaries[0].get("primary_metric") or primary_metric(task)
    values = [summary["metrics"]["validation"][metric] for summary in summaries]
    return Row(
        plan=plan,
        task=task,
        variant=method,
        metric=metric,
        split="validation",
        mean=statistics.fmean(values),
        std=statistics.stdev(values) if len(values) > 1 else None,
        n=len(values),
        trainable_params=summaries[0].get("trainable_params") or 0,
        base_weight_bytes=_median([s.get("base_weight_memory_bytes") for s in summaries]),
        step_s=_median([s.get("median_step_time_s") for s in summaries]),
        # Runs recorded before training memory was counted from tensors have none.
        training_memory_bytes=_median([s.get("training_memory_bytes") for s in summaries]),
        flops_ratio=None,
        estimator_recall=None,
    )


def store_rows(store: RunStore) -> list[Row]:
    """The store's finished runs as rows, one plan per (task, model, dataset, steps): within a
    task the largest budget comes first, so it is the one the headline questions read."""
    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in store.runs():
        config, summary = run.config, run.summary
        validation = (summary.get("metrics") or {}).get("validation")
        if summary.get("status") in FINISHED and validation and config.get("task") in PRIMARY_METRICS:
            work = (config["task"], config.get("model"), config.get("dataset"), summary.get("steps") or 0)
            groups[work][config.get("method")].append(summary)
    order = list(PRIMARY_METRICS)
    found = []
    for task, model, dataset, steps in sorted(groups, key=lambda w: (order.index(w[0]), -w[3], str(w[1]), str(w[2]))):
        plan = f"{task}: `{model}` on `{dataset}`, {steps} steps"
        for method, summaries in groups[task, model, dataset, steps].items():
            found.append(_store_row(plan, task, method, summaries))
    return found


def plan_rows(table: Sequence[Row], plan: str) -> dict[str, Row]:
    """The plan's rows by variant."""
    return {row.variant: row for row in table if row.plan == plan}


def plans(table: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(row.plan for row in table))


def plans_with(table: Sequence[Row], *variants: str) -> list[str]:
    """Plans that measured every one of `variants`."""
    return [plan for plan in plans(table) if all(v in plan_rows(table, plan) for v in variants)]


def headline_plans(table: Sequence[Row]) -> list[str]:
    """Each task's first plan: the suite's sentiment and generation plans, a store's largest budget."""
    first: dict[str, str] = {}
    for row in table:
        first.setdefault(row.task, row.plan)
    return list(first.values())


def find(table: Sequence[Row], plan: str, variant: str) -> Row | None:
    return plan_rows(table, plan).get(variant)


def speed_ratio(step_s: float | None, against_s: float | None) -> float | None:
    """How many times faster a step of `step_s` seconds is than one of `against_s`."""
    return against_s / step_s if step_s and against_s else None


def speedup(table: Sequence[Row], plan: str, variant: str, against: str = "lora") -> float | None:
    """How many times faster `variant`'s median step is than `against`'s, timed side by side."""
    a, b = find(table, plan, variant), find(table, plan, against)
    return speed_ratio(a.step_s, b.step_s) if a and b else None


def ranking(table: Sequence[Row], plan: str) -> list[str]:
    """The plan's variants best first by its quality figure."""
    found = plan_rows(table, plan)
    lower = next(iter(found.values())).metric in LOWER_IS_BETTER if found else False
    return sorted(found, key=lambda v: found[v].mean, reverse=not lower)
