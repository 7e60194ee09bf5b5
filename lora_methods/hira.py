"""HiRA (Huang et al., ICLR 2025): W = W0 + W0 ⊙ (B A), a Hadamard product that can be full rank
with LoRA's parameter count. No alpha; it needs a much higher learning rate than LoRA."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .base import TARGET_MODULES, FineTuningMethod, Task, dropout, learning_rate, rank
from .peft_adapter import wrap_with_adapter


def apply(model: torch.nn.Module, task: Task, hparams: Mapping[str, Any]) -> torch.nn.Module:
    from peft import HiraConfig  # not at the top: see base.py

    def make_config(**common: Any) -> HiraConfig:
        return HiraConfig(r=hparams["rank"], hira_dropout=hparams["dropout"], **common)

    return wrap_with_adapter(model, task, hparams, make_config)


METHOD = FineTuningMethod(
    name="hira",
    title="HiRA",
    summary="Trains B·A as an element-wise mask on the frozen weight (W0 ⊙ B·A): high-rank updates at LoRA's size.",
    hparams=(
        learning_rate(1e-2),
        rank(8, "rank r of B·A (the update W0 ⊙ B·A itself can be full rank)"),
        dropout(0.0),
        TARGET_MODULES,
    ),
    apply=apply,
    merges=True,
)
