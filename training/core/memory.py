"""Where a training step's memory goes, counted from the tensors themselves: the same accounting
for the live run (every step record) and the benchmark (the report), on CPU and GPU alike.

A process's resident set (RSS) is mostly the runtime (~1 GB of libraries), so it cannot tell a
4-bit base from a full-precision one; the tensor breakdown can. RSS stays as a secondary figure.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import psutil
import torch

from training.core import environment

MB = 1e6  # every "MB" in the app, the CLI and the report
MEMORY_PARTS = (
    ("weights_bytes", "weights (frozen + trained)"),
    ("gradient_bytes", "gradients"),
    ("optimizer_bytes", "optimizer state"),
    ("activation_bytes", "activations saved for backward"),
)
TOTAL = "training_memory_bytes"


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one storage count once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class ActivationMeter:
    """Counts the bytes autograd saves for the backward pass while `measuring()` is open."""

    def __init__(self, model: torch.nn.Module) -> None:
        self._model = model
        self._parameters: set[int] | None = None
        self.bytes = 0

    @contextmanager
    def measuring(self) -> Iterator[None]:
        # Parameters are not activations. Their storages are read at the first step (after the
        # Trainer has placed the model on its device) and stay put from then on.
        if self._parameters is None:
            self._parameters = {p.untyped_storage().data_ptr() for p in self._model.parameters()}
        parameters = self._parameters
        saved: dict[int, int] = {}  # storage address -> bytes (views of one storage count once)

        # A detached alias, never the tensor itself: a tensor holding the graph that holds it is a
        # reference cycle that keeps every step's activations alive.
        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in parameters:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor.detach()

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            yield
        self.bytes = sum(saved.values())


def breakdown(
    model: torch.nn.Module, weights_bytes: int, optimizer: torch.optim.Optimizer | None, activation_bytes: int
) -> dict[str, int]:
    """The four parts of MEMORY_PARTS and their total, for one step of `model` under `optimizer`;
    `weights_bytes` as `models.weight_memory_bytes` counts them (fixed during training)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    state = optimizer.state.values() if optimizer is not None else []
    parts = {
        "weights_bytes": weights_bytes,
        "gradient_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_bytes": storage_bytes(v for s in state for v in s.values() if torch.is_tensor(v)),
        "activation_bytes": activation_bytes,
    }
    return {**parts, TOTAL: sum(parts.values())}


def process_figures() -> dict[str, int]:
    """The secondary figures: the process's resident set, and on CUDA the allocator's peak since
    the previous call."""
    figures = {"rss_bytes": psutil.Process().memory_info().rss}
    if environment.has_cuda():
        figures["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    return figures
