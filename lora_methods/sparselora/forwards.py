"""The patched forwards: each replaces one module's forward (or BERT's FFN method) on its instance,
so the module tree, state dicts and saved adapters stay LoRA's. In eval mode, and during the dense
warm-up, every forward is the original one.

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
and, on these models, q/k are a small share of a step.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch

from .controller import SparsityController
from .estimator import ALL_CHANNELS, FFNShape, SparseAttention, SparseLayer
from .slicing import columns_forward, forward_weight, full_forward, output_columns, rows_forward


def _split(controller: SparsityController, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sparse, dense): the batch's flattened tokens that run the sliced FFN (context first, so
    `routing.sampled` of them are the estimator's to sample) and those that run dense (outputs).

    One gather with indices made once per batch (no boolean masks), so rows keep their own context
    length, not the batch's shortest. Skipped padding is in neither."""
    routing = controller.routing
    tokens = tokens.index_select(0, routing.order[: routing.sparse + routing.dense])
    return tokens[: routing.sparse], tokens[routing.sparse :]


def _join(controller: SparsityController, sparse: torch.Tensor, dense: torch.Tensor | None) -> torch.Tensor:
    """The two blocks back in the batch's token order, zeros at skipped padding."""
    parts = torch.cat([sparse, dense]) if dense is not None and dense.shape[0] else sparse
    positions = controller.routing.order[: parts.shape[0]]
    return parts.new_zeros(controller.routing.order.numel(), parts.shape[1]).index_copy(0, positions, parts)


def _training(controller: SparsityController, module: torch.nn.Module) -> bool:
    """A training forward that the router has routed (evaluation is never routed: it runs dense)."""
    return controller.routing is not None and torch.is_grad_enabled() and module.training


def _runs_sparse(controller: SparsityController, module: torch.nn.Module) -> bool:
    return controller.active and _training(controller, module) and controller.routing.sparse > 0


def _exact_forward(
    controller: SparsityController,
    shape: FFNShape,
    module: torch.nn.Module,
    x: torch.Tensor,
    original: Callable,
    outputs_only: bool,
) -> torch.Tensor:
    """The dense FFN for the tokens something reads, zeros for the rest: the output tokens alone
    (`outputs_only`, the last layer) or every token but skipped padding (when the batch has enough
    of it: `pad_skip_share`). Exact: no loss reads what an FFN computes at a pad position, nor what
    the last layer computes at a context position."""
    routing = controller.routing
    first = routing.sparse if outputs_only else 0
    positions = routing.order[first : routing.sparse + routing.dense]
    if positions.numel() in (0, routing.order.numel()):  # nothing to skip, or nothing read at all
        return original(module, x)
    if not outputs_only and routing.skipped < controller.pad_skip_share * routing.order.numel():
        return original(module, x)  # too little padding to pay for the gather (exact either way)
    flat = x.reshape(-1, x.shape[-1])
    controller.account_skipped(flat.shape[0] - positions.numel(), shape)
    computed = original(module, flat.index_select(0, positions).unsqueeze(0)).squeeze(0)
    # the output's own dtype: under autocast a projection's output is not its (fp32) input's
    filled = computed.new_zeros(flat.shape[0], computed.shape[-1]).index_copy(0, positions, computed)
    return filled.reshape(*x.shape[:-1], computed.shape[-1])


def sparse_container_forward(controller: SparsityController, layer: SparseLayer, original: Callable) -> Callable:
    controller_ref, layer_ref = weakref.ref(controller), weakref.ref(layer)  # see patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # one input: BERT's chunking checks the arity
        controller, layer = controller_ref(), layer_ref()
        if not _training(controller, self):
            return original(self, x)
        if not _runs_sparse(controller, self):  # dense warm-up: a dense layer's padding rule (exact)
            return _exact_forward(controller, layer.shape, self, x, original, outputs_only=False)
        routing = controller.routing
        sparse, dense = _split(controller, x.reshape(-1, x.shape[-1]))
        context = sparse[: routing.sampled].detach()
        layer.keep = layer.choose(context, controller.sample_tokens, routing.rows)
        if len(controller.recalls) < controller.recall_batches * len(controller.layers):
            controller.recalls.append(float(torch.isin(layer.keep, layer.oracle(context)).float().mean()))
        try:
            sparse = original(self, sparse.unsqueeze(0)).squeeze(0)
            layer.keep = ALL_CHANNELS if layer.quantized else None  # see sliced_projection
            dense = original(self, dense.unsqueeze(0)).squeeze(0) if dense.shape[0] else None
        finally:
            layer.keep = None
        controller.account_saving(layer, routing.sparse, min(routing.sampled, controller.sample_tokens))
        controller.account_skipped(routing.skipped, layer.shape)
        return _join(controller, sparse, dense).reshape(x.shape)

    return forward


def exact_forward(controller: SparsityController, shape: FFNShape, outputs_only: bool, original: Callable) -> Callable:
    """A dense layer's FFN (or an attention projection, shape (in, out, 1)) that skips padding, or
    the last layer's FFN that runs for the output tokens alone (see _exact_forward)."""
    controller_ref = weakref.ref(controller)  # see patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        controller = controller_ref()
        if not _training(controller, self):
            return original(self, x)
        return _exact_forward(controller, shape, self, x, original, outputs_only)

    return forward


def sparse_value_forward(controller: SparsityController, attention: SparseAttention, original: Callable) -> Callable:
    """The value projection on the kept channels for context tokens, written into a zero tensor of
    the full width (the attention kernels need whole heads; for context rows the output projection
    reads only the kept columns). Output tokens compute their own values and output projection
    dense, but what they gather from context positions in the skipped channels is zero: like the
    sparse FFN, context sparsity changes what the output tokens attend to."""

    controller_ref, attention_ref = weakref.ref(controller), weakref.ref(attention)  # see patch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        controller, attention = controller_ref(), attention_ref()
        attention.columns = None
        if not _runs_sparse(controller, self):
            return original(self, x, *args, **kwargs)
        context, outputs = _split(controller, x.reshape(-1, x.shape[-1]))
        routing = controller.routing
        keep = attention.choose(context[: routing.sampled].detach(), controller.sample_tokens, routing.rows)
        attention.columns = output_columns(keep, attention.head_dim, attention.heads, attention.kv_heads)
        kept_values = rows_forward(self, context, keep, *forward_weight(controller.weights, self))
        sparse = kept_values.new_zeros(context.shape[0], attention.width).index_copy(1, keep, kept_values)
        dense = original(self, outputs, *args, **kwargs) if outputs.shape[0] else None
        controller.account_attention_saving(attention, routing.sparse, min(routing.sampled, controller.sample_tokens))
        # padding is in neither block, so both projections skipped it: value (d -> width), output (heads -> d)
        d = attention.estimator[0].shape[0]
        controller.account_skipped(routing.skipped, (d, attention.width + attention.heads * attention.head_dim, 1))
        return _join(controller, sparse, dense).reshape(*x.shape[:-1], attention.width)

    return forward


def sparse_output_forward(controller: SparsityController, attention: SparseAttention, original: Callable) -> Callable:
    controller_ref, attention_ref = weakref.ref(controller), weakref.ref(attention)  # see patch

    def forward(self, h: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        controller, attention = controller_ref(), attention_ref()
        columns, attention.columns = attention.columns, None
        if columns is None:
            return original(self, h, *args, **kwargs)
        context, outputs = _split(controller, h.reshape(-1, h.shape[-1]))
        sparse = columns_forward(
            self, context.index_select(1, columns), columns, *forward_weight(controller.weights, self)
        )
        dense = original(self, outputs, *args, **kwargs) if outputs.shape[0] else None
        return _join(controller, sparse, dense).reshape(*h.shape[:-1], sparse.shape[-1])

    return forward


def sliced_projection(controller: SparsityController, layer: SparseLayer, original: Callable, rows: bool) -> Callable:
    """A projection of a sparse FFN: the original while its layer has no channel set, else the kept
    rows (input projections) or columns (output projection). On a 4-bit base both token paths read
    one dequantized weight per forward (ALL_CHANNELS: every channel, from that weight), where
    bitsandbytes would dequantize again for the dense tokens."""
    controller_ref, layer_ref = weakref.ref(controller), weakref.ref(layer)  # see patch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        controller, keep = controller_ref(), layer_ref().keep
        if keep is None:
            return original(self, x, *args, **kwargs)
        weight, bias = forward_weight(controller.weights, self)
        if keep is ALL_CHANNELS:
            return full_forward(self, x, weight, bias)
        return rows_forward(self, x, keep, weight, bias) if rows else columns_forward(self, x, keep, weight, bias)

    return forward


def patch(owner: torch.nn.Module, name: str, make_forward: Callable[[Callable], Callable]) -> None:
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
