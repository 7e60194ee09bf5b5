"""The state every sparse layer shares: on or off, which tokens of the batch run sparse, and the
telemetry (FLOPs against dense LoRA, the estimator's recall of the true top channels)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import IGNORE_INDEX
from .estimator import SparseAttention, SparseLayer


@dataclass
class SparsityController:
    """Shared state of all sparse layers: on/off, the token split of the batch, and telemetry."""

    layers: list[SparseLayer]
    linear_flops_per_token: int  # every Linear/Conv1D of the model, dense (multiply-adds)
    attention: list[SparseAttention] = field(default_factory=list)
    active: bool = True
    outputs_only_layer: int | None = None  # the last layer, when only its output tokens run its FFN
    # This batch's routing over its flattened (row, position) tokens, set before each forward:
    # `order` lists the sparse tokens first and then the dense ones, `sparse_count` how many are
    # sparse, `restore` the inverse permutation. None: every token sparse.
    order: torch.Tensor | None = None
    restore: torch.Tensor | None = None
    sparse_count: int = 0
    sample_tokens: int = 128  # context tokens the estimator scores per step
    recall_batches: int = 4
    recalls: list[float] = field(default_factory=list)
    dense_flops: float = 0.0
    actual_flops: float = 0.0

    # Multiply-adds of the linear layers per training step: forward and the backward to the
    # activations (the frozen weights get no gradient), so twice the forward; the estimator runs
    # forward only, once per sparse layer.
    def account_forward(self, tokens: int) -> None:
        """A training step: counted dense first; each sparse FFN then subtracts what it skipped."""
        self.dense_flops += 2 * tokens * self.linear_flops_per_token
        self.actual_flops += 2 * tokens * self.linear_flops_per_token

    def account_saving(self, layer: SparseLayer, sparse_tokens: int, scored_tokens: int) -> None:
        d = layer.estimator[0][0].shape[0]
        self.actual_flops -= 2 * sparse_tokens * (len(layer.inputs) + 1) * d * (layer.width - layer.kept)
        self.actual_flops += scored_tokens * sum(
            a.numel() + (0 if b is None else b.numel()) for a, b, _ in layer.estimator
        )

    def account_skipped(self, tokens: int, d: int, width: int, projections: int) -> None:
        """A last-layer FFN that `tokens` context tokens skipped entirely."""
        self.actual_flops -= 2 * tokens * projections * d * width

    def account_attention_saving(self, attention: SparseAttention, sparse_tokens: int, scored_tokens: int) -> None:
        d = attention.estimator[0].shape[0]
        skipped_columns = attention.heads * attention.head_dim - attention.columns.numel()
        self.actual_flops -= 2 * sparse_tokens * d * ((attention.width - attention.kept) + skipped_columns)
        a, b, _ = attention.estimator
        self.actual_flops += scored_tokens * (a.numel() + (0 if b is None else b.numel()))

    @property
    def flops_ratio(self) -> float | None:
        return self.actual_flops / self.dense_flops if self.dense_flops else None

    @property
    def recall(self) -> float | None:
        return sum(self.recalls) / len(self.recalls) if self.recalls else None

    def telemetry(self) -> dict[str, float | None]:
        """The figures a training log, a run's summary and the benchmark record, under their names."""
        return {"flops_ratio_vs_lora": self.flops_ratio, "estimator_recall": self.recall}


def dense_positions(labels: torch.Tensor | None, input_shape: torch.Size) -> torch.Tensor | None:
    """Which (row, position) tokens produce an output and so run dense; None if none do.

    Causal LMs predict labels[t + 1] at position t: a position is dense when the token after it
    is labelled, so each row's prompt (and padding) is its context. A sequence classifier reads
    its output at the first ([CLS]) position of each row."""
    if labels is None:
        return None
    if labels.dim() == 2:
        dense = torch.zeros(input_shape, dtype=torch.bool, device=labels.device)
        dense[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        return dense
    dense = torch.zeros(input_shape, dtype=torch.bool, device=labels.device)
    dense[:, 0] = True
    return dense


def routing(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(order, restore, sparse count): the flattened token indices with every sparse token first,
    the permutation that puts them back, and how many are sparse."""
    flat = dense.reshape(-1)
    order = torch.argsort(flat.to(torch.int8), stable=True)  # sparse (False) first, each in order
    return order, torch.argsort(order), int((~flat).sum())
