"""The one list of errors that are the user's to fix: a bad setting, an unknown run, an unusable
file or model, someone else's run. The CLI prints them as one line (exit status 2) and the UI shows
them as a message; anything else is a fault of the program and keeps its traceback.

They live here, in a module that imports neither PEFT nor the Trainer nor a model class, so that
the CLI can refuse a bad request in the time Python and torch take to start."""

from __future__ import annotations

from lora_methods import HParamError
from training.core.config import ConfigError
from training.core.runs import RunNotFound


class ModelError(ValueError):
    """A model that cannot be used; the message says why and what to choose instead."""


class DataError(ValueError):
    """A dataset that cannot be used; the message says what is wrong and how to fix it."""


class InferenceError(ValueError):
    """A request that cannot be served (bad input, unusable run); the message says why."""


class OwnershipError(PermissionError):
    """Someone other than the session that started a run tried to stop, resume or delete it."""


USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    HParamError,
    ModelError,
    DataError,
    RunNotFound,
    InferenceError,
    OwnershipError,
)
