"""A projection computed on some of its channels only: the frozen weight's kept rows or columns,
plus the layer's LoRA update (dense in its rank, sliced where it meets the kept channels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def base_weight(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The frozen weight as (out_features, in_features) and its bias, whatever wraps or stores it."""
    while hasattr(module, "base_layer"):  # PEFT adapter layers
        module = module.base_layer
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


def rows_forward(module: torch.nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The layer's output on the kept output channels only: x W[keep]^T + b[keep] (+ LoRA, dense)."""
    weight, bias = base_weight(module)
    out = F.linear(x, weight.index_select(0, keep), None if bias is None else bias.index_select(0, keep))
    for dropout, lora_a, lora_b, scaling in _lora_parts(module):
        out = out + F.linear(F.linear(dropout(x), lora_a), lora_b.index_select(0, keep)) * scaling
    return out


def columns_forward(module: torch.nn.Module, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The layer's output from the kept input channels only: h W[:, keep]^T + b (+ LoRA, dense)."""
    weight, bias = base_weight(module)
    out = F.linear(h, weight.index_select(1, keep), bias)
    for dropout, lora_a, lora_b, scaling in _lora_parts(module):
        out = out + F.linear(F.linear(dropout(h), lora_a.index_select(1, keep)), lora_b) * scaling
    return out


def output_columns(value_channels: torch.Tensor, head_dim: int, heads: int, kv_heads: int) -> torch.Tensor:
    """The output projection's input columns fed by the kept value channels. Query head h reads
    kv head h // (heads / kv_heads) (transformers' repeat_kv), so channel (g, d) of the values
    reaches column (h, d) of every head h in group g."""
    group = heads // kv_heads
    kv_head, dim = value_channels // head_dim, value_channels % head_dim
    query_heads = kv_head[:, None] * group + torch.arange(group, device=value_channels.device)
    return (query_heads * head_dim + dim[:, None]).flatten().sort().values
