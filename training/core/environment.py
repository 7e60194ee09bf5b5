"""What a run runs on: the compute device, the hardware and the library versions. Every probe of
the machine lives here, recorded with every run and every results suite."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import signal
import sys
from typing import Any

import psutil
import torch


def library_versions() -> dict[str, str]:
    packages = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}


def has_cuda() -> bool:
    return torch.cuda.is_available()


# CPU instruction sets that compute bfloat16 matrix products natively (Linux's /proc/cpuinfo names):
# without one, PyTorch emulates bf16 on the CPU, slower than float32.
CPU_BF16_FEATURES = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where it does not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            line = next((line for line in file if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def fast_bf16() -> str | None:
    """What computes bfloat16 fast on this machine, in words ("a CPU with AMX-BF16"), or None:
    a CUDA GPU that supports it natively, else the CPU's bf16 instructions, detected."""
    if has_cuda():
        return f"{torch.cuda.get_device_name()} computes bf16" if torch.cuda.is_bf16_supported() else None
    flags = cpu_flags()
    found = [name for flag, name in CPU_BF16_FEATURES.items() if flag in flags]
    return f"the CPU has {' and '.join(found)}" if found else None


def cpu_threads() -> int:
    """The threads PyTorch uses for work on the CPU."""
    return torch.get_num_threads()


def process_slots() -> int:
    """Training processes this machine runs side by side to advantage: one per GPU, else one per
    pair of CPU cores (a process on a single core spends its step waiting for the other's)."""
    if has_cuda():
        return torch.cuda.device_count()
    return max(1, len(os.sched_getaffinity(0)) // 2)


def die_with_parent() -> None:
    """Get SIGKILL when the parent process dies (Linux), so that no orphan trains unseen: a worker
    whose app died, a training process whose launcher died."""
    if sys.platform == "linux":
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


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
