"""When SparseLoRA is sparse, in the Trainer: the dense warm-up steps, then sparse ones; a 4-bit
base's dequantized weights released after each step; the controller's figures in the training
logs and the summary. Imported only when a run trains (see `callbacks`): the Trainer's import
takes seconds that the registry's readers do not need."""

from __future__ import annotations

import math

from transformers import TrainerCallback

from .controller import SparsityController


class SparsitySchedule(TrainerCallback):
    """Dense warm-up for the first steps, then sparse; reports FLOPs ratio and estimator recall."""

    def __init__(self, controller: SparsityController, warmup_fraction: float) -> None:
        self.controller, self.warmup_fraction = controller, warmup_fraction

    def on_train_begin(self, args, state, control, **kwargs):
        self.warmup_steps = math.ceil(self.warmup_fraction * state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.active = state.global_step >= self.warmup_steps

    def on_step_end(self, args, state, control, **kwargs):
        # A 4-bit base's weights, dequantized for this step, are not kept between steps (nor
        # through an evaluation): holding them would undo what 4-bit saves at rest.
        self.controller.weights.clear()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and "loss" in logs:
            logs.update(self.controller.telemetry())

    def summary(self) -> dict:
        layers = self.controller.layers
        return {
            "sparsity": {
                **self.controller.telemetry(),
                "sparse_layers": [layer.index for layer in layers],
                "kept_channels": {layer.index: layer.kept for layer in layers},
                "kept_value_channels": {a.index: a.kept for a in self.controller.attention},
                "outputs_only_layer": self.controller.outputs_only_layer,
                "dense_warmup_steps": getattr(self, "warmup_steps", None),
            }
        }
