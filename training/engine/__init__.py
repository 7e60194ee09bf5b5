"""The engine: one training run from a configuration to its summary in the run store (recipe.py),
recording its steps, phases and memory as it goes (recorder.py). It imports only `training.core`
and `lora_methods`, never a UI, a job manager or a CLI."""

from training.engine.recipe import resume, train, with_tuned_defaults

__all__ = ["resume", "train", "with_tuned_defaults"]
