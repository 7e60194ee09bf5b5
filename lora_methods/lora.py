"""LoRA (Hu et al., 2021): frozen W0 plus a trainable low-rank update (alpha / r) * B A, B = 0 at start."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .base import TARGET_MODULES, FineTuningMethod, HParam, Task, dropout, learning_rate, rank
from .peft_adapter import wrap_with_adapter


def apply_with(**options: Any) -> Callable[[torch.nn.Module, Task, Mapping[str, Any]], torch.nn.Module]:
    """LoRA's `apply` with extra LoraConfig options, so a LoRA variant that PEFT implements
    (DoRA: use_dora=True) reuses LoRA's hyperparameters and wrapping instead of copying them."""

    def apply(model: torch.nn.Module, task: Task, hparams: Mapping[str, Any]) -> torch.nn.Module:
        from peft import LoraConfig  # not at the top: see base.py

        def make_config(**common: Any) -> LoraConfig:
            return LoraConfig(
                r=hparams["rank"], lora_alpha=hparams["alpha"], lora_dropout=hparams["dropout"], **options, **common
            )

        return wrap_with_adapter(model, task, hparams, make_config)

    return apply


apply = apply_with()


METHOD = FineTuningMethod(
    name="lora",
    title="LoRA",
    summary="Freezes the model and trains a small low-rank update B·A beside chosen layers; merges away at inference.",
    hparams=(
        learning_rate(1e-3),
        rank(8, "rank r of the update B·A"),
        HParam(
            "alpha",
            float,
            16.0,
            "scaling: the update is multiplied by alpha / r",
            minimum=0.0,
            maximum=1024.0,
            minimum_exclusive=True,
        ),
        dropout(0.05),
        TARGET_MODULES,
    ),
    apply=apply,
    merges=True,
)
