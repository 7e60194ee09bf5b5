"""The one small interface every fine-tuning method implements.

A method is data (name, summary, hyperparameter schema, how its base model is loaded) plus one
function, `apply`, that turns a freshly loaded base model into the model the Trainer trains.
The UI and the CLI are generated from `hparams`, so a schema entry is all a new knob needs.

The registry (names, summaries, hyperparameters) loads without PEFT or the Trainer: importing
those (and bitsandbytes with them) takes about 7 s here, and `python -m training --help`, `list`
and the refusal of a bad setting or hyperparameter read the registry only. A method imports them
in the functions that use them (`apply`, `callbacks`, `load_trained`); tests/test_cli.py holds
the CLI to this.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Task = Literal["sentiment", "generation"]
TASKS: tuple[Task, ...] = ("sentiment", "generation")
IGNORE_INDEX = -100  # the label of a position no loss reads (PyTorch's and transformers' convention)


class HParamError(ValueError):
    """A hyperparameter value the user gave is invalid; the message says which and why."""


@dataclass(frozen=True)
class HParam:
    """One hyperparameter: its type, default and valid range, with a help text for UI and CLI."""

    name: str
    kind: type  # int, float or str
    default: Any
    help: str
    minimum: float | None = None
    maximum: float | None = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False
    log_scale: bool = False  # the UI shows a log slider (learning rates)
    choices: tuple[str, ...] | None = None  # for str hyperparameters with a fixed set of values

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def range_text(self) -> str:
        if self.minimum is None and self.maximum is None:
            return ""
        low = "" if self.minimum is None else f"{self.minimum:g} {'<' if self.minimum_exclusive else '<='} "
        high = "" if self.maximum is None else f" {'<' if self.maximum_exclusive else '<='} {self.maximum:g}"
        return f"{low}{self.name}{high}"

    def parse(self, value: Any) -> Any:
        """Convert and range-check a value (from a form, a flag or JSON); raise HParamError if invalid."""
        if self.kind is str:
            if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
                value = ",".join(value)  # JSON's ["query", "value"] for "query,value"
            if not isinstance(value, str):
                raise HParamError(f"{self.name} must be text (got {value!r})")
            text = value.strip()
            if not text:
                raise HParamError(f"{self.name} must not be empty")
            if self.choices and text not in self.choices:
                raise HParamError(f"{self.name} must be one of {', '.join(self.choices)} (got {value!r})")
            return text
        if isinstance(value, bool):
            raise HParamError(f"{self.name} must be a number, not {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise HParamError(f"{self.name} must be a number (got {value!r})") from None
        if not math.isfinite(number):
            raise HParamError(f"{self.name} must be a finite number (got {value!r})")
        if self.kind is int:
            if number != int(number):
                raise HParamError(f"{self.name} must be a whole number (got {value!r})")
            number = int(number)
        too_low = self.minimum is not None and (
            number <= self.minimum if self.minimum_exclusive else number < self.minimum
        )
        too_high = self.maximum is not None and (
            number >= self.maximum if self.maximum_exclusive else number > self.maximum
        )
        if too_low or too_high:
            raise HParamError(f"{self.name} must satisfy {self.range_text()} (got {value!r})")
        return number


# load(folder or model id, in 4-bit NF4) -> the transformers model for the run's task, in eval or
# train mode as the caller needs: training.core.models knows how, this layer does not.
ModelLoader = Callable[[str, bool], torch.nn.Module]


def no_callbacks(model: torch.nn.Module, hparams: Mapping[str, Any]) -> list:
    return []


def no_telemetry(model: torch.nn.Module) -> dict[str, float | None]:
    return {}


def no_model_check(model: torch.nn.Module, hparams: Mapping[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class FineTuningMethod:
    """A fine-tuning method as the registry, engine, CLI and UI see it.

    Generic code asks the method (`optimizer_name`, `callbacks`, `telemetry`, `load_trained`,
    `merge_blocker`) rather than reading its flags; a new method overrides only what differs."""

    name: str
    title: str
    summary: str
    hparams: tuple[HParam, ...]
    # apply(model, task, hparams) -> the model to train, with exactly the trainable parameters set.
    apply: Callable[[torch.nn.Module, Task, Mapping[str, Any]], torch.nn.Module]
    quantize_base: bool = False  # load the frozen base in 4-bit NF4 (bitsandbytes)
    paged_optimizer: bool = False  # use paged 8-bit AdamW where CUDA is present
    # callbacks(model, hparams) -> Trainer callbacks for the model `apply` returned (schedules,
    # telemetry). One with a `summary()` method adds its figures to the run's summary.
    callbacks: Callable[[torch.nn.Module, Mapping[str, Any]], list] = no_callbacks
    # telemetry(model) -> figures of the model `apply` returned, by name, for the benchmark's record
    # (the same names the method's callbacks log during training).
    telemetry: Callable[[torch.nn.Module], dict[str, float | None]] = no_telemetry
    # check_model(model, hparams): HParamError for a setting this architecture cannot take (one
    # sparsity per layer...), asked of the weightless model before a run is queued or loads.
    check_model: Callable[[torch.nn.Module, Mapping[str, Any]], None] = no_model_check
    saves_full_model: bool = False  # the result is a whole model folder, not a PEFT adapter
    # The trained adapter folds into the base weights exactly (PEFT's merge_and_unload), so a merged
    # model can be exported and timed; on a 4-bit base it would be rounded into 4-bit weights instead.
    merges: bool = False

    def optimizer_name(self, cuda: bool) -> str:
        """The Trainer's `optim`: paged 8-bit AdamW (bitsandbytes) needs CUDA, AdamW otherwise."""
        return "paged_adamw_8bit" if self.paged_optimizer and cuda else "adamw_torch"

    def load_trained(self, saved: Path, base_path: Callable[[], str], load: ModelLoader) -> torch.nn.Module:
        """The trained model, for inference, from the folder training saved: that folder itself
        for a method that saves the whole model, else its base (at `base_path()`, loaded as this
        method trains it) with the saved PEFT adapter attached."""
        if self.saves_full_model:
            return load(str(saved), False)
        from peft import PeftModel  # not at the top: see the module docstring

        return PeftModel.from_pretrained(load(base_path(), self.quantize_base), str(saved))

    @property
    def merge_blocker(self) -> str | None:
        """Why this method's result cannot be exported as a merged model; None when it can."""
        if self.saves_full_model:
            return f"{self.title} already saves the whole model: there is no adapter to merge into it"
        if not self.merges:
            return f"{self.title}'s adapter does not fold into the base weights"
        if self.quantize_base:
            return (
                f"{self.title} trains on a 4-bit NF4 base: merging would round the update into 4-bit weights "
                "(lossy); download the adapter and merge it into a full-precision copy of the base instead"
            )
        return None

    def hparam(self, name: str) -> HParam:
        for spec in self.hparams:
            if spec.name == name:
                return spec
        raise HParamError(f"method {self.name!r} has no hyperparameter {name!r}")

    def resolve_hparams(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with `given`, every value validated. Unknown names are errors."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        known = {spec.name for spec in self.hparams}
        unknown = sorted(set(given) - known)
        if unknown:
            raise HParamError(
                f"method {self.name!r} does not take {', '.join(unknown)}; "
                f"it takes {', '.join(sorted(known)) or 'no hyperparameters'}"
            )
        return {spec.name: spec.parse(given.get(spec.name, spec.default)) for spec in self.hparams}


LEARNING_RATE_HELP = "peak learning rate (linear decay after a 5 percent warm-up)"


def learning_rate(default: float) -> HParam:
    return HParam(
        "learning_rate",
        float,
        default,
        LEARNING_RATE_HELP,
        minimum=0.0,
        maximum=1.0,
        minimum_exclusive=True,
        log_scale=True,
    )


def rank(default: int, help: str) -> HParam:
    return HParam("rank", int, default, help, minimum=1, maximum=4096)


def dropout(default: float) -> HParam:
    return HParam(
        "dropout", float, default, "dropout on the adapter's input", minimum=0.0, maximum=1.0, maximum_exclusive=True
    )


def cache_dir() -> Path:
    """Where converted models and estimator factors are kept between runs."""
    return Path(os.environ.get("LORA_ARENA_CACHE", Path.home() / ".cache" / "lora-arena"))


TARGET_MODULES = HParam(
    "target_modules",
    str,
    "auto",
    "layers to adapt: 'auto' (per architecture), 'all-linear', or comma-separated module names",
)
