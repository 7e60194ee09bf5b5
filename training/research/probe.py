"""How much contextual sparsity a model's FFNs have, measured on real batches.

For each layer and sparsity: the share of each context token's FFN output that is lost when only
the batch's top-k channels run, with the channels the oracle picks (from the true activations) and
with those SparseLoRA's estimator picks, and the estimator's recall of the oracle's channels.
SparseLoRA's accuracy cost follows this error, so it is the evidence for a layer schedule:
sparsify the layers that lose little, keep dense the ones that lose much.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterator

import torch

from lora_methods import Task, get_method, sparsity
from training.core import models
from training.research.bench import Workload


def probe(
    task: Task,
    sparsities: tuple[float, ...] = (0.5, 0.75, 0.9),
    batches: int = 4,
    batch_size: int | None = None,
    seq_len: int | None = None,
    model: str | None = None,
    dataset: str | None = None,
    estimator_rank: int | None = None,
    offline: bool = False,
) -> Iterator[dict]:
    """One record per layer and sparsity, averaged over `batches` training batches; the estimator
    is SparseLoRA's at its default settings unless `estimator_rank` says otherwise."""
    defaults = get_method("sparselora").resolve_hparams()
    estimator_rank = estimator_rank or defaults["estimator_rank"]
    sample_tokens = defaults["estimator_tokens"]
    if not sparsities or not all(0 <= s < 1 for s in sparsities):
        raise ValueError(f"sparsities must be numbers in [0, 1) (got {list(sparsities)})")
    workload = Workload.resolve(task, model, dataset, batch_size, seq_len, offline)
    tokenizer = models.load_tokenizer(workload.model_path)
    network = models.load_model(workload.model_path, task, tokenizer).eval()
    layout = sparsity.FFN_LAYOUTS.get(network.config.model_type)
    if layout is None:
        raise ValueError(
            f"no FFN layout for {network.config.model_type!r} models; supported: {', '.join(sparsity.FFN_LAYOUTS)}"
        )

    # The FFN input of every layer, caught on its way into the (first) input projection.
    blocks = list(sparsity.resolve(network, layout.layers))
    ffn_inputs: dict[int, torch.Tensor] = {}
    hooks = [
        sparsity.resolve(block, layout.inputs[0]).register_forward_pre_hook(
            lambda module, args, index=index: ffn_inputs.__setitem__(index, args[0])
        )
        for index, block in enumerate(blocks)
    ]
    layers = []
    for index, block in enumerate(blocks):
        inputs = [sparsity.resolve(block, name) for name in layout.inputs]
        output, activation = sparsity.resolve(block, layout.output), sparsity.resolve(block, layout.activation)
        estimator = sparsity.estimator_factors(inputs, estimator_rank)
        layers.append(
            [sparsity.SparseLayer(index, ratio, inputs, output, activation, estimator) for ratio in sparsities]
        )

    figures: dict[tuple[int, float], list[tuple[float, float, float]]] = {}
    tokens_seen = 0
    for batch in workload.batches(tokenizer, batches):
        with torch.no_grad():
            network(**batch)
        # SparseLoRA's context: real tokens that produce no output (padding and outputs run otherwise).
        context = batch["attention_mask"].bool()
        context &= ~sparsity.dense_positions(batch["labels"], batch["input_ids"].shape)
        tokens_seen += int(context.sum())
        for index, variants in enumerate(layers):
            tokens = ffn_inputs[index][context]
            for layer in variants:
                chosen, oracle = layer.choose(tokens, sample_tokens), layer.oracle(tokens)
                figures.setdefault((index, layer.sparsity), []).append(
                    (
                        layer.output_error(tokens, oracle),
                        layer.output_error(tokens, chosen),
                        float(torch.isin(chosen, oracle).float().mean()),
                    )
                )
    for hook in hooks:
        hook.remove()

    for (index, ratio), values in sorted(figures.items()):
        oracle_error, estimator_error, recall = (statistics.fmean(column) for column in zip(*values))
        yield {
            "task": task,
            "model": workload.model,
            "dataset": workload.dataset,
            "layer": index,
            "sparsity": ratio,
            "oracle_error": oracle_error,
            "estimator_error": estimator_error,
            "estimator_recall": recall,
            "estimator_rank": estimator_rank,
            "batches": len(values),
            "context_tokens": tokens_seen,
        }
