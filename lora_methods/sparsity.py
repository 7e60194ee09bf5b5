"""Contextual FFN channel sparsity for SparseLoRA (Khaki et al., ICML 2025), by slicing.

Per training step and per sparse layer, a rank-r SVD estimator of the frozen input projection
predicts which intermediate channels matter for this batch; the FFN then runs as smaller dense
products: the kept rows of the input projection(s) (and bias) and the kept columns of the output
projection. Nothing is computed dense and masked. One index set per layer per step, shared by all
tokens of the batch, keeps the products dense.

The module tree is not changed (forwards are patched on the instances), so state dicts and saved
PEFT adapters are exactly LoRA's. In eval mode, and during the dense warm-up, every forward is the
original one.

Architectures: the FFN is `in-projection(s) -> elementwise activation -> out-projection`:
  llama       mlp.gate_proj, mlp.up_proj (gated: act(gate) * up) -> mlp.down_proj
  gpt2        mlp.c_fc (Conv1D) -> mlp.c_proj (Conv1D)
  distilbert  ffn.lin1 -> ffn.lin2
  bert        intermediate.dense -> output.dense (then residual + LayerNorm, per token)

The last layer (with output tokens routed dense): its FFN runs for the output tokens only. What
the last layer computes at a context position is read by nothing (a classifier reads [CLS], a
causal LM's loss ignores the prompt's predictions), so skipping it there is exact: the loss and the
gradients are the dense FFN's. This is the context/output split taken to its limit where it costs
nothing; any method could skip that work, and the benchmark can time SparseLoRA without it
(`last_layer=all`) to tell the two savings apart.

Attention (optional, `attention_sparsity`): value channels are scored by the norm of the value
the estimator predicts (per channel, not per head), the value projection computes only the kept
rows and the output projection only the matching input columns. With grouped-query attention a
value channel (kv head g, dimension d) feeds every query head of group g, so the output keeps
column (h, d) for each of them. Query and key stay dense: rotary embeddings pair their channels
and, on these models, q/k are a small share of a step. GPT-2 fuses q, k and v in one `c_attn`
and has no attention sparsity here.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class FFNLayout:
    layers: str  # attribute path of the decoder/encoder layer list
    container: str  # the FFN's entry point inside a layer (a module, or a method for BERT)
    inputs: tuple[str, ...]  # input projections, relative to the layer (gated: gate first)
    output: str  # output projection, relative to the layer
    activation: str  # the activation applied to the input projection's output


FFN_LAYOUTS: dict[str, FFNLayout] = {
    "llama": FFNLayout("model.layers", "mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", "mlp.act_fn"),
    "gpt2": FFNLayout("transformer.h", "mlp", ("mlp.c_fc",), "mlp.c_proj", "mlp.act"),
    "distilbert": FFNLayout("distilbert.transformer.layer", "ffn", ("ffn.lin1",), "ffn.lin2", "ffn.activation"),
    "bert": FFNLayout(
        "bert.encoder.layer",
        "feed_forward_chunk",
        ("intermediate.dense",),
        "output.dense",
        "intermediate.intermediate_act_fn",
    ),
}


ATTENTION_LAYOUTS: dict[str, tuple[str, str]] = {  # (value projection, output projection) in a layer
    "llama": ("self_attn.v_proj", "self_attn.o_proj"),
    "distilbert": ("attention.v_lin", "attention.out_lin"),
    "bert": ("attention.self.value", "attention.output.dense"),
}


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


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W^T ~ A B with A (in x r) and B (r x out): x A B predicts x W^T cheaply. A rank that is not
    below the input width gains nothing from factoring: then A is W^T itself and B is None."""
    if rank >= min(weight.shape):
        return weight.t().float().contiguous(), None
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)  # weight: (out, in)
    return (vh[:rank].t() * s[:rank]).contiguous(), u[:, :rank].t().contiguous()


def estimator_factors(modules: list[torch.nn.Module], rank: int) -> list:
    """(A, B, bias) of the rank-`rank` estimator of each projection in `modules`."""
    return [(*svd_factors(base_weight(m)[0], rank), base_weight(m)[1]) for m in modules]


def _estimate(context: torch.Tensor, sample_tokens: int, estimators: list) -> list[torch.Tensor]:
    """Each estimator's predicted projection, x A B + bias, of an evenly spaced sample of at most
    `sample_tokens` context tokens."""
    tokens = context.reshape(-1, context.shape[-1])
    if tokens.shape[0] > sample_tokens:
        tokens = tokens[:: math.ceil(tokens.shape[0] / sample_tokens)]
    tokens = tokens.float()
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
    estimator: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]  # (A, B, bias) per input
    keep: torch.Tensor | None = None  # set while a sparse forward runs

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

    def choose(self, context: torch.Tensor, sample_tokens: int) -> torch.Tensor:
        """Top-k channels by the L2 norm, over an evenly spaced sample of the context tokens, of
        the activation the rank-r estimator predicts for each token.

        The paper scores each sample's mean input; on the GELU FFN of MiniLM that statistic found
        only ~29% of the true top channels even with the exact weight, while per-token estimates
        find most of them, so tokens are scored, on a sample that keeps the cost a few percent.
        """
        scores = self._activation_scores(_estimate(context, sample_tokens, self.estimator)).norm(dim=0)
        return scores.topk(self.kept).indices.sort().values

    def _activations(self, context: torch.Tensor) -> torch.Tensor:
        return self._activation_scores([F.linear(context, *base_weight(module)) for module in self.inputs])

    @torch.no_grad()
    def oracle(self, context: torch.Tensor) -> torch.Tensor:
        """Top-k channels by the true activations of every context token: what the estimator aims at."""
        scores = self._activations(context).flatten(0, -2).float().norm(dim=0)
        return scores.topk(self.kept).indices

    @torch.no_grad()
    def output_error(self, context: torch.Tensor, keep: torch.Tensor) -> float:
        """Mean over tokens of |FFN(x) on `keep` - FFN(x)| / |FFN(x)| (output bias aside): how much
        of each token's FFN output the kept channels lose."""
        activations = self._activations(context).flatten(0, -2).float()
        weight = base_weight(self.output)[0].float()
        full = activations @ weight.t()
        kept = activations[:, keep] @ weight[:, keep].t()
        return float(((kept - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean())


def output_columns(value_channels: torch.Tensor, head_dim: int, heads: int, kv_heads: int) -> torch.Tensor:
    """The output projection's input columns fed by the kept value channels. Query head h reads
    kv head h // (heads / kv_heads) (transformers' repeat_kv), so channel (g, d) of the values
    reaches column (h, d) of every head h in group g."""
    group = heads // kv_heads
    kv_head, dim = value_channels // head_dim, value_channels % head_dim
    query_heads = kv_head[:, None] * group + torch.arange(group, device=value_channels.device)
    return (query_heads * head_dim + dim[:, None]).flatten().sort().values


@dataclass
class SparseAttention:
    """One attention block's sliced value/output projections and the channels of this step."""

    index: int
    sparsity: float
    value: torch.nn.Module
    output: torch.nn.Module
    estimator: tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # (A, B, bias) of the value
    head_dim: int
    heads: int
    kv_heads: int
    columns: torch.Tensor | None = None  # output-projection columns of this forward (set by the value)

    @property
    def width(self) -> int:
        a, b, _ = self.estimator
        return (a if b is None else b).shape[1]

    @property
    def kept(self) -> int:
        return max(1, round(self.width * (1.0 - self.sparsity)))

    def choose(self, context: torch.Tensor, sample_tokens: int) -> torch.Tensor:
        """Top-k value channels by the norm of the predicted value over a sample of context tokens."""
        (value,) = _estimate(context, sample_tokens, [self.estimator])
        return value.norm(dim=0).topk(self.kept).indices.sort().values


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


def resolve(root: torch.nn.Module, path: str):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _split(controller: SparsityController, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(context, outputs): the batch's flattened tokens that run sparse and those that run dense.

    Per row, its context runs sparse and its output positions dense: one gather with indices made
    once per batch (no boolean masks), so rows keep their own context length, not the batch's
    shortest. Without routing every token is context."""
    if controller.order is None:
        return tokens, None
    tokens = tokens.index_select(0, controller.order)
    return tokens[: controller.sparse_count], tokens[controller.sparse_count :]


def _join(controller: SparsityController, sparse: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    """The two blocks back in the batch's token order."""
    if controller.order is None:
        return sparse
    parts = [sparse, dense] if dense is not None and dense.shape[0] else [sparse]
    return torch.cat(parts).index_select(0, controller.restore)


def _runs_sparse(controller: SparsityController, module: torch.nn.Module) -> bool:
    return (
        controller.active
        and torch.is_grad_enabled()
        and module.training
        and not (controller.order is not None and controller.sparse_count == 0)
    )


def _sparse_container_forward(controller: SparsityController, layer: SparseLayer, original: Callable):
    controller_ref, layer_ref = weakref.ref(controller), weakref.ref(layer)  # see _patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one input: BERT's chunking checks the arity
        controller, layer = controller_ref(), layer_ref()
        if not _runs_sparse(controller, self):
            return original(self, x)
        context, outputs = _split(controller, x.reshape(-1, x.shape[-1]))
        layer.keep = layer.choose(context.detach(), controller.sample_tokens)
        if len(controller.recalls) < controller.recall_batches * len(controller.layers):
            oracle = layer.oracle(context.detach())
            controller.recalls.append(float(torch.isin(layer.keep, oracle).float().mean()))
        try:
            sparse = original(self, context.unsqueeze(0)).squeeze(0)
        finally:
            layer.keep = None
        controller.account_saving(layer, context.shape[0], min(context.shape[0], controller.sample_tokens))
        dense = original(self, outputs.unsqueeze(0)).squeeze(0) if outputs is not None and outputs.shape[0] else None
        return _join(controller, sparse, dense).reshape(x.shape)

    return forward


def _outputs_only_forward(controller: SparsityController, width: int, projections: int, original: Callable):
    """The last layer's FFN for the output tokens alone. Nothing reads what the last layer computes
    at a context position (the classifier reads [CLS]; a causal LM's loss ignores the prompt's
    predictions), so those positions skip the FFN and zeros stand in: the loss and every gradient
    are the ones the dense FFN gives."""

    controller_ref = weakref.ref(controller)  # see _patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        controller = controller_ref()
        if not _runs_sparse(controller, self) or controller.order is None:
            return original(self, x)
        context, outputs = _split(controller, x.reshape(-1, x.shape[-1]))
        dense = original(self, outputs.unsqueeze(0)).squeeze(0) if outputs.shape[0] else None
        controller.account_skipped(context.shape[0], x.shape[-1], width, projections)
        return _join(controller, context.new_zeros(context.shape), dense).reshape(x.shape)

    return forward


def _sparse_value_forward(controller: SparsityController, attention: SparseAttention, original: Callable):
    """The value projection on the kept channels for context tokens, written into a zero tensor of
    the full width (the attention kernels need whole heads; for context rows the output projection
    reads only the kept columns). Output tokens compute their own values and output projection
    dense, but what they gather from context positions in the skipped channels is zero: like the
    sparse FFN, context sparsity changes what the output tokens attend to."""

    controller_ref, attention_ref = weakref.ref(controller), weakref.ref(attention)  # see _patch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        controller, attention = controller_ref(), attention_ref()
        attention.columns = None
        if not _runs_sparse(controller, self):
            return original(self, x, *args, **kwargs)
        context, outputs = _split(controller, x.reshape(-1, x.shape[-1]))
        keep = attention.choose(context.detach(), controller.sample_tokens)
        attention.columns = output_columns(keep, attention.head_dim, attention.heads, attention.kv_heads)
        kept_values = rows_forward(self, context, keep)
        sparse = kept_values.new_zeros(context.shape[0], attention.width).index_copy(1, keep, kept_values)
        dense = original(self, outputs, *args, **kwargs) if outputs is not None and outputs.shape[0] else None
        controller.account_attention_saving(
            attention, context.shape[0], min(context.shape[0], controller.sample_tokens)
        )
        return _join(controller, sparse, dense).reshape(*x.shape[:-1], attention.width)

    return forward


def _sparse_output_forward(controller: SparsityController, attention: SparseAttention, original: Callable):
    controller_ref, attention_ref = weakref.ref(controller), weakref.ref(attention)  # see _patch

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        controller, attention = controller_ref(), attention_ref()
        columns, attention.columns = attention.columns, None
        if columns is None:
            return original(self, h, *args, **kwargs)
        context, outputs = _split(controller, h.reshape(-1, h.shape[-1]))
        sparse = columns_forward(self, context.index_select(1, columns), columns)
        dense = original(self, outputs, *args, **kwargs) if outputs is not None and outputs.shape[0] else None
        return _join(controller, sparse, dense).reshape(*h.shape[:-1], sparse.shape[-1])

    return forward


def _sliced_projection(layer: SparseLayer, original: Callable, rows: bool):
    layer_ref = weakref.ref(layer)  # see _patch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        keep = layer_ref().keep
        if keep is None:
            return original(self, x, *args, **kwargs)
        return rows_forward(self, x, keep) if rows else columns_forward(self, x, keep)

    return forward


def _patch(owner: torch.nn.Module, name: str, make_forward: Callable[[Callable], Callable]) -> None:
    """Replace the method `name` of this one `owner` by `make_forward(the class's method)`.

    Nothing the replacement holds leads back to the model: it reaches the owner, the controller
    and the layer through weak references. A method bound to its own instance, or a closure over
    the controller (whose layers hold the patched modules), would be a reference cycle, and a
    patched model would stay in memory until the cyclic garbage collector ran."""
    forward = make_forward(getattr(type(owner), name))
    owner_ref = weakref.ref(owner)

    def call(*args, **kwargs):
        return forward(owner_ref(), *args, **kwargs)

    signature = inspect.signature(forward)  # without `self`, as a bound method's (BERT's chunking counts them)
    call.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    setattr(owner, name, call)


def _layer_weights_key(model: torch.nn.Module, layers: list, layout: FFNLayout, rank: int) -> str:
    first = base_weight(resolve(layers[0], layout.inputs[0]))[0]
    fingerprint = f"{model.config.name_or_path}|{layout}|{len(layers)}|{tuple(first.shape)}|{float(first.sum()):.8e}"
    return hashlib.sha1(fingerprint.encode()).hexdigest()[:16] + f"-r{rank}"


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


def _heads(config) -> tuple[int, int, int]:
    """(head_dim, query heads, key/value heads) of an attention layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return head_dim, heads, kv_heads


def install(
    model: torch.nn.Module,
    sparsity_per_layer: list[float],
    estimator_rank: int,
    sample_tokens: int,
    dense_outputs: bool,
    cache_dir: Path,
    attention_per_layer: list[float] | None = None,
    outputs_only_last: bool = False,
) -> SparsityController:
    """Patch the FFNs (and, where `attention_per_layer` says so, the value/output projections) of
    `model` (a transformers model, before or after PEFT wrapping) for sparsity; layers whose ratio
    is 0 stay untouched. With `outputs_only_last` (and `dense_outputs`), the last layer's FFN runs
    for the output tokens only, whatever its ratio. SVD factors are cached in `cache_dir`."""
    transformers_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = transformers_model.config.model_type
    layout = FFN_LAYOUTS.get(model_type)
    if layout is None:
        raise ValueError(
            f"SparseLoRA has no FFN layout for architecture {model_type!r}; supported: {', '.join(FFN_LAYOUTS)}"
        )
    blocks = list(resolve(transformers_model, layout.layers))
    attention_per_layer = attention_per_layer or [0.0] * len(blocks)
    if len(sparsity_per_layer) != len(blocks) or len(attention_per_layer) != len(blocks):
        raise ValueError(f"{len(sparsity_per_layer)} sparsity ratios for {len(blocks)} layers")
    if any(attention_per_layer) and model_type not in ATTENTION_LAYOUTS:
        raise ValueError(
            f"attention sparsity is not available for {model_type!r} (supported: {', '.join(ATTENTION_LAYOUTS)})"
        )

    linear_flops = sum(
        base_weight(m)[0].numel()
        for m in transformers_model.modules()
        if type(m).__name__ in ("Linear", "Linear4bit", "Conv1D") and not hasattr(m, "base_layer")
    )
    controller = SparsityController([], linear_flops, sample_tokens=sample_tokens)
    cache_file = cache_dir / "svd" / f"{_layer_weights_key(transformers_model, blocks, layout, estimator_rank)}.pt"
    cached = torch.load(cache_file) if cache_file.exists() else {}
    cached_before = len(cached)

    def factors(key, modules: list[torch.nn.Module]) -> list:
        if key not in cached:  # once per model and rank, never inside the training loop
            cached[key] = estimator_factors(modules, estimator_rank)
        return [(a, b, None if bias is None else bias.float()) for a, b, bias in cached[key]]

    def patch_container(block: torch.nn.Module, make_forward: Callable[[Callable], Callable]) -> None:
        container = resolve(block, layout.container)
        if isinstance(container, torch.nn.Module):
            _patch(container, "forward", make_forward)
        else:  # BERT's feed_forward_chunk is a method of the layer
            _patch(block, layout.container, make_forward)

    if outputs_only_last and dense_outputs:
        width = base_weight(resolve(blocks[-1], layout.inputs[0]))[0].shape[0]
        patch_container(
            blocks[-1],
            lambda original: _outputs_only_forward(controller, width, len(layout.inputs) + 1, original),
        )
        sparsity_per_layer = [*sparsity_per_layer[:-1], 0.0]
        controller.outputs_only_layer = len(blocks) - 1

    for index, (block, ratio, attention_ratio) in enumerate(zip(blocks, sparsity_per_layer, attention_per_layer)):
        if attention_ratio > 0:
            value, output = (resolve(block, path) for path in ATTENTION_LAYOUTS[model_type])
            attention = SparseAttention(
                index,
                attention_ratio,
                value,
                output,
                factors(("value", index), [value])[0],
                *_heads(transformers_model.config),
            )
            controller.attention.append(attention)
            _patch(value, "forward", lambda original: _sparse_value_forward(controller, attention, original))
            _patch(output, "forward", lambda original: _sparse_output_forward(controller, attention, original))
        if ratio <= 0:
            continue
        inputs = [resolve(block, path) for path in layout.inputs]
        layer = SparseLayer(
            index,
            ratio,
            inputs,
            resolve(block, layout.output),
            resolve(block, layout.activation),
            factors(index, inputs),
        )
        controller.layers.append(layer)
        for module in inputs:
            _patch(module, "forward", lambda original: _sliced_projection(layer, original, rows=True))
        _patch(layer.output, "forward", lambda original: _sliced_projection(layer, original, rows=False))
        patch_container(block, lambda original: _sparse_container_forward(controller, layer, original))
    if len(cached) != cached_before:  # written whole, then renamed: a reader never sees half a file
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(f".{os.getpid()}.partial")
        torch.save(cached, partial)
        os.replace(partial, cache_file)

    def before_forward(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        dense = dense_positions(kwargs.get("labels"), input_ids.shape) if dense_outputs else None
        if dense is None:
            controller.order = controller.restore = None
        else:
            controller.order, controller.restore, controller.sparse_count = routing(dense)
        controller.account_forward(input_ids.numel())

    transformers_model.register_forward_pre_hook(before_forward, with_kwargs=True)
    return controller
