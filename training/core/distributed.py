"""Training on several processes: data parallel, launched by torchrun (or `accelerate launch`).

The launcher starts N copies of the same command with RANK and WORLD_SIZE set; the Trainer, through
accelerate, joins them into one process group, wraps the model in DistributedDataParallel and hands
each process its share of every global batch (batch size x processes). What this module adds is
what the engine needs the processes to agree on: which run they train (rank 0 creates and records
it; the others write only their checkpoint shards into its folder) and whether to stop.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

T = TypeVar("T")
# The others wait here while rank 0 evaluates (the base model included), however long that takes.
AGREEMENT_TIMEOUT = timedelta(hours=24)
# TrainingArguments' ddp_timeout default: the Trainer's own collectives, in the group joined here.
TRAINER_TIMEOUT = timedelta(seconds=1800)
# A stopping process may be saving a checkpoint: torchrun's default 30 s before SIGKILL is too short.
SHUTDOWN_TIMEOUT_S = 600


def world_size() -> int:
    """How many processes train this run (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """The process that records the run: rank 0, or the only one."""
    return int(os.environ.get("RANK", "0")) == 0


def launched() -> bool:
    """Started by torchrun: the launcher's agent is this process's parent."""
    return "TORCHELASTIC_RUN_ID" in os.environ


@functools.cache
def _agreement_group() -> Any:
    """Join the launcher's process group now rather than when the Trainer starts (it later finds
    the same group), and open a gloo group beside it for what the engine agrees on: gloo takes CPU
    tensors whatever the Trainer's backend is (NCCL, on GPUs, takes only CUDA ones), and its long
    timeout lets the others wait out rank 0's evaluations."""
    import torch.distributed as dist
    from accelerate import PartialState

    from training.core.environment import has_cuda

    PartialState(cpu=not has_cuda(), timeout=TRAINER_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=AGREEMENT_TIMEOUT)


def from_main(compute: Callable[[], T]) -> T:
    """`compute()` on rank 0, its result on every process (the others do not call it). If rank 0
    raises, it exits with the error and the launcher ends the others."""
    if world_size() == 1:
        return compute()
    import torch.distributed as dist

    group = _agreement_group()
    box = [compute() if is_main() else None]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def anyone(flag: bool) -> bool:
    """True on every process if `flag` is true on any: one decision (stop, say) taken together,
    since a process that leaves the loop alone leaves the others waiting for its gradients."""
    if world_size() == 1:
        return flag
    import torch
    import torch.distributed as dist

    votes = torch.tensor([int(flag)])
    dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=_agreement_group())
    return bool(votes.item())


@contextmanager
def every_core() -> Iterator[None]:
    """Rank 0 computing alone (an evaluation) while the others wait at the next step: it may use
    the cores their threads leave idle. A single process keeps its threads as they are."""
    if world_size() == 1:
        yield
        return
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def threads_per_process(processes: int) -> int:
    """CPU threads each of `processes` gets: the cores shared out (oversubscribing them makes every
    step wait on the slowest thread)."""
    return max(1, len(os.sched_getaffinity(0)) // processes)


def launch_command(processes: int, arguments: list[str]) -> list[str]:
    """The torchrun line that runs `python -m training ARGUMENTS` on `processes` processes on this
    machine. `--standalone` picks a free local port, so two launches never collide."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        f"--shutdown-timeout={SHUTDOWN_TIMEOUT_S}",
        "-m",
        "training",
        *arguments,
    ]


def launch_environment(processes: int) -> dict[str, str]:
    """This process's environment with each training process's share of the cores as its thread
    count (an inherited OMP_NUM_THREADS, often every core, would oversubscribe them N times)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads_per_process(processes))}
