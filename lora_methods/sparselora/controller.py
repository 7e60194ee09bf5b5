"""The state every sparse layer shares: on or off, which tokens of the batch run sparse, and the
telemetry (FLOPs against dense LoRA, the estimator's recall of the true top channels)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import IGNORE_INDEX
from .estimator import FFNShape, SparseAttention, SparseLayer

# A token's role in a sparse training step, in the order the routed batch lists them.
CONTEXT, SPARSE_PADDING, OUTPUT, SKIPPED_PADDING = 0, 1, 2, 3


@dataclass(frozen=True)
class Routing:
    """One batch's tokens, flattened over (row, position) and grouped by role: `order` lists them
    context first, then padding that runs sparse (`pad_tokens=compute`), then the outputs, then the
    padding that skips the FFN."""

    order: torch.Tensor
    sampled: int  # context tokens: the only ones the estimator may sample
    sparse: int  # tokens that run the sliced FFN (context and, when computed, padding)
    dense: int  # output tokens: the dense FFN
    skipped: int  # padding that skips every FFN; zeros stand in (nothing reads a pad position)
    rows: torch.Tensor  # the batch row of each context token (the reference estimator averages per row)


@dataclass
class SparsityController:
    """Shared state of all sparse layers: on/off, the token split of the batch, and telemetry."""

    layers: list[SparseLayer]
    linear_flops_per_token: int  # every Linear/Conv1D of the transformer layers, dense (multiply-adds)
    head_flops_per_position: int  # those after the layers (LM head; pooler, classifier), where they run
    attention: list[SparseAttention] = field(default_factory=list)
    active: bool = True
    outputs_only_layer: int | None = None  # the last layer, when only its output tokens run its FFN
    # FFNs that run dense (dense layers, the dense warm-up) and unsliced attention projections skip
    # padding only when at least this share of the batch's tokens is padding: skipping costs them a
    # gather and a scatter of every token, which a little padding does not pay back. A sliced FFN
    # or value/output projection gathers its tokens anyway, so it always leaves padding out.
    pad_skip_share: float = 0.0
    routing: Routing | None = None  # this training batch's tokens by role, set before each forward
    # Dequantized 4-bit weights of this forward (compute dtype), shared by the sparse and dense paths.
    weights: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    sample_tokens: int = 128  # context tokens the estimator scores per step
    recall_batches: int = 4
    recalls: list[float] = field(default_factory=list)
    dense_flops: float = 0.0
    actual_flops: float = 0.0
    exactly_skipped_flops: float = 0.0  # padding's and the last layer's context: nothing reads them

    # Multiply-adds of the linear layers per training step: forward and the backward to the
    # activations (the frozen weights get no gradient), so twice the forward; the estimator runs
    # forward only, once per sparse layer.
    def account_forward(self, tokens: int, head_positions: int) -> None:
        """A training step of `tokens` tokens whose head runs at `head_positions` of them (an LM
        head where logits are asked for, an encoder's classifier once per row): counted dense
        first; each sparse FFN then subtracts what it skipped."""
        flops = 2 * (tokens * self.linear_flops_per_token + head_positions * self.head_flops_per_position)
        self.dense_flops += flops
        self.actual_flops += flops

    def account_saving(self, layer: SparseLayer, sparse_tokens: int, scored_tokens: int) -> None:
        d = layer.estimator[0][0].shape[0]
        self.actual_flops -= 2 * sparse_tokens * (len(layer.inputs) + 1) * d * (layer.width - layer.kept)
        self.actual_flops += scored_tokens * sum(
            a.numel() + (0 if b is None else b.numel()) for a, b, _ in layer.estimator
        )

    def account_skipped(self, tokens: int, shape: FFNShape) -> None:
        """An FFN that `tokens` tokens skipped entirely (padding; the last layer's context)."""
        d, width, projections = shape
        self.actual_flops -= 2 * tokens * projections * d * width
        self.exactly_skipped_flops += 2 * tokens * projections * d * width

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

    @property
    def exact_skip_share(self) -> float | None:
        """The share of LoRA's FLOPs skipped where nothing reads the result: the part of the saving
        that is not contextual sparsity."""
        return self.exactly_skipped_flops / self.dense_flops if self.dense_flops else None

    def telemetry(self) -> dict[str, float | None]:
        """The figures a training log, a run's summary and the benchmark record, under their names."""
        return {
            "flops_ratio_vs_lora": self.flops_ratio,
            "exact_skip_share": self.exact_skip_share,
            "estimator_recall": self.recall,
        }


def output_positions(
    labels: torch.Tensor | None, input_ids: torch.Tensor, classifier_reads: str, pad_token_id: int | None
) -> torch.Tensor | None:
    """Which (row, position) tokens produce an output that the loss reads; None without labels.

    Causal LMs predict labels[t + 1] at position t: a position is an output when the token after
    it is labelled, so each row's prompt is its context. A sequence classifier reads one position
    per row: an encoder its first ([CLS]), a decoder (Llama, GPT-2) its rightmost token that is not
    the pad token, found the way transformers' own classifiers find it, left or right padding alike."""
    if labels is None:
        return None
    outputs = torch.zeros(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if labels.dim() == 2:
        outputs[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    elif classifier_reads == "first":
        outputs[:, 0] = True
    else:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        read = (positions * (input_ids != pad_token_id)).argmax(-1) if pad_token_id is not None else -1
        outputs[torch.arange(input_ids.shape[0], device=input_ids.device), read] = True
    return outputs


def routing(
    outputs: torch.Tensor | None, padding: torch.Tensor | None, skip_padding: bool, shape: torch.Size
) -> Routing:
    """The routing of a batch of `shape` (rows, positions) whose `outputs` run dense (None: no
    token does) and whose `padding` (None: no pad) runs sparse or skips the FFN."""
    device = next((mask.device for mask in (outputs, padding) if mask is not None), None)
    roles = torch.full(shape, CONTEXT, dtype=torch.int8, device=device)
    if padding is not None:
        roles[padding] = SKIPPED_PADDING if skip_padding else SPARSE_PADDING
    if outputs is not None:  # after padding: a pad position whose prediction the loss reads is an output
        roles[outputs] = OUTPUT
    flat = roles.reshape(-1)
    order = torch.argsort(flat, stable=True)  # grouped by role, each group in the batch's order
    counts = torch.bincount(flat.long(), minlength=4).tolist()
    sparse = counts[CONTEXT] + counts[SPARSE_PADDING]
    rows = order[: counts[CONTEXT]] // shape[1]
    return Routing(order, counts[CONTEXT], sparse, counts[OUTPUT], counts[SKIPPED_PADDING], rows)
