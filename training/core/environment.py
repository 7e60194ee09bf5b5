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


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields as Linux's /proc/cpuinfo lists them (empty where it does not)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            first = file.read().split("\n\n")[0]
    except OSError:
        return {}
    fields = (line.partition(":") for line in first.splitlines())
    return {key.strip(): value.strip() for key, colon, value in fields if colon}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (empty where it does not)."""
    return frozenset(_cpuinfo().get("flags", "").split())


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


# glibc's mallopt parameters (malloc.h), and what in the environment sets them at start-up instead.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_GLIBC_ALLOCATOR_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")
DEFAULT_ALLOCATOR = "the C library's default"
HELD_ALLOCATOR = "glibc, freed memory held for reuse"
_allocator = DEFAULT_ALLOCATOR


def hold_freed_memory() -> str:
    """Make glibc's malloc keep the memory a training step frees for the next step, instead of
    handing it back to the kernel; returns what the process's allocator does, in words.

    glibc serves every block above its mmap threshold (32 MB at most) with fresh pages from the
    kernel and unmaps them on free, so a CPU training step faults its large tensors (activations,
    logits, gradients) in again at every step: on a freshly started machine that was more than
    half of a Hamlet-continuation LoRA step. Served from the heap and never trimmed, the pages are
    faulted in once. The cost: the process keeps its peak resident memory until it ends, which
    suits a process that does one job and exits (every `python -m training` command, the app's
    training workers among them), not the app itself. Where the environment sets glibc's
    allocator (MALLOC_MMAP_MAX_ and the rest, or glibc.malloc tunables), it wins."""
    global _allocator
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        variable in os.environ for variable in _GLIBC_ALLOCATOR_VARIABLES
    ):
        _allocator = "glibc, as the environment sets it"
    elif platform.libc_ver()[0] == "glibc":
        libc = ctypes.CDLL("libc.so.6")
        # no block from mmap; never trim the heap (-1: mallopt takes it as the largest size); grow it 64 MB at a time
        settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1), (_M_TOP_PAD, 64 << 20))
        refused = [parameter for parameter, value in settings if libc.mallopt(parameter, value) != 1]
        _allocator = HELD_ALLOCATOR if not refused else f"glibc, partly held (mallopt refused {refused})"
    return _allocator


def allocator() -> str:
    """What this process's C allocator does with freed memory, in words (see hold_freed_memory)."""
    return _allocator


def _processor() -> str:
    return platform.processor() or platform.machine()


def device() -> dict[str, Any]:
    if has_cuda():
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": _processor(), "threads": cpu_threads(), "allocator": allocator()}


def _cpu_generation(fields: dict[str, str]) -> str | None:
    """The CPU's family and model numbers from its /proc/cpuinfo `fields`: a cloud machine's name
    ("AMD EPYC") can stand for generations whose steps differ twofold."""
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']}, model {fields['model']}"


def hardware() -> dict[str, Any]:
    """The machine a results suite was timed on: what its speed figures depend on."""
    cpuinfo = _cpuinfo()
    return {
        "device": torch.cuda.get_device_name() if has_cuda() else "cpu",
        "cpu": cpuinfo.get("model name") or _processor(),  # the name; platform's is only the architecture
        "cpu_generation": _cpu_generation(cpuinfo),
        "cores": len(os.sched_getaffinity(0)),
        "torch_threads": cpu_threads(),
        "memory_bytes": psutil.virtual_memory().total,
        "platform": platform.platform(),
        "allocator": allocator(),
    }
