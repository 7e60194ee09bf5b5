"""What a run ran on: the compute device and the library versions, recorded with every run and
every results suite."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

import torch


def library_versions() -> dict[str, str]:
    packages = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}


def device() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
