"""Installing SparseLoRA's sliced forwards on a model, as its settings say."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .controller import SparsityController, output_positions, routing
from .estimator import FactorCache, FFNShape, SparseAttention, SparseLayer
from .forwards import (
    exact_forward,
    patch,
    sliced_projection,
    sparse_container_forward,
    sparse_output_forward,
    sparse_value_forward,
)
from .layouts import (
    ATTENTION_PROJECTIONS,
    FFNLayout,
    attention_heads,
    attention_layout,
    ffn_layout,
    layer_blocks,
    resolve,
)
from .slicing import base_weight, frozen_layer

if TYPE_CHECKING:
    from transformers import PretrainedConfig


@dataclass(frozen=True)
class SparsitySettings:
    """What `install` makes sparse, one ratio per transformer layer (0: that layer stays dense)."""

    ffn: tuple[float, ...]  # share of FFN channels skipped
    attention: tuple[float, ...]  # share of value channels (and output-projection columns) skipped
    estimator_rank: int  # rank of the SVD estimator that picks the channels
    sample_tokens: int  # context tokens the estimator scores per step
    dense_outputs: bool  # output tokens (labelled, or [CLS]) run dense; only the context is sparse
    outputs_only_last: bool  # the last layer's FFN runs for the output tokens only (with dense_outputs)
    skip_padding: bool  # padding skips every FFN (exact); else it runs the sliced FFN, unsampled
    pad_skip_share: float  # in dense layers, padding skips only when at least this share of a batch
    scoring: str  # how the estimator scores channels: one of estimator.SCORINGS
    cache_dir: Path  # where the estimator's SVD factors are kept between runs


def install(model: torch.nn.Module, settings: SparsitySettings) -> SparsityController:
    """Patch the FFNs and value/output projections of `model` (a transformers model, before or
    after PEFT wrapping) as `settings` say and return the controller they share."""
    transformers_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = transformers_model.config.model_type
    layout = ffn_layout(model_type)
    blocks = layer_blocks(transformers_model)
    if len(settings.ffn) != len(blocks) or len(settings.attention) != len(blocks):
        raise ValueError(f"{len(settings.ffn)} sparsity ratios for {len(blocks)} layers")
    if any(settings.attention):
        attention_layout(model_type)

    per_token = sum(_linear_flops(block) for block in blocks)
    controller = SparsityController(
        [],
        per_token,
        _linear_flops(transformers_model) - per_token,  # the head: an LM head, or a pooler and classifier
        sample_tokens=settings.sample_tokens,
        pad_skip_share=settings.pad_skip_share,
    )
    cache = FactorCache(settings.cache_dir, transformers_model, blocks, layout, settings.estimator_rank)
    outputs_only_last = settings.outputs_only_last and settings.dense_outputs
    for index, (block, ratio, attention_ratio) in enumerate(zip(blocks, settings.ffn, settings.attention)):
        if attention_ratio > 0:
            _sparsify_attention(
                controller, cache, block, index, attention_ratio, transformers_model.config, settings.scoring
            )
        if outputs_only_last and index == len(blocks) - 1:
            _patch_exact_ffn(controller, block, layout, outputs_only=True)
            controller.outputs_only_layer = index
        elif ratio > 0:
            _sparsify_ffn(controller, cache, block, layout, index, ratio, settings.scoring)
        elif settings.skip_padding:
            _patch_exact_ffn(controller, block, layout, outputs_only=False)
        if settings.skip_padding:
            sliced = attention_layout(model_type) if attention_ratio > 0 else ()  # these route padding already
            _skip_padding_in_attention(
                controller, block, [p for p in ATTENTION_PROJECTIONS[model_type] if p not in sliced]
            )
    cache.save()
    reads = layout.classifier_reads
    causal_lm = transformers_model.get_output_embeddings() is not None
    router = _router(
        controller, settings.dense_outputs, settings.skip_padding, reads, causal_lm, transformers_model.config
    )
    transformers_model.register_forward_pre_hook(router, with_kwargs=True)
    return controller


def _linear_flops(module: torch.nn.Module) -> int:
    """Multiply-adds per token of every Linear/Conv1D in `module`, dense: a PEFT-wrapped layer
    counts its frozen weight, not its adapter's, and a trained copy (PEFT's modules_to_save)
    counts once: it runs instead of the original."""
    if hasattr(module, "original_module"):
        return _linear_flops(module.original_module)
    if hasattr(module, "base_layer") or type(module).__name__ in ("Linear", "Linear4bit", "Conv1D"):
        layer = frozen_layer(module)
        if type(layer).__name__ == "Linear4bit":  # its weight is stored packed
            return layer.in_features * layer.out_features
        return layer.weight.numel()
    return sum(_linear_flops(child) for child in module.children())


def _head_positions(logits_to_keep: int | torch.Tensor, shape: torch.Size, causal_lm: bool, reads: str) -> int:
    """How many of a (rows, positions) batch's positions the head runs at: an LM head where
    `logits_to_keep` asks for logits (as transformers reads it: 0 every position, n the last n, 1-D
    indices those columns of every row, a 2-D mask its True positions, 2-D indices each row's),
    an encoder's pooler and classifier at each row's first token, a decoder classifier's score at
    every position (transformers scores them all, then reads one)."""
    rows, positions = shape
    if not causal_lm:
        return rows if reads == "first" else rows * positions
    if isinstance(logits_to_keep, torch.Tensor):
        kept = int(logits_to_keep.sum()) if logits_to_keep.dtype == torch.bool else logits_to_keep.numel()
        return kept if logits_to_keep.dim() == 2 else rows * kept
    return rows * min(logits_to_keep or positions, positions)


def _patch_ffn_entry(block: torch.nn.Module, layout: FFNLayout, make_forward: Callable[[Callable], Callable]) -> None:
    container = resolve(block, layout.container)
    if isinstance(container, torch.nn.Module):
        patch(container, "forward", make_forward)
    else:  # BERT's feed_forward_chunk is a method of the layer
        patch(block, layout.container, make_forward)


def _ffn_shape(block: torch.nn.Module, layout: FFNLayout) -> FFNShape:
    width, d = base_weight(resolve(block, layout.inputs[0]))[0].shape
    return d, width, len(layout.inputs) + 1


def _patch_exact_ffn(
    controller: SparsityController, block: torch.nn.Module, layout: FFNLayout, outputs_only: bool
) -> None:
    shape = _ffn_shape(block, layout)
    _patch_ffn_entry(block, layout, lambda original: exact_forward(controller, shape, outputs_only, original))


def _skip_padding_in_attention(controller: SparsityController, block: torch.nn.Module, paths: list[str]) -> None:
    for path in paths:
        module = resolve(block, path)
        out_features, in_features = base_weight(module)[0].shape
        shape = (in_features, out_features, 1)  # one matrix, as FFNShape counts them
        patch(module, "forward", lambda original, shape=shape: exact_forward(controller, shape, False, original))


def _sparsify_attention(
    controller: SparsityController,
    cache: FactorCache,
    block: torch.nn.Module,
    index: int,
    ratio: float,
    config: PretrainedConfig,
    scoring: str,
) -> None:
    value_path, output_path = attention_layout(config.model_type)
    value, output = resolve(block, value_path), resolve(block, output_path)
    estimator = cache.get(("value", index), [value])[0]
    attention = SparseAttention(index, ratio, value, output, estimator, *attention_heads(config), scoring)
    controller.attention.append(attention)
    patch(value, "forward", lambda original: sparse_value_forward(controller, attention, original))
    patch(output, "forward", lambda original: sparse_output_forward(controller, attention, original))


def _sparsify_ffn(
    controller: SparsityController,
    cache: FactorCache,
    block: torch.nn.Module,
    layout: FFNLayout,
    index: int,
    ratio: float,
    scoring: str,
) -> None:
    inputs = [resolve(block, path) for path in layout.inputs]
    output, activation = resolve(block, layout.output), resolve(block, layout.activation)
    layer = SparseLayer(index, ratio, inputs, output, activation, cache.get(index, inputs), scoring)
    controller.layers.append(layer)
    for module in layer.inputs:
        patch(module, "forward", lambda original: sliced_projection(controller, layer, original, rows=True))
    patch(layer.output, "forward", lambda original: sliced_projection(controller, layer, original, rows=False))
    _patch_ffn_entry(block, layout, lambda original: sparse_container_forward(controller, layer, original))


def _router(
    controller: SparsityController,
    dense_outputs: bool,
    skip_padding: bool,
    classifier_reads: str,
    causal_lm: bool,
    config: PretrainedConfig,
) -> Callable[[torch.nn.Module, tuple, dict], None]:
    """The hook that, before each training forward, sorts the batch's tokens into context,
    outputs and padding, and counts the step's dense FLOPs (the head's where it runs)."""

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        controller.weights.clear()
        if not (module.training and torch.is_grad_enabled()):
            controller.routing = None
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        attention_mask = kwargs.get("attention_mask")
        outputs = (
            output_positions(kwargs.get("labels"), input_ids, classifier_reads, config.pad_token_id)
            if dense_outputs
            else None
        )
        padding = None if attention_mask is None else attention_mask == 0
        controller.routing = routing(outputs, padding, skip_padding, input_ids.shape)
        head_positions = _head_positions(kwargs.get("logits_to_keep", 0), input_ids.shape, causal_lm, classifier_reads)
        controller.account_forward(input_ids.numel(), head_positions)

    return before_forward
