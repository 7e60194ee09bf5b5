"""What a live view says about a run in progress, from the run store alone: the phase it is in
and the time it still needs, evaluations included.

The engine writes the phase and the measured evaluation throughput into the summary; training
steps are timed in the metrics stream. Nothing here touches a training loop.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

RECENT_STEPS = 20  # the step time that predicts the rest: the median of the latest steps


def _step_seconds(records: list[dict]) -> float | None:
    times = [r["step_time_s"] for r in records if r.get("kind") == "train" and r.get("step_time_s")]
    return statistics.median(times[-RECENT_STEPS:]) if times else None


def steps_trained(summary: dict[str, Any], records: list[dict]) -> int:
    """Optimizer steps done: the latest step's record, or the phase's step when it is ahead. An
    evaluation at step N runs before step N's record is written, and the training phase counts
    each step as it ends, just before its record."""
    trained = [r["step"] for r in records if r.get("kind") == "train"]
    phase = summary.get("phase") or {}
    ahead = {"evaluation": phase.get("step"), "training": phase.get("done")}.get(phase.get("name"))
    return max(trained[-1] if trained else 0, ahead or 0)


def _evaluations_left(summary: dict[str, Any], step: int) -> int:
    """In-training evaluations still to come: at every eval_steps multiple below the last step."""
    planned, every = summary.get("planned_steps"), summary.get("eval_steps")
    if not planned or not every:
        return 0
    return len(range((step // every + 1) * every, planned, every))


def eta_seconds(summary: dict[str, Any], records: list[dict]) -> float | None:
    """Remaining wall time of a running run: steps left at the recent step time, evaluations left
    at the measured seconds per example (the final one over the full splits, with its sampled
    reviews), the phase in progress pro rata. None until there is something to estimate from."""
    phase = summary.get("phase") or {}
    per_example = summary.get("eval_s_per_example")
    step_s = _step_seconds(records)
    planned = summary.get("planned_steps")
    if not planned or per_example is None:
        return None
    name = phase.get("name")
    control = summary.get("control_time_s") or 0.0  # the base's sentiment control, measured: the final's lasts as long
    final = per_example * (summary.get("final_eval_examples") or 0) + control
    if name == "final evaluation":
        return max(0.0, per_example * ((phase.get("total") or 0) - phase.get("done", 0))) + control
    if name == "sentiment control" and phase.get("step") is not None:  # the final one
        return max(0.0, control - (time.time() - phase.get("started_at", time.time())))
    if name == "saving":
        return 0.0
    if step_s is None:
        return None
    step = steps_trained(summary, records)
    remaining = (planned - step) * step_s + final
    remaining += _evaluations_left(summary, step) * per_example * (summary.get("eval_examples") or 0)
    if name == "evaluation":
        remaining += per_example * max(0, (phase.get("total") or 0) - phase.get("done", 0))
    return remaining


def phase_line(described: dict[str, Any], records: Sequence[dict] = ()) -> str:
    """One line for the status: 'Loading the model and data', 'Evaluating at step 48: 96 / 256
    examples', 'Training: step 12 / 120', 'Stopping…', 'Queued: position 2', or the final status.
    `records`: the run's metrics, so that the step said is the one the progress line says (the
    phase is written every few seconds, a step's record as it ends)."""
    state, summary = described["state"], described.get("summary") or {}
    if state == "queued":
        position = described.get("queue_position")
        return f"Queued: position {position} in line" if position else "Queued"
    if state == "cancelled":  # a resume cancelled in the queue leaves the run as it was
        status = described.get("status")
        return f"{status.capitalize()} (its resume was cancelled)" if status else "Cancelled before it started"
    if state not in ("starting", "running"):
        return (described.get("status") or state).capitalize()
    if described.get("stop_requested"):
        return "Stopping… (the current step or evaluation ends, then the adapter is saved)"
    phase = summary.get("phase") or {}
    name, done, total = phase.get("name"), phase.get("done", 0), phase.get("total")
    if state == "starting" or name in (None, "loading"):
        return "Loading the model and data"
    if name == "training":
        return f"Training: step {steps_trained(summary, list(records))} / {total}"
    counted = f"{done} / {total} examples"
    if name == "base evaluation":
        return f"Evaluating the base model: {counted}"
    if name == "evaluation":
        return f"Evaluating at step {phase.get('step')}: {counted}"
    if name == "final evaluation":
        return f"Final evaluation (validation and test): {counted}"
    if name == "sentiment control":
        return f"Sentiment control: writing {total} reviews and judging their sentiment"
    return "Saving the adapter"
