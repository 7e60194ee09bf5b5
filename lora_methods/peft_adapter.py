"""Wrapping a base model in a PEFT adapter: shared by every method that trains one."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from .base import Task
from .targets import check_rank, head_modules, resolve_targets

if TYPE_CHECKING:
    from peft import PeftConfig

PEFT_TASK_TYPES: dict[Task, str] = {"sentiment": "SEQ_CLS", "generation": "CAUSAL_LM"}


def wrap_with_adapter(
    model: torch.nn.Module,
    task: Task,
    hparams: Mapping[str, Any],
    make_config: Callable[..., PeftConfig],
) -> torch.nn.Module:
    """Validate targets and rank against this model, then let PEFT inject the adapter.

    `make_config(target_modules=..., modules_to_save=..., task_type=...)` builds the method's own
    PEFT config. A 4-bit base is first prepared for k-bit training (layer norms in fp32, inputs
    that require grad) without gradient checkpointing, which would only slow a small model down.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training  # not at the top: see base.py

    targets = resolve_targets(model, hparams["target_modules"])
    check_rank(model, targets, hparams["rank"])
    if getattr(model, "is_loaded_in_4bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = make_config(
        target_modules=targets,
        modules_to_save=head_modules(model, task),
        task_type=PEFT_TASK_TYPES[task],
    )
    with warnings.catch_warnings():
        # PEFT 0.21 reads `is_gradient_checkpointing`, which transformers 5 deprecates: a warning
        # in every run's log that no user of this project can act on.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        return get_peft_model(model, config)
