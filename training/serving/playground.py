"""One input, many trained runs (and the base model) side by side: what the Playground shows.

Every run is served from the shared `AdapterPool`; latencies are measured per model on the same
input, and generations are scored by the store's best sentiment run when one exists.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from lora_methods import Task, get_method
from training.core.data import REVIEW_PROMPT
from training.core.inference import (
    InferenceError,
    check_adapter,
    check_sampling,
    check_texts,
    class_probabilities,
    sample,
)
from training.core.models import LABELS, default_model, resolve_model_path
from training.core.offline import is_offline
from training.core.runs import Run, RunStore, find_judge
from training.serving.pool import AdapterPool

MAX_TEXT_CHARS = 2000
MAX_RUNS = 8
# (warm-up calls, timed calls) per task. A classification is fast: one call to pay the first call's
# one-off costs, then the median of three. A generation is slow: timed once, as it is answered. The
# merged model is timed the same way, so that the two latencies compare.
TIMING: dict[Task, tuple[int, int]] = {"sentiment": (1, 3), "generation": (0, 1)}


def _targets(
    store: RunStore, run_ids: list[str], task: Task, include_base: bool
) -> list[tuple[dict, Run | None, str | None]]:
    """(result entry, run, base model path) for the base model of the selected runs (each base
    once; the task's default model when no run is selected) and then each selected run."""
    if not isinstance(run_ids, list) or not all(isinstance(run_id, str) for run_id in run_ids):
        raise InferenceError("run_ids must be a list of run ids")
    run_ids = list(dict.fromkeys(run_ids))  # a run named twice is served once
    if len(run_ids) > MAX_RUNS:
        raise InferenceError(f"{len(run_ids)} runs selected; compare at most {MAX_RUNS} at once")
    runs = [store.get(run_id) for run_id in run_ids]  # raises RunNotFound
    for run in runs:
        if run.config.get("task") != task:
            raise InferenceError(f"run {run.id} is a {run.config.get('task')} run, not a {task} run")
        check_adapter(run)
    if not runs and not include_base:
        raise InferenceError("select at least one run, or include the base model")
    targets: list[tuple[dict, Run | None, str | None]] = []
    if include_base:
        model_ids = [run.config["model"] for run in runs] or [default_model(task, is_offline())]
        for model_id in dict.fromkeys(model_ids):
            entry = {"name": f"base: {model_id}", "run": None, "method": "base"}
            targets.append((entry, None, resolve_model_path(model_id, is_offline())))
    for run in runs:
        targets.append(({"name": run.id, "run": run.id, "method": get_method(run.config["method"]).title}, run, None))
    return targets


def _timed(call: Callable[[], Any], task: Task) -> tuple[Any, float]:
    """The call's result and its median latency, by the task's TIMING."""
    warm_ups, repeats = TIMING[task]
    for _ in range(warm_ups):
        call()
    result, times = None, []
    for _ in range(repeats):
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
    return result, statistics.median(times)


def classify_side_by_side(
    pool: AdapterPool,
    store: RunStore,
    run_ids: list[str],
    text: str,
    include_base: bool = True,
    compare_merged: bool = False,
) -> list[dict]:
    """Label, class probabilities and latency of `text` for every run (and the base, whose
    classification head is untrained: its answer is chance and shows what training added)."""
    check_texts([text], "text", MAX_TEXT_CHARS)
    results = []
    for entry, run, base_path in _targets(store, run_ids, "sentiment", include_base):
        with pool.serving(run, "sentiment", base_path) as (model, tokenizer, precision):
            probabilities, entry["latency_s"] = _timed(
                lambda: class_probabilities(model, tokenizer, [text], precision)[0], "sentiment"
            )
        entry["precision"] = precision
        if compare_merged and run is not None:
            entry["merged_latency_s"] = _merged_latency(pool, run, lambda m, t, p: class_probabilities(m, t, [text], p))
        entry["label"] = LABELS[int(probabilities.argmax())]
        entry["probabilities"] = dict(zip(LABELS, probabilities.tolist()))
        results.append(entry)
    return results


def _merged_latency(pool: AdapterPool, run: Run, call: Callable) -> float | None:
    """The same call with the adapter merged into the base weights; None where it cannot merge."""
    if get_method(run.config["method"]).merge_blocker is not None:
        return None
    with pool.serving(run, run.config["task"], merged=True) as (model, tokenizer, precision):
        return _timed(lambda: call(model, tokenizer, precision), run.config["task"])[1]


def review_prompt(sentiment: str) -> str:
    """The prompt the review-writing task trains on, for the wanted sentiment."""
    if sentiment not in LABELS:
        raise InferenceError(f"sentiment must be one of {', '.join(LABELS)} (got {sentiment!r})")
    return REVIEW_PROMPT.format(sentiment=sentiment)


def generate_side_by_side(
    pool: AdapterPool,
    store: RunStore,
    run_ids: list[str],
    prompt: str,
    include_base: bool = True,
    compare_merged: bool = False,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[dict]:
    """Each run's (and the base's) continuation of `prompt` with the same sampling settings and
    seed, its latency, and, where a sentiment run exists, the judged sentiment of the text."""
    check_texts([prompt], "prompt", MAX_TEXT_CHARS)
    check_sampling(max_new_tokens, temperature, top_p, seed)  # before any model loads
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    results = []
    for entry, run, base_path in _targets(store, run_ids, "generation", include_base):
        with pool.serving(run, "generation", base_path) as (model, tokenizer, precision):
            texts, entry["latency_s"] = _timed(
                lambda: sample(model, tokenizer, [prompt], precision=precision, **settings), "generation"
            )
        entry["precision"] = precision
        if compare_merged and run is not None:
            entry["merged_latency_s"] = _merged_latency(
                pool, run, lambda m, t, p: sample(m, t, [prompt], precision=p, **settings)
            )
        entry["text"] = texts[0]
        results.append(entry)
    _judge(pool, store, results)
    return results


def _judge(pool: AdapterPool, store: RunStore, results: list[dict]) -> None:
    judge = find_judge(store, None)
    if judge is None:
        return
    with pool.serving(judge, "sentiment") as (model, tokenizer, precision):
        texts = [entry["text"] if entry["text"].strip() else "." for entry in results]
        probabilities = class_probabilities(model, tokenizer, texts, precision)
    for entry, row in zip(results, probabilities):
        entry["judged"] = {"label": LABELS[int(row.argmax())], "positive": float(row[LABELS.index("positive")])}
        entry["judge_run"] = judge.id
