"""SparseLoRA (Khaki et al., ICML 2025): LoRA whose frozen FFN computation is sliced to the
channels a training-free SVD estimator predicts for each batch. The LoRA branch stays dense and
the saved adapter is an ordinary LoRA adapter; sparsity exists only in training forwards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback

from . import lora, sparsity
from .base import FineTuningMethod, HParam, HParamError, Task, cache_dir


def layer_schedule(layers: int, hparams: Mapping[str, Any]) -> list[float]:
    """Channel sparsity per layer: none in the first `dense_first_layers` and the last layer (whose
    FFN `last_layer` may instead run for output tokens only), `ffn_sparsity` in the rest; or the
    explicit comma-separated `layer_sparsity` list."""
    if hparams["layer_sparsity"] != "auto":
        try:
            ratios = [float(part) for part in hparams["layer_sparsity"].split(",")]
        except ValueError:
            raise HParamError("layer_sparsity must be 'auto' or comma-separated numbers") from None
        if len(ratios) != layers or not all(0 <= r < 1 for r in ratios):
            raise HParamError(f"layer_sparsity needs {layers} numbers in [0, 1), one per layer (got {len(ratios)})")
        return ratios
    first = hparams["dense_first_layers"]
    if first >= layers - 1:
        raise HParamError(
            f"dense_first_layers must be below {layers - 1} for this {layers}-layer model "
            "(the last layer is not channel-sparse either), or nothing would be sparse"
        )
    return [0.0] * first + [hparams["ffn_sparsity"]] * (layers - first - 1) + [0.0]


class SparsitySchedule(TrainerCallback):
    """Dense warm-up for the first steps, then sparse; reports FLOPs ratio and estimator recall."""

    def __init__(self, controller: sparsity.SparsityController, warmup_fraction: float) -> None:
        self.controller, self.warmup_fraction = controller, warmup_fraction

    def on_train_begin(self, args, state, control, **kwargs):
        self.warmup_steps = math.ceil(self.warmup_fraction * state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.active = state.global_step >= self.warmup_steps

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs["flops_ratio_vs_lora"] = self.controller.flops_ratio
            logs["estimator_recall"] = self.controller.recall

    def summary(self) -> dict:
        layers = self.controller.layers
        return {
            "sparsity": {
                "flops_ratio_vs_lora": self.controller.flops_ratio,
                "estimator_recall": self.controller.recall,
                "sparse_layers": [layer.index for layer in layers],
                "kept_channels": {layer.index: layer.kept for layer in layers},
                "kept_value_channels": {a.index: a.kept for a in self.controller.attention},
                "outputs_only_layer": self.controller.outputs_only_layer,
                "dense_warmup_steps": getattr(self, "warmup_steps", None),
            }
        }


def apply(model: torch.nn.Module, task: Task, hparams: Mapping[str, Any]) -> torch.nn.Module:
    layout = sparsity.FFN_LAYOUTS.get(model.config.model_type)
    if layout is None:
        raise HParamError(
            f"SparseLoRA supports {', '.join(sparsity.FFN_LAYOUTS)} models, not {model.config.model_type!r}"
        )
    ratios = layer_schedule(len(sparsity.resolve(model, layout.layers)), hparams)
    attention = hparams["attention_sparsity"]
    if attention > 0 and model.config.model_type not in sparsity.ATTENTION_LAYOUTS:
        raise HParamError(
            f"attention_sparsity must be 0 for {model.config.model_type!r} models "
            f"(value/output slicing supports {', '.join(sparsity.ATTENTION_LAYOUTS)})"
        )
    wrapped = lora.apply(model, task, hparams)
    wrapped.sparsity_controller = sparsity.install(
        wrapped,
        ratios,
        hparams["estimator_rank"],
        hparams["estimator_tokens"],
        hparams["output_tokens"] == "dense",
        cache_dir(),
        [attention if ratio > 0 else 0.0 for ratio in ratios],  # the same layers as the FFN
        hparams["last_layer"] == "outputs",
    )
    return wrapped


def callbacks(model: torch.nn.Module, hparams: Mapping[str, Any]) -> list:
    return [SparsitySchedule(model.sparsity_controller, hparams["dense_warmup"])]


METHOD = FineTuningMethod(
    name="sparselora",
    title="SparseLoRA",
    summary="LoRA that skips most frozen FFN channels each step, picked per batch by an SVD estimator: "
    "fewer FLOPs, faster steps.",
    hparams=(
        *lora.METHOD.hparams,
        HParam(
            "ffn_sparsity",
            float,
            0.75,
            "share of FFN channels skipped in sparse layers",
            minimum=0.0,
            maximum=1.0,
            maximum_exclusive=True,
        ),
        HParam(
            "attention_sparsity",
            float,
            0.0,
            "share of value channels (and the output projection's matching columns) skipped in sparse layers",
            minimum=0.0,
            maximum=1.0,
            maximum_exclusive=True,
        ),
        HParam(
            "estimator_rank",
            int,
            384,
            "rank of the SVD estimator that picks the channels (at or above the model width: exact)",
            minimum=1,
            maximum=4096,
        ),
        HParam(
            "estimator_tokens",
            int,
            128,
            "context tokens the estimator scores per step (evenly spaced)",
            minimum=1,
            maximum=65536,
        ),
        HParam(
            "dense_first_layers",
            int,
            1,
            "leading layers kept dense (the last layer is not sparse either: see last_layer)",
            minimum=0,
            maximum=1000,
        ),
        HParam("layer_sparsity", str, "auto", "'auto', or one FFN sparsity per layer, comma-separated"),
        HParam(
            "dense_warmup",
            float,
            0.05,
            "share of the first steps trained dense",
            minimum=0.0,
            maximum=1.0,
            maximum_exclusive=True,
        ),
        HParam(
            "output_tokens",
            str,
            "dense",
            "output tokens (generation: labelled tokens; classification: [CLS]) dense or sparse",
            choices=("dense", "sparse"),
        ),
        HParam(
            "last_layer",
            str,
            "outputs",
            "the last layer's FFN for the output tokens only (exact: no loss reads the context's; "
            "needs dense output tokens) or for all tokens",
            choices=("outputs", "all"),
        ),
    ),
    apply=apply,
    callbacks=callbacks,
    merges=True,  # sparsity lives only in training forwards: the saved adapter is a plain LoRA one
)
