"""Full fine-tuning: every weight trains. The baseline the parameter-efficient methods are measured against."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import FineTuningMethod, Task, learning_rate


def apply(model: torch.nn.Module, task: Task, hparams: Mapping[str, Any]) -> torch.nn.Module:
    model.requires_grad_(True)
    return model


METHOD = FineTuningMethod(
    name="full",
    title="Full fine-tuning",
    summary="Updates every weight of the model: the quality and cost baseline.",
    hparams=(learning_rate(5e-5),),
    apply=apply,
    saves_full_model=True,
)
