"""The training-free channel estimator: a rank-r SVD of each frozen projection predicts, for a
batch's context tokens, which FFN (or value) channels matter; its factors are cached on disk once
per model and rank, never computed inside the training loop."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .layouts import FFNLayout, resolve
from .slicing import base_weight, frozen_layer

# (A, B, bias) of one projection: x A B + bias predicts x W^T + bias (B is None at full rank).
Factors = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
# (model width, FFN channels, projections) of one FFN: what skipping it for a token saves.
FFNShape = tuple[int, int, int]
ALL_CHANNELS = torch.empty(0, dtype=torch.long)  # a channel set meaning "every channel" (see sliced_projection)
# How the estimator scores channels: its predicted activation per sampled context token (ours), or
# per sequence from the mean of that sequence's context (the reference code's).
SCORINGS = ("tokens", "sequence-mean")


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W^T ~ A B with A (in x r) and B (r x out): x A B predicts x W^T cheaply. A rank that is not
    below the input width gains nothing from factoring: then A is W^T itself and B is None."""
    if rank >= min(weight.shape):
        return weight.t().float().contiguous(), None
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # weight: (out, in)
    return (vh[:rank].t() * s[:rank]).contiguous(), u[:, :rank].t().contiguous()


def estimator_factors(modules: list[torch.nn.Module], rank: int) -> list[Factors]:
    """(A, B, bias) of the rank-`rank` estimator of each projection in `modules`."""
    return [(*svd_factors(base_weight(m)[0], rank), base_weight(m)[1]) for m in modules]


def _estimate(
    context: torch.Tensor, sample_tokens: int, rows: torch.Tensor, scoring: str, estimators: list[Factors]
) -> list[torch.Tensor]:
    """Each estimator's predicted projection, x A B + bias, of what `scoring` scores: an evenly
    spaced sample of at most `sample_tokens` context tokens, or each row's mean context token
    (`rows`: the row of each context token)."""
    tokens = context.reshape(-1, context.shape[-1]).float()
    if scoring == "sequence-mean":
        counts = torch.bincount(rows, minlength=1)
        sums = tokens.new_zeros(counts.shape[0], tokens.shape[-1]).index_add_(0, rows, tokens)
        tokens = sums[counts > 0] / counts[counts > 0, None]
    elif tokens.shape[0] > sample_tokens:
        tokens = tokens[:: math.ceil(tokens.shape[0] / sample_tokens)]
    return [
        (tokens @ a if b is None else (tokens @ a) @ b) + (0 if bias is None else bias) for a, b, bias in estimators
    ]


@dataclass
class SparseLayer:
    """One sparsified FFN: its estimator, its ratio, and the channel set of the current step."""

    index: int
    sparsity: float
    inputs: list[torch.nn.Module]
    output: torch.nn.Module
    activation: Callable[[torch.Tensor], torch.Tensor]
    estimator: list[Factors]  # one per input projection
    scoring: str = "tokens"  # one of SCORINGS
    keep: torch.Tensor | None = None  # set while a sparse forward runs

    @property
    def quantized(self) -> bool:
        return type(frozen_layer(self.inputs[0])).__name__ == "Linear4bit"

    @property
    def shape(self) -> FFNShape:
        return self.estimator[0][0].shape[0], self.width, len(self.inputs) + 1

    @property
    def width(self) -> int:
        a, b, _ = self.estimator[0]
        return (a if b is None else b).shape[1]

    @property
    def kept(self) -> int:
        return max(1, round(self.width * (1.0 - self.sparsity)))

    def _activation_scores(self, projections: list[torch.Tensor]) -> torch.Tensor:
        if len(projections) == 2:
            return self.activation(projections[0]) * projections[1]
        return self.activation(projections[0])

    def choose(self, context: torch.Tensor, sample_tokens: int, rows: torch.Tensor) -> torch.Tensor:
        """Top-k channels by the L2 norm of the activation the rank-r estimator predicts, over an
        evenly spaced sample of the context tokens (or, `sequence-mean`, over each row's mean).

        The paper scores each sample's mean input; on the GELU FFN of MiniLM that statistic found
        only ~29% of the true top channels even with the exact weight, while per-token estimates
        find most of them, so tokens are scored, on a sample that keeps the cost a few percent.
        """
        predicted = _estimate(context, sample_tokens, rows, self.scoring, self.estimator)
        return self._top_channels(self._activation_scores(predicted)).sort().values

    def _top_channels(self, activations: torch.Tensor) -> torch.Tensor:
        """The `kept` channels whose activations (tokens x channels) have the largest L2 norm."""
        return activations.norm(dim=0).topk(self.kept).indices

    def _activations(self, context: torch.Tensor) -> torch.Tensor:
        return self._activation_scores([F.linear(context, *base_weight(module)) for module in self.inputs])

    @torch.no_grad()
    def oracle(self, context: torch.Tensor) -> torch.Tensor:
        """Top-k channels by the true activations of every context token: what the estimator aims at."""
        return self._top_channels(self._activations(context).flatten(0, -2).float())

    @torch.no_grad()
    def output_error(self, context: torch.Tensor, keep: torch.Tensor) -> float:
        """Mean over tokens of |FFN(x) on `keep` - FFN(x)| / |FFN(x)| (output bias aside): how much
        of each token's FFN output the kept channels lose."""
        activations = self._activations(context).flatten(0, -2).float()
        kept = torch.zeros_like(activations)
        kept[:, keep] = 1.0
        return _output_lost(activations, base_weight(self.output)[0].float(), kept)

    @torch.no_grad()
    def oracle_errors(self, context: torch.Tensor, rows: torch.Tensor) -> tuple[float, float, float]:
        """output_error of the oracle's channels chosen once for the batch (the set SparseLoRA
        slices), once per sequence (`rows`: each context token's row) and once per token: how much
        of what the batch's shared set loses is the price of sharing it. Only the batch's set keeps
        the products dense; the finer ones are what a gather per sequence or per token could reach."""
        activations = self._activations(context).flatten(0, -2).float()
        weight = base_weight(self.output)[0].float()
        per_batch = torch.zeros_like(activations)
        per_batch[:, self._top_channels(activations)] = 1.0
        per_sequence = torch.zeros_like(activations)
        for row in rows.unique():
            tokens = (rows == row).nonzero()
            per_sequence[tokens, self._top_channels(activations[tokens[:, 0]])] = 1.0
        per_token = torch.zeros_like(activations).scatter_(1, activations.abs().topk(self.kept, dim=1).indices, 1.0)
        return tuple(_output_lost(activations, weight, kept) for kept in (per_batch, per_sequence, per_token))


def _output_lost(activations: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> float:
    """Mean over tokens of the share of the FFN output lost when only the channels `kept` (a 0/1
    mask per token and channel) run."""
    full = activations @ weight.t()
    lost = (activations * kept) @ weight.t() - full
    return float((lost.norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean())


@dataclass
class SparseAttention:
    """One attention block's sliced value/output projections and the channels of this step."""

    index: int
    sparsity: float
    value: torch.nn.Module
    output: torch.nn.Module
    estimator: Factors  # of the value projection
    head_dim: int
    heads: int
    kv_heads: int
    scoring: str = "tokens"  # one of SCORINGS
    columns: torch.Tensor | None = None  # output-projection columns of this forward (set by the value)

    @property
    def width(self) -> int:
        a, b, _ = self.estimator
        return (a if b is None else b).shape[1]

    @property
    def kept(self) -> int:
        return max(1, round(self.width * (1.0 - self.sparsity)))

    def choose(self, context: torch.Tensor, sample_tokens: int, rows: torch.Tensor) -> torch.Tensor:
        """Top-k value channels by the norm of the predicted value, scored as SparseLayer's are."""
        (value,) = _estimate(context, sample_tokens, rows, self.scoring, [self.estimator])
        return value.norm(dim=0).topk(self.kept).indices.sort().values


class FactorCache:
    """Estimator factors of one model and rank, kept in one file per model under `directory`.

    The file is keyed by the model's name, layout, depth and a fingerprint of its first FFN weight,
    so a fine-tuned copy of the same architecture gets its own factors."""

    def __init__(self, directory: Path, model: torch.nn.Module, blocks: list, layout: FFNLayout, rank: int) -> None:
        first = base_weight(resolve(blocks[0], layout.inputs[0]))[0]
        fingerprint = (
            f"{model.config.name_or_path}|{layout}|{len(blocks)}|{tuple(first.shape)}|{float(first.sum()):.8e}"
        )
        key = hashlib.sha1(fingerprint.encode()).hexdigest()[:16] + f"-r{rank}"
        self.file = directory / "svd" / f"{key}.pt"
        self.rank = rank
        # On the CPU whatever device wrote them: a cache written on a GPU machine still loads here.
        self.factors = torch.load(self.file, map_location="cpu") if self.file.exists() else {}
        self.stored = len(self.factors)

    def get(self, key: int | tuple[str, int], modules: list[torch.nn.Module]) -> list[Factors]:
        """The factors of `modules` under `key`, computed on first use; biases in float32."""
        if key not in self.factors:
            self.factors[key] = estimator_factors(modules, self.rank)
        return [(a, b, None if bias is None else bias.float()) for a, b, bias in self.factors[key]]

    def save(self) -> None:
        """Write the file if factors were added: whole, then renamed, so a reader never sees half a file."""
        if len(self.factors) == self.stored:
            return
        self.file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.file.with_suffix(f".{os.getpid()}.partial")
        torch.save(self.factors, partial)
        os.replace(partial, self.file)
        self.stored = len(self.factors)
