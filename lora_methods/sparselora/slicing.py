"""A projection computed on some of its channels only: the frozen weight's kept rows or columns,
plus the layer's LoRA update (dense in its rank, sliced where it meets the kept channels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def base_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen weight as (out_features, in_features) and its bias, whatever wraps or stores it."""
    module = frozen_layer(module)
    weight = module.weight
    if type(module).__name__ == "Linear4bit":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
    elif type(module).__name__ == "Conv1D":  # GPT-2 stores (in, out)
        weight = weight.t()
    return weight.detach(), None if module.bias is None else module.bias.detach()


def _lora_parts(module: torch.nn.Module) -> list[tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]]:
    """(dropout, A, B, scaling) for each active LoRA adapter on this layer; empty for a plain layer."""
    if not hasattr(module, "lora_A") or getattr(module, "disable_adapters", False) or getattr(module, "merged", False):
        return []
    return [
        (module.lora_dropout[name], module.lora_A[name].weight, module.lora_B[name].weight, module.scaling[name])
        for name in module.active_adapters
        if name in module.lora_A
    ]


def frozen_layer(module: torch.nn.Module) -> torch.nn.Module:
    """The plain (or 4-bit) layer under any PEFT adapter wrapping."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def forward_weight(
    weights: dict[int, tuple[torch.Tensor, torch.Tensor | None]], module: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """base_weight for a training forward: a 4-bit weight is dequantized once per forward, in the
    dtype its layer computes in, and kept in `weights` (which the router empties before each
    forward) for every other slice of it; a stored weight is returned as it is."""
    layer = frozen_layer(module)
    if type(layer).__name__ != "Linear4bit":
        return base_weight(module)
    if id(layer) not in weights:
        weight, bias = base_weight(layer)
        dtype = layer.compute_dtype or weight.dtype
        weights[id(layer)] = (weight.to(dtype), None if bias is None else bias.to(dtype))
    return weights[id(layer)]


def _with_lora(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, rows=None, columns=None) -> torch.Tensor:
    """`out` plus the layer's LoRA update (dense in its rank), sliced to the kept output `rows` or
    read from the kept input `columns`."""
    for dropout, lora_a, lora_b, scaling in _lora_parts(module):
        a = lora_a if columns is None else lora_a.index_select(1, columns)
        b = lora_b if rows is None else lora_b.index_select(0, rows)
        out = out + F.linear(F.linear(dropout(x), a), b) * scaling
    return out


def full_forward(
    module: torch.nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The layer's whole output from a given (dequantized) weight: x W^T + b (+ LoRA)."""
    return _with_lora(module, x, F.linear(x, weight, bias))


def rows_forward(
    module: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The layer's output on the kept output channels only: x W[keep]^T + b[keep] (+ LoRA, dense)."""
    out = F.linear(x, weight.index_select(0, keep), None if bias is None else bias.index_select(0, keep))
    return _with_lora(module, x, out, rows=keep)


def columns_forward(
    module: torch.nn.Module, h: torch.Tensor, keep: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """The layer's output from the kept input channels only: h W[:, keep]^T + b (+ LoRA, dense)."""
    return _with_lora(module, h, F.linear(h, weight.index_select(1, keep), bias), columns=keep)


def output_columns(value_channels: torch.Tensor, head_dim: int, heads: int, kv_heads: int) -> torch.Tensor:
    """The output projection's input columns fed by the kept value channels. Query head h reads
    kv head h // (heads / kv_heads) (transformers' repeat_kv), so channel (g, d) of the values
    reaches column (h, d) of every head h in group g."""
    group = heads // kv_heads
    kv_head, dim = value_channels // head_dim, value_channels % head_dim
    query_heads = kv_head[:, None] * group + torch.arange(group, device=value_channels.device)
    return (query_heads * head_dim + dim[:, None]).flatten().sort().values
