"""How much contextual sparsity a model's FFNs have, measured on real batches.

For each layer and sparsity: the share of each context token's FFN output that is lost when only
the batch's top-k channels run, with the channels the oracle picks (from the true activations) and
with those SparseLoRA's estimator picks, and the estimator's recall of the oracle's channels.
SparseLoRA's accuracy cost follows this error, so it is the evidence for a layer schedule:
sparsify the layers that lose little, keep dense the ones that lose much. Beside it, what the
oracle's channels would lose if each sequence, or each token, had a set of its own: the share of
the loss that is the price of one set per batch (the one that keeps the products dense).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import torch

from lora_methods import Task, get_method
from lora_methods.sparselora.controller import output_positions, routing
from lora_methods.sparselora.estimator import SparseLayer, estimator_factors
from lora_methods.sparselora.layouts import ffn_layout, resolve
from training.core import models
from training.research.bench import Workload

# (layer, sparsity) -> one (oracle error, estimator error, estimator recall, oracle error with a
# set per sequence, oracle error with a set per token) per batch
Figures = dict[tuple[int, float], list[tuple[float, float, float, float, float]]]


def probe(
    task: Task,
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9),
    batches: int = 4,
    batch_size: int | None = None,
    seq_len: int | None = None,
    model: str | None = None,
    dataset: str | None = None,
    estimator_rank: int | None = None,
    scoring: str = "tokens",
    offline: bool = False,
) -> Iterator[dict]:
    """One record per layer and sparsity, averaged over `batches` training batches; the estimator
    is SparseLoRA's at its default settings unless `estimator_rank` or `scoring` say otherwise."""
    defaults = get_method("sparselora").resolve_hparams()
    estimator_rank = estimator_rank or defaults["estimator_rank"]
    if not sparsities or not all(0 <= s < 1 for s in sparsities):
        raise ValueError(f"sparsities must be numbers in [0, 1) (got {list(sparsities)})")
    workload = Workload.resolve(task, model, dataset, batch_size, seq_len, offline)
    tokenizer = models.load_tokenizer(workload.model_path)
    network = models.load_model(workload.model_path, task, tokenizer).eval()
    layers = _layer_variants(network, sparsities, estimator_rank, scoring)
    figures, tokens_seen = _measure(network, layers, workload.batches(tokenizer, batches), defaults["estimator_tokens"])
    for (index, ratio), values in sorted(figures.items()):
        oracle_error, estimator_error, recall, sequence_error, token_error = (
            statistics.fmean(column) for column in zip(*values)
        )
        yield {
            "task": task,
            "model": workload.model,
            "dataset": workload.dataset,
            "layer": index,
            "sparsity": ratio,
            "oracle_error": oracle_error,
            "sequence_oracle_error": sequence_error,
            "token_oracle_error": token_error,
            "estimator_error": estimator_error,
            "estimator_recall": recall,
            "estimator_rank": estimator_rank,
            "estimator": scoring,
            "batches": len(values),
            "context_tokens": tokens_seen,
        }


def _layer_variants(
    network: torch.nn.Module, sparsities: tuple[float, ...], estimator_rank: int, scoring: str
) -> list[list[SparseLayer]]:
    """Per transformer layer, its FFN as SparseLoRA sees it, once per sparsity (one estimator)."""
    layout = ffn_layout(network.config.model_type)
    layers = []
    for index, block in enumerate(resolve(network, layout.layers)):
        inputs = [resolve(block, name) for name in layout.inputs]
        output, activation = resolve(block, layout.output), resolve(block, layout.activation)
        estimator = estimator_factors(inputs, estimator_rank)
        layers.append(
            [SparseLayer(index, ratio, inputs, output, activation, estimator, scoring) for ratio in sparsities]
        )
    return layers


def _measure(
    network: torch.nn.Module, layers: list[list[SparseLayer]], batches: list[dict], sample_tokens: int
) -> tuple[Figures, int]:
    """Each layer's figures on each batch's context tokens, and how many context tokens there were."""
    # The FFN input of every layer, caught on its way into the (first) input projection.
    ffn_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        variants[0]
        .inputs[0]
        .register_forward_pre_hook(lambda module, args, index=index: ffn_inputs.__setitem__(index, args[0]))
        for index, variants in enumerate(layers)
    ]
    figures: Figures = {}
    tokens_seen = 0
    for batch in batches:
        with torch.no_grad():
            network(**batch)
        # SparseLoRA's context, as its router sorts it: real tokens that produce no output.
        reads = ffn_layout(network.config.model_type).classifier_reads
        outputs = output_positions(batch["labels"], batch["input_ids"], reads, network.config.pad_token_id)
        routed = routing(outputs, batch["attention_mask"] == 0, True, batch["input_ids"].shape)
        context = routed.order[: routed.sampled]
        tokens_seen += routed.sampled
        for index, variants in enumerate(layers):
            tokens = ffn_inputs[index].reshape(-1, ffn_inputs[index].shape[-1]).index_select(0, context)
            for layer in variants:
                chosen, oracle = layer.choose(tokens, sample_tokens, routed.rows), layer.oracle(tokens)
                batch_error, sequence_error, token_error = layer.oracle_errors(tokens, routed.rows)
                figures.setdefault((index, layer.sparsity), []).append(
                    (
                        batch_error,
                        layer.output_error(tokens, chosen),
                        float(torch.isin(chosen, oracle).float().mean()),
                        sequence_error,
                        token_error,
                    )
                )
    for hook in hooks:
        hook.remove()
    return figures, tokens_seen
