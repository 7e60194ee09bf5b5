"""Where each supported architecture keeps its FFN and its value/output projections.

The FFN is `in-projection(s) -> elementwise activation -> out-projection`:
  llama       mlp.gate_proj, mlp.up_proj (gated: act(gate) * up) -> mlp.down_proj
  gpt2        mlp.c_fc (Conv1D) -> mlp.c_proj (Conv1D)
  distilbert  ffn.lin1 -> ffn.lin2
  bert        intermediate.dense -> output.dense (then residual + LayerNorm, per token)

GPT-2 fuses q, k and v in one `c_attn` and so has no attention layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..base import HParamError


@dataclass(frozen=True)
class FFNLayout:
    layers: str  # attribute path of the decoder/encoder layer list
    container: str  # the FFN's entry point inside a layer (a module, or a method for BERT)
    inputs: tuple[str, ...]  # input projections, relative to the layer (gated: gate first)
    output: str  # output projection, relative to the layer
    activation: str  # the activation applied to the input projection's output
    classifier_reads: str  # the position a sequence classifier reads: "first" ([CLS]) or "last" (non-pad)


FFN_LAYOUTS: dict[str, FFNLayout] = {
    "llama": FFNLayout("model.layers", "mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn", "last"),
    "gpt2": FFNLayout("transformer.h", "mlp", ("mlp.c_fc",), "mlp.c_proj", "mlp.act", "last"),
    "distilbert": FFNLayout(
        "distilbert.transformer.layer", "ffn", ("ffn.lin1",), "ffn.lin2", "ffn.activation", "first"
    ),
    "bert": FFNLayout(
        "bert.encoder.layer",
        "feed_forward_chunk",
        ("intermediate.dense",),
        "output.dense",
        "intermediate.intermediate_act_fn",
        "first",
    ),
}


# Every projection of a layer's attention. At a pad position a query's output is read by nothing
# and a key or value by nothing either (the mask hides it), so padding skips them all, exactly.
ATTENTION_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "llama": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
    "distilbert": ("attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"),
    "bert": ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"),
    "gpt2": ("attn.c_attn", "attn.c_proj"),
}


ATTENTION_LAYOUTS: dict[str, tuple[str, str]] = {  # (value projection, output projection) in a layer
    "llama": ("self_attn.v_proj", "self_attn.o_proj"),
    "distilbert": ("attention.v_lin", "attention.out_lin"),
    "bert": ("attention.self.value", "attention.output.dense"),
}


def ffn_layout(model_type: str) -> FFNLayout:
    """The FFN layout of an architecture; HParamError naming the supported ones if it has none."""
    layout = FFN_LAYOUTS.get(model_type)
    if layout is None:
        raise HParamError(f"SparseLoRA supports {', '.join(FFN_LAYOUTS)} models, not {model_type!r}")
    return layout


def attention_layout(model_type: str) -> tuple[str, str]:
    """(value, output) projection paths; HParamError where attention sparsity is not available."""
    if model_type not in ATTENTION_LAYOUTS:
        raise HParamError(
            f"attention_sparsity must be 0 for {model_type!r} models "
            f"(value/output slicing supports {', '.join(ATTENTION_LAYOUTS)})"
        )
    return ATTENTION_LAYOUTS[model_type]


def resolve(root: Any, path: str) -> Any:
    """The attribute at a dotted `path` below `root` (a module, or a method for BERT's FFN)."""
    for part in path.split("."):
        root = getattr(root, part)
    return root


def layer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer layers of a transformers model whose architecture has an FFN layout."""
    return list(resolve(model, ffn_layout(model.config.model_type).layers))


def attention_heads(config: Any) -> tuple[int, int, int]:
    """(head_dim, query heads, key/value heads) of an attention layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return head_dim, heads, kv_heads
