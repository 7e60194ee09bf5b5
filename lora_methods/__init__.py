"""The registry of fine-tuning methods: one module per method, each exporting METHOD.

A new method is one new module plus its name in `_MODULES`.
"""

from __future__ import annotations

from . import dora, full, hira, hira_4bit, lora, qlora, sparselora, sparselora_4bit
from .base import TASKS, FineTuningMethod, HParam, HParamError, Task

_MODULES = (full, lora, qlora, dora, hira, hira_4bit, sparselora, sparselora_4bit)

METHODS: dict[str, FineTuningMethod] = {module.METHOD.name: module.METHOD for module in _MODULES}

# Names that runs were recorded under before their method became another's defaults: those runs
# still load, resume and serve under the method that took them in.
RETIRED = {"sparselora-paper": "sparselora"}  # the paper's schedule became SparseLoRA's default


def get_method(name: str) -> FineTuningMethod:
    try:
        return METHODS[RETIRED.get(name, name)]
    except KeyError:
        raise HParamError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "TASKS", "FineTuningMethod", "HParam", "HParamError", "Task", "get_method"]
