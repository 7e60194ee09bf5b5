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
from .estimator import SparseAttention, SparseLayer
from .slicing import columns_forward, output_columns, rows_forward


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


def sparse_container_forward(controller: SparsityController, layer: SparseLayer, original: Callable) -> Callable:
    controller_ref, layer_ref = weakref.ref(controller), weakref.ref(layer)  # see patch

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


def outputs_only_forward(controller: SparsityController, width: int, projections: int, original: Callable) -> Callable:
    """The last layer's FFN for the output tokens alone. Nothing reads what the last layer computes
    at a context position (the classifier reads [CLS]; a causal LM's loss ignores the prompt's
    predictions), so those positions skip the FFN and zeros stand in: the loss and every gradient
    are the ones the dense FFN gives."""

    controller_ref = weakref.ref(controller)  # see patch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        controller = controller_ref()
        if not _runs_sparse(controller, self) or controller.order is None:
            return original(self, x)
        context, outputs = _split(controller, x.reshape(-1, x.shape[-1]))
        dense = original(self, outputs.unsqueeze(0)).squeeze(0) if outputs.shape[0] else None
        controller.account_skipped(context.shape[0], x.shape[-1], width, projections)
        return _join(controller, context.new_zeros(context.shape), dense).reshape(x.shape)

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


def sparse_output_forward(controller: SparsityController, attention: SparseAttention, original: Callable) -> Callable:
    controller_ref, attention_ref = weakref.ref(controller), weakref.ref(attention)  # see patch

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


def sliced_projection(layer: SparseLayer, original: Callable, rows: bool) -> Callable:
    layer_ref = weakref.ref(layer)  # see patch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        keep = layer_ref().keep
        if keep is None:
            return original(self, x, *args, **kwargs)
        return rows_forward(self, x, keep) if rows else columns_forward(self, x, keep)

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
