"""The one list of errors that are the user's to fix: a bad setting, an unknown run, an unusable
file or model, someone else's run. The CLI prints them as one line (exit status 2) and the UI shows
them as a message; anything else is a fault of the program and keeps its traceback."""

from __future__ import annotations

from lora_methods import HParamError
from training.core.config import ConfigError
from training.core.data import DataError
from training.core.inference import InferenceError
from training.core.models import ModelError
from training.core.runs import RunNotFound
from training.jobs.manager import OwnershipError

USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError,
    HParamError,
    ModelError,
    DataError,
    RunNotFound,
    InferenceError,
    OwnershipError,
)
