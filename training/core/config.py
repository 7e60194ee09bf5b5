"""A run's configuration: what can be asked of a training run, its defaults and limits, and how a
configuration is spelled on the command line (the worker's argv and the line the UI shows)."""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lora_methods import TASKS, Task, get_method

# eval_samples: examples per split in the final evaluation (None: all); eval_subsample: the fixed
# validation examples that the base and in-training evaluations report, so watching a run costs
# little of its time (the base evaluation also covers the final one's examples, for the gain).
TASK_DEFAULTS: dict[Task, dict[str, Any]] = {
    "sentiment": {"batch_size": 16, "seq_len": 128, "max_steps": 300, "eval_samples": None, "eval_subsample": 256},
    "generation": {"batch_size": 8, "seq_len": 128, "max_steps": 60, "eval_samples": 200, "eval_subsample": 32},
}
LIMITS = {  # name -> (minimum, maximum), inclusive
    "batch_size": (1, 512),
    "seq_len": (8, 4096),
    "max_steps": (1, 1_000_000),
    "seed": (0, 2**31 - 1),
    "eval_steps": (1, 1_000_000),
    "eval_samples": (1, 1_000_000),
    "eval_subsample": (1, 1_000_000),
    "checkpoint_steps": (1, 1_000_000),
    "control_samples": (0, 1024),
}


class ConfigError(ValueError):
    """A training request that cannot run; nothing has been written when this is raised."""


@dataclass
class TrainConfig:
    task: Task
    method: str
    model: str | None = None  # catalog id, local folder or Hub id; None: the task's default
    dataset: str | None = None  # catalog id or a .csv/.jsonl path; None: the task's default
    hparams: dict[str, Any] = field(default_factory=dict)  # the method's hyperparameters
    max_steps: int | None = None
    epochs: float | None = None  # instead of max_steps
    batch_size: int | None = None
    seq_len: int | None = None
    seed: int = 0
    eval_steps: int | None = None  # None: five evaluations over the run
    eval_samples: int | None = None  # validation and test examples in the final evaluation; None: task default
    eval_subsample: int | None = None  # validation examples each in-training evaluation reports; None: task default
    control_samples: int = 32  # generations judged for sentiment control (controlled writing only)
    judge_run: str | None = None  # sentiment run that judges generations; None: the best one in the store
    checkpoint_steps: int | None = None  # save a resumable checkpoint every N steps; None: five per run
    owner: str | None = None  # opaque hash of the app session that started the run (only it may stop it)
    offline: bool = False

    def resolved(self) -> TrainConfig:
        """Defaults filled in and every value checked; raises ConfigError or HParamError."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        method = get_method(self.method)
        values = {**asdict(self), "hparams": method.resolve_hparams(self.hparams)}
        defaults = TASK_DEFAULTS[self.task]
        if self.max_steps is not None and self.epochs is not None:
            raise ConfigError("give either max_steps or epochs, not both")
        if self.epochs is not None:
            if not 0 < float(self.epochs) <= 100:
                raise ConfigError(f"epochs must be in (0, 100] (got {self.epochs})")
        else:
            values["max_steps"] = self.max_steps if self.max_steps is not None else defaults["max_steps"]
        for name in ("batch_size", "seq_len"):
            if values[name] is None:
                values[name] = defaults[name]
        for name in ("eval_samples", "eval_subsample"):
            if values[name] is None:
                values[name] = defaults[name]
        for name, (low, high) in LIMITS.items():
            value = values[name]
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
        return TrainConfig(**values)


def train_arguments(config: TrainConfig) -> list[str]:
    """The `train` arguments that reproduce `config`: what the UI shows and what its worker runs.

    Values equal to the CLI's own defaults are left out so the line stays readable."""
    arguments = ["train", "--task", config.task, "--method", config.method]
    options = {
        "--model": config.model,
        "--dataset": config.dataset,
        "--max-steps": config.max_steps,
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--seq-len": config.seq_len,
        "--seed": config.seed or None,
        "--eval-steps": config.eval_steps,
        "--eval-samples": config.eval_samples,
        "--eval-subsample": config.eval_subsample,
        "--control-samples": None if config.control_samples == 32 else config.control_samples,
        "--judge-run": config.judge_run,
        "--checkpoint-steps": config.checkpoint_steps,
        "--owner": config.owner,
    }
    method = get_method(config.method)
    for name, value in config.hparams.items():
        # The learning rate's default depends on the model (training.core.defaults): always spelled out.
        if value is not None and (name == "learning_rate" or value != method.hparam(name).default):
            options[method.hparam(name).flag] = value
    for flag, value in options.items():
        if value is not None:
            arguments += [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return arguments + (["--offline"] if config.offline else [])


def command_line(config: TrainConfig) -> str:
    """The shell command a person can paste to run the same training from a terminal."""
    return shlex.join(["python", "-m", "training", *train_arguments(replace(config, owner=None))])
