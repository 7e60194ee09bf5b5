"""SparseLoRA (Khaki et al., ICML 2025): LoRA whose frozen FFN computation is sliced to the
channels a training-free SVD estimator predicts for each batch. The LoRA branch stays dense and
the saved adapter is an ordinary LoRA adapter; sparsity exists only in training forwards.

Per training step and per sparse layer, a rank-r SVD estimator of the frozen input projection
predicts which intermediate channels matter for this batch; the FFN then runs as smaller dense
products: the kept rows of the input projection(s) (and bias) and the kept columns of the output
projection. Nothing is computed dense and masked. One index set per layer per step, shared by all
tokens of the batch, keeps the products dense.

The package: `layouts` (where each architecture keeps its FFN), `slicing` (a projection on some
channels), `estimator` (SVD factors, their cache, the channel choice), `controller` (shared state,
token routing, FLOP accounting), `forwards` (the patched forwards), `install` (patching a model),
`schedule` (per-layer sparsity), `callback` (the dense warm-up and the figures, in the Trainer).

The defaults are the paper's schedule (its reference code's configurations): the first half of
the layers dense, the deep half at FFN sparsity 0.9, output tokens dense, LoRA dropout 0. They were
chosen by measurement: on every plan of the results suite (MiniLM and SmolLM2 sentiment, review
writing, Hamlet continuation) this schedule was both faster and at least as accurate as the one
this project used first (`MOST_LAYERS`, kept as the suite's ablation), which loses 10 points on
SmolLM2 sentiment: the probe shows its early layers losing 0.4-0.75 of their FFN output at
sparsities where the deep half loses least.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from .. import lora
from ..base import FineTuningMethod, HParam, Task, cache_dir
from .controller import SparsityController
from .estimator import SCORINGS
from .install import SparsitySettings, install
from .layouts import attention_layout, ffn_layout, layer_blocks
from .schedule import DENSE_FIRST_LAYERS, layer_schedule

# The schedule this project used before it measured the paper's: every layer but the first and
# the last at 0.75, LoRA dropout 0.05. Kept to measure against (the results suite's ablation).
MOST_LAYERS = {"layer_sparsity": "auto", "ffn_sparsity": 0.75, "dropout": 0.05}

# With `pad_tokens=auto`, the share of a batch's tokens that must be padding before the dense
# layers' FFNs and attention projections skip it. Measured by a batch's median share of padding
# (the bench's `padding_share`; commands in the README, "Where skipping padding pays"): at 9%,
# skipping it in every layer was 1.05-1.08x slower than in the sparse layers alone (Hamlet
# continuation); at 40-44% 1.16-1.25x faster than computing it (MiniLM and SmolLM2 sentiment); at
# 33-34% (review writing, batches either side of the threshold) a threshold of 0.2 and one of 0.3
# were equally fast within this machine's noise; at 17-25% skipping did not pay.
PAD_SKIP_SHARE = 0.3


def settings(model: torch.nn.Module, hparams: Mapping[str, Any]) -> SparsitySettings:
    """The sparsity `hparams` ask for on this transformers model; HParamError if it cannot have it."""
    model_type = model.config.model_type
    ffn_layout(model_type)
    ratios = layer_schedule(len(layer_blocks(model)), hparams)
    attention = hparams["attention_sparsity"]
    if attention > 0:
        attention_layout(model_type)
    return SparsitySettings(
        ffn=tuple(ratios),
        attention=tuple(attention if ratio > 0 else 0.0 for ratio in ratios),  # the same layers as the FFN
        estimator_rank=hparams["estimator_rank"],
        sample_tokens=hparams["estimator_tokens"],
        dense_outputs=hparams["output_tokens"] == "dense",
        outputs_only_last=hparams["last_layer"] == "outputs",
        skip_padding=hparams["pad_tokens"] != "compute",
        pad_skip_share=PAD_SKIP_SHARE if hparams["pad_tokens"] == "auto" else 0.0,
        scoring=hparams["estimator"],
        cache_dir=cache_dir(),
    )


def apply(model: torch.nn.Module, task: Task, hparams: Mapping[str, Any]) -> torch.nn.Module:
    sparsity = settings(model, hparams)  # refused before wrapping: a bad setting leaves no half-made model
    wrapped = lora.apply(model, task, hparams)
    wrapped.sparsity_controller = install(wrapped, sparsity)
    return wrapped


def controller(model: torch.nn.Module) -> SparsityController:
    """The controller `apply` installed on this model."""
    return model.sparsity_controller


def callbacks(model: torch.nn.Module, hparams: Mapping[str, Any]) -> list:
    from .callback import SparsitySchedule  # not at the top: see lora_methods/base.py

    return [SparsitySchedule(controller(model), hparams["dense_warmup"])]


def telemetry(model: torch.nn.Module) -> dict[str, float | None]:
    return controller(model).telemetry()


METHOD = FineTuningMethod(
    name="sparselora",
    title="SparseLoRA",
    summary="LoRA whose deep layers skip most frozen FFN channels for the context tokens each step, "
    "picked per batch by an SVD estimator: fewer FLOPs, faster steps.",
    hparams=(
        *(replace(h, default=0.0) if h.name == "dropout" else h for h in lora.METHOD.hparams),
        HParam(
            "ffn_sparsity",
            float,
            0.9,
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
            "estimator",
            str,
            "tokens",
            "what the estimator scores: an even sample of context tokens, or each sequence's mean "
            "context token (the reference code's)",
            choices=SCORINGS,
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
            DENSE_FIRST_LAYERS,
            "with layer_sparsity 'auto': the leading layers kept dense (the last layer is not sparse either: see "
            "last_layer)",
            minimum=0,
            maximum=1000,
        ),
        HParam(
            "layer_sparsity",
            str,
            "deep-half",
            "'deep-half' (the first half of the layers dense, the paper's), 'auto' (dense_first_layers "
            "dense), or one FFN sparsity per layer, comma-separated",
        ),
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
            "output tokens (generation: the labelled tokens' predictions; classification: the token the "
            "classifier reads) dense or sparse",
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
        HParam(
            "pad_tokens",
            str,
            "auto",
            "padding (nothing reads a pad position, so skipping it is exact): 'auto' skips it in sliced "
            "FFNs always and in dense FFNs and attention projections when it is at least 30% of the batch "
            "(below that their gather costs more than it saves); 'skip' everywhere; 'compute' runs it "
            "through the sliced FFN",
            choices=("auto", "skip", "compute"),
        ),
    ),
    apply=apply,
    callbacks=callbacks,
    telemetry=telemetry,
    check_model=settings,
    merges=True,  # sparsity lives only in training forwards: the saved adapter is a plain LoRA one
)
