"""Default hyperparameters that learn: the results suite's tuned values, read from the results it
wrote (`assets/results/results.json`), for the form, the CLI, the API and the engine alike.

The suite sweeps each method family's learning rate per plan (a task on one model); a method
trains with its family's rate (QLoRA and SparseLoRA with LoRA's, HiRA on 4-bit with HiRA's). A
model the suite has not tuned keeps the method's own default, and `note` says so.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from lora_methods import METHODS, TASKS

RESULTS_DIR = Path(__file__).resolve().parents[2] / "assets" / "results"
TUNED = ("learning_rate",)  # what the suite sweeps


@functools.cache
def _tuned(results_file: Path = RESULTS_DIR / "results.json") -> dict[tuple[str, str, str], dict[str, Any]]:
    """(task, model, method) -> {"learning_rate": rate, "dataset", "plan" and "steps" it was tuned on}.
    The first plan of a task and model wins (a later plan on the same model reuses its rates)."""
    try:
        results = json.loads(results_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    family_of = {name: variant["family"] for name, variant in results.get("variants", {}).items()}
    tuned: dict[tuple[str, str, str], dict[str, Any]] = {}
    for plan in results.get("plans", []):
        rates = results.get("learning_rates", {}).get(plan["name"], {})
        for method in METHODS:
            rate = rates.get(family_of.get(method, ""))
            key = (plan["task"], plan["model"], method)
            if rate is not None and key not in tuned:
                tuned[key] = {
                    "learning_rate": rate,
                    "dataset": plan["dataset"],
                    "plan": plan["name"],
                    "steps": plan["steps"],
                }
    return tuned


def hparam_defaults(task: str, model: str | None, method: str) -> dict[str, Any]:
    """The method's hyperparameter defaults with the suite's tuned values for this task and model
    (an unknown task or method: nothing, so validation names the mistake)."""
    if task not in TASKS or method not in METHODS:
        return {}
    values = METHODS[method].resolve_hparams({})
    tuned = _tuned().get((task, model or "", method), {})
    return {**values, **{name: tuned[name] for name in TUNED if name in tuned}}


def source(task: str, model: str | None, method: str) -> str:
    """'tuned' or 'method default': where the default learning rate comes from."""
    return "tuned" if (task, model or "", method) in _tuned() else "method default"


def note(task: str, model: str | None, method: str) -> str:
    """One line for beside the learning-rate field: where its default comes from."""
    tuned = _tuned().get((task, model or "", method))
    if tuned is None:
        return "no tuned rate for this model: the method's default (try a short sweep)"
    return f"tuned by the results suite for {tuned['steps']} steps on {tuned['dataset']} ({tuned['plan']} plan)"
