"""Quality metrics: computed the same way for the base model, during training and at the end.

- sentiment: accuracy, macro-F1 and mean loss.
- generation: token-weighted loss over target tokens and its perplexity; for sentiment-controlled
  writing, the share of sampled reviews that a trained sentiment classifier (the judge) judges to
  carry the sentiment the prompt asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import datasets
import torch

from lora_methods import Task

from .data import IGNORE_INDEX, REVIEW_PROMPT
from .models import LABELS


def macro_f1(predictions: list[int], labels: list[int], num_classes: int = len(LABELS)) -> float:
    scores = []
    for cls in range(num_classes):
        tp = sum(p == cls and y == cls for p, y in zip(predictions, labels))
        fp = sum(p == cls and y != cls for p, y in zip(predictions, labels))
        fn = sum(p != cls and y == cls for p, y in zip(predictions, labels))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_classes


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, records: datasets.Dataset, collate: Callable, task: Task, batch_size: int = 32
) -> dict[str, float]:
    """Metrics of `model` on tokenized `records`; the model's train/eval mode is restored after."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss, total_items, predictions, labels = 0.0, 0, [], []
    for start in range(0, len(records), batch_size):
        batch = collate([records[i] for i in range(start, min(start + batch_size, len(records)))])
        batch = {key: value.to(device) for key, value in batch.items()}
        output = model(**batch)
        if task == "sentiment":
            items = len(batch["labels"])
            predictions += output.logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
        else:
            # The model's loss is the mean over predicted (shifted, non-ignored) tokens.
            items = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        total_loss += float(output.loss) * items
        total_items += items
    model.train(was_training)
    loss = total_loss / max(total_items, 1)
    if task == "sentiment":
        accuracy = sum(p == y for p, y in zip(predictions, labels)) / max(len(labels), 1)
        return {"accuracy": accuracy, "macro_f1": macro_f1(predictions, labels), "loss": loss}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


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
