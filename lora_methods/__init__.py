"""The registry of fine-tuning methods: one module per method, each exporting METHOD.

A new method is one new module plus its name in `_MODULES`.
"""

from __future__ import annotations

from . import dora, full, hira, hira_4bit, lora, qlora, sparselora, sparselora_4bit, sparselora_paper
from .base import TASKS, FineTuningMethod, HParam, HParamError, Task

_MODULES = (full, lora, qlora, dora, hira, hira_4bit, sparselora, sparselora_paper, sparselora_4bit)

METHODS: dict[str, FineTuningMethod] = {module.METHOD.name: module.METHOD for module in _MODULES}


def get_method(name: str) -> FineTuningMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise HParamError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


__all__ = ["METHODS", "TASKS", "FineTuningMethod", "HParam", "HParamError", "Task", "get_method"]
