"""Quality metrics: computed the same way for the base model, during training and at the end.

- sentiment: accuracy, macro-F1 and mean loss.
- generation: token-weighted loss over target tokens and its perplexity; for sentiment-controlled
  writing, the share of sampled reviews that a trained sentiment classifier (the judge) judges to
  carry the sentiment the prompt asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import datasets
import torch

from lora_methods import Task
from training.core import compute
from training.core.compute import Precision, read_positions
from training.core.data import REVIEW_PROMPT
from training.core.models import LABELS


def macro_f1(predictions: list[int], labels: list[int], num_classes: int = len(LABELS)) -> float:
    scores = []
    for cls in range(num_classes):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_classes


class EvaluationStopped(Exception):
    """A stop was requested while an evaluation ran: its figures are incomplete and not reported."""


@dataclass
class PerExample:
    """What an evaluation measured for each example, in the records' order, so that any prefix (the
    fixed subsample that in-training evaluations use) has its metrics without a second pass."""

    task: Task
    loss_sums: list[float]  # sentiment: the example's loss; generation: summed over its target tokens
    items: list[int]  # sentiment: 1; generation: predicted target tokens
    predictions: list[int]  # sentiment only
    labels: list[int]  # sentiment only

    def metrics(self, first: int | None = None) -> dict[str, float]:
        """Metrics of the first `first` examples (all when None)."""
        count = len(self.items) if first is None else min(first, len(self.items))
        loss = sum(self.loss_sums[:count]) / max(sum(self.items[:count]), 1)
        if self.task == "sentiment":
            predictions, labels = self.predictions[:count], self.labels[:count]
            accuracy = sum(p == y for p, y in zip(predictions, labels)) / max(count, 1)
            return {"accuracy": accuracy, "macro_f1": macro_f1(predictions, labels), "loss": loss}
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _length_batches(records: datasets.Dataset, batch_size: int) -> list[list[int]]:
    """Indices grouped by length: a batch of similar lengths pads little, and evaluation is pure
    forward passes whose cost is mostly padding on short reviews."""
    order = sorted(range(len(records)), key=lambda i: len(records[i]["input_ids"]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _batch_figures(model: torch.nn.Module, batch: dict, task: Task) -> tuple[list[float], list[int], list[int]]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    if task == "sentiment":
        logits = model(**inputs).logits.float()
        losses = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        return losses.tolist(), [1] * len(losses), logits.argmax(-1).tolist()
    # The causal LM loss: position t predicts token t + 1, unlabelled tokens carry none. Logits are
    # computed only at the labelled positions: a prompt's logits, a 49k-way softmax per position,
    # are never read.
    positions, targets = read_positions(batch["labels"])
    logits = model(**inputs, logits_to_keep=positions).logits.float()  # one row per labelled position
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    rows = positions.nonzero()[:, 0]
    sums = losses.new_zeros(len(positions)).index_add_(0, rows, losses)
    return sums.tolist(), positions.sum(-1).tolist(), [-1] * len(positions)


# Examples per forward pass: a causal LM's batch holds a vocabulary-wide row of logits per token,
# and past 16 rows that traffic costs more than the larger batch saves (measured on SmolLM2).
BATCH_SIZES: dict[Task, int] = {"sentiment": 32, "generation": 16}


def evaluate_examples(
    model: torch.nn.Module,
    records: datasets.Dataset,
    collate: Callable,
    task: Task,
    precision: Precision = "fp32",
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PerExample:
    """Per-example figures of `model` on tokenized `records` in inference mode at `precision`; the model's
    train/eval mode is restored after. `on_batch(examples done)` runs after every batch and may
    raise EvaluationStopped to end the evaluation early."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = len(records)
    loss_sums, items, predictions = [0.0] * count, [0] * count, [0] * count
    done = 0
    try:
        with compute.inference(precision, model):
            for indices in _length_batches(records, batch_size or BATCH_SIZES[task]):
                batch = {key: value.to(device) for key, value in collate([records[i] for i in indices]).items()}
                for index, loss, item, prediction in zip(indices, *_batch_figures(model, batch, task), strict=True):
                    loss_sums[index], items[index], predictions[index] = loss, item, prediction
                done += len(indices)
                if on_batch is not None:
                    on_batch(done)
    finally:
        model.train(was_training)
    labels = list(records["labels"]) if task == "sentiment" else []
    return PerExample(task, loss_sums, items, predictions if task == "sentiment" else [], labels)


def evaluate(
    model: torch.nn.Module,
    records: datasets.Dataset,
    collate: Callable,
    task: Task,
    precision: Precision = "fp32",
    batch_size: int | None = None,
) -> dict[str, float]:
    """Metrics of `model` on tokenized `records` (sentiment: accuracy, macro-F1, loss; generation:
    token-weighted loss and perplexity)."""
    return evaluate_examples(model, records, collate, task, precision, batch_size).metrics()


def control_prompts(samples: int) -> tuple[list[str], list[int]]:
    """Half the prompts ask for a negative review, half for a positive one."""
    wanted = [i % len(LABELS) for i in range(samples)]
    return [REVIEW_PROMPT.format(sentiment=LABELS[label]) for label in wanted], wanted


def control_share(
    generate: Callable[[list[str]], list[str]], classify: Callable[[list[str]], list[int]], samples: int
) -> float:
    """Share of sampled reviews whose judged sentiment is the one the prompt asked for."""
    prompts, wanted = control_prompts(samples)
    judged = classify(generate(prompts))
    return sum(j == w for j, w in zip(judged, wanted)) / len(wanted)
