"""What a run runs on: the compute device, the hardware and the library versions. Every probe of
the machine lives here, recorded with every run and every results suite."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import psutil
import torch


def library_versions() -> dict[str, str]:
    packages = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def bf16_supported() -> bool:
    """Whether the accelerator computes in bfloat16 (4-bit layers then compute in it)."""
    return has_cuda() and torch.cuda.is_bf16_supported()


def cpu_threads() -> int:
    """The threads PyTorch uses for work on the CPU."""
    return torch.get_num_threads()


def _processor() -> str:
    return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
    if has_cuda():
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": _processor(), "threads": cpu_threads()}


def _cpu_model() -> str:
    """The CPU's marketing name where Linux tells it (platform names only the architecture)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            return next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        return _processor()


def hardware() -> dict[str, Any]:
    """The machine a results suite was timed on: what its speed figures depend on."""
    return {
        "device": torch.cuda.get_device_name() if has_cuda() else "cpu",
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": cpu_threads(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
    }
