"""A run's configuration, declared once: each `TrainConfig` field carries a `Setting` (its label,
help, range and the surfaces that show it), from which the CLI's `train` flags and their decoding,
the worker's argv, the API's `start_run` parameters, the Train tab's number fields and the checks
in `TrainConfig.resolved` are all generated. A new field is one declaration here plus its use."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import shlex
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from lora_methods import METHODS, TASKS, Task, get_method
from training.core.compute import PRECISIONS, precision_refusal
from training.core.defaults import TUNED
from training.core.environment import process_slots

# eval_samples: examples per split in the final evaluation (None: all); eval_subsample: the fixed
# validation examples that the base and in-training evaluations report, so watching a run costs
# little of its time (the base evaluation also covers the final one's examples, for the gain).
TASK_DEFAULTS: dict[Task, dict[str, Any]] = {
    "sentiment": {"batch_size": 16, "seq_len": 128, "max_steps": 300, "eval_samples": None, "eval_subsample": 256},
    "generation": {"batch_size": 8, "seq_len": 128, "max_steps": 60, "eval_samples": 200, "eval_subsample": 32},
}
FLAG_ALIASES = {"learning_rate": ["--lr"]}

Surface = Literal["cli", "worker", "api", "form"]
# cli: a documented `train` flag; worker: spelled in the argv the job manager starts a worker with
# (parsed by the same CLI, hidden when not also "cli"); api: a `start_run` parameter; form: a field
# of the Train tab (whole numbers get a generated field, the others their own widgets).
EVERYWHERE: frozenset[Surface] = frozenset(("cli", "worker", "api", "form"))
COMMAND_LINE: frozenset[Surface] = frozenset(("cli", "worker"))


class ConfigError(ValueError):
    """A training request that cannot run; nothing has been written when this is raised."""


@dataclass(frozen=True)
class Setting:
    """How one TrainConfig field is asked for and checked; the field itself holds name, type and default."""

    label: str  # its name for a person: the form's label, and with the API's name in every refusal
    help: str  # CLI help and the form's hint
    shown: frozenset[Surface]
    minimum: float | None = None  # a whole-number or decimal setting has both bounds, inclusive
    maximum: float | None = None
    minimum_exclusive: bool = False
    choices: tuple[str, ...] | None = None
    unset: str | None = None  # what leaving it out means, where that is more than a value
    exclusive: str | None = None  # settings sharing this group name may not be given together
    form_blank: bool = False  # the form shows a text field left empty for the default, not a number
    # The form shows the field only where this says the machine can use it (asked when the form is built).
    offered: Callable[[], bool] | None = None

    def on_form(self) -> bool:
        return "form" in self.shown and (self.offered is None or self.offered())


def setting(default: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A dataclass field with its `Setting`; a dict default is copied for each config, never shared."""
    if isinstance(default, dict):
        return dataclasses.field(
            default_factory=functools.partial(dict, default), metadata={"setting": Setting(**spec)}
        )
    return dataclasses.field(default=default, metadata={"setting": Setting(**spec)})


@dataclass
class TrainConfig:
    task: Task = setting(label="task", help="classify sentiment, or write text", shown=EVERYWHERE, choices=TASKS)
    method: str = setting(
        label="method",
        help="; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()),
        shown=EVERYWHERE,
        choices=tuple(METHODS),
    )
    hparams: dict[str, Any] = setting(
        {}, label="hyperparameters", help="the method's hyperparameters by name", shown=EVERYWHERE
    )
    model: str | None = setting(
        None,
        label="model",
        help="catalog id, local folder or Hub id",
        unset="per task, bundled when offline",
        shown=EVERYWHERE,
    )
    dataset: str | None = setting(
        None, label="dataset", help="catalog id or a .csv/.jsonl file", unset="per task", shown=EVERYWHERE
    )
    max_steps: int | None = setting(
        None, label="steps", help="optimizer steps", shown=EVERYWHERE, minimum=1, maximum=1_000_000, exclusive="budget"
    )
    epochs: float | None = setting(
        None,
        label="epochs",
        help="passes over the training split, instead of --max-steps",
        shown=COMMAND_LINE,
        minimum=0,
        maximum=100,
        minimum_exclusive=True,
        exclusive="budget",
    )
    batch_size: int | None = setting(
        None, label="batch size", help="examples per step", shown=EVERYWHERE, minimum=1, maximum=512
    )
    seq_len: int | None = setting(
        None, label="sequence length", help="maximum tokens per example", shown=EVERYWHERE, minimum=8, maximum=4096
    )
    seed: int = setting(
        0,
        label="seed",
        help="seed for initialisation, data order and sampling",
        shown=EVERYWHERE,
        minimum=0,
        maximum=2**31 - 1,
    )
    eval_steps: int | None = setting(
        None,
        label="evaluate every N steps",
        help="evaluate on the validation subsample every N steps",
        unset="five times per run",
        shown=EVERYWHERE,
        minimum=1,
        maximum=1_000_000,
        form_blank=True,
    )
    eval_samples: int | None = setting(
        None,
        label="final evaluation examples",
        help="validation and test examples in the final evaluation, once at the end",
        shown=EVERYWHERE,
        minimum=1,
        maximum=1_000_000,
        form_blank=True,
    )
    eval_subsample: int | None = setting(
        None,
        label="validation subsample",
        help="validation examples each in-training evaluation reports: the same ones every time, "
        "so the curve compares like with like",
        shown=EVERYWHERE,
        minimum=1,
        maximum=1_000_000,
        form_blank=True,
    )
    control_samples: int = setting(
        32,
        label="judged generations",
        help="generations judged for sentiment control in review writing (0: skip)",
        shown=COMMAND_LINE,
        minimum=0,
        maximum=1024,
    )
    judge_run: str | None = setting(
        None,
        label="judge run",
        help="sentiment run that judges generated reviews",
        unset="the most accurate one in the store",
        shown=COMMAND_LINE,
    )
    checkpoint_steps: int | None = setting(
        None,
        label="checkpoint every N steps",
        help="save a resumable checkpoint every N steps",
        unset="five per run",
        shown=frozenset(("cli", "worker", "api")),
        minimum=1,
        maximum=1_000_000,
    )
    precision: str = setting(
        "auto",
        label="precision",
        help="what the matrix products compute in: bf16 (frozen weights stored in it, trained weights "
        "float32) where the hardware has it fast, else fp32; fp16 on GPUs without bf16",
        unset="auto: bf16 where a CUDA GPU or the CPU (AMX-BF16, AVX512-BF16) has it, else fp32",
        shown=EVERYWHERE,
        choices=PRECISIONS,
    )
    processes: int = setting(
        1,
        label="processes",
        help="training processes, data parallel: each takes its own batch of `batch size`, so a step "
        "trains on batch size x processes examples (one per GPU, or one per pair of CPU cores)",
        unset="1; under torchrun, as many as it started",
        shown=EVERYWHERE,
        offered=lambda: process_slots() > 1,
        minimum=1,
        maximum=64,
    )
    # An opaque hash of the app session that started the run: only it may stop the run.
    owner: str | None = setting(None, label="owner", help="the starting session's hash", shown=frozenset(("worker",)))
    offline: bool = setting(
        False, label="offline", help="never use the Hub: bundled models and data only", shown=COMMAND_LINE
    )

    @classmethod
    def from_record(cls, recorded: Mapping[str, Any]) -> TrainConfig:
        """The configuration a run recorded (its config.json, which also holds what the engine
        added: paths, versions), under the name its method has now (lora_methods.RETIRED)."""
        names = {spec.name for spec in dataclasses.fields(cls)}
        given = {key: value for key, value in recorded.items() if key in names}
        return cls(**{**given, "method": get_method(given["method"]).name})

    def resolved(self) -> TrainConfig:
        """Defaults filled in and every value checked; raises ConfigError or HParamError."""
        method = get_method(self.method)  # an unknown method is the registry's HParamError, naming the methods
        values = asdict(self)
        for field in RUN_FIELDS:
            field.check(values[field.name])
        values["hparams"] = method.resolve_hparams(self.hparams)
        refusal = precision_refusal(self.precision)
        if refusal:
            raise ConfigError(refusal)
        given = {field.name for field in RUN_FIELDS if values[field.name] is not None}
        for group in {field.setting.exclusive for field in RUN_FIELDS} - {None}:
            both = [field.called for field in RUN_FIELDS if field.setting.exclusive == group and field.name in given]
            if len(both) > 1:
                raise ConfigError(f"give either {' or '.join(both)}, not both")
        # A task default fills a field left out, unless another of its group was given (epochs: no max_steps).
        taken = {FIELDS[name].setting.exclusive for name in given} - {None}
        for name, default in TASK_DEFAULTS[self.task].items():
            if name not in given and FIELDS[name].setting.exclusive not in taken:
                values[name] = default
        return TrainConfig(**values)


@dataclass(frozen=True)
class RunField:
    """A TrainConfig field seen whole: name, value type and default from the dataclass, with its Setting."""

    name: str
    kind: type  # str, int, float, bool or dict; None is always allowed where the default is None
    default: Any  # dataclasses.MISSING where the field is required
    setting: Setting

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def called(self) -> str:
        """The field as a message names it: the form's label, and the API's name where they differ
        (the flag is the API's name with dashes)."""
        label = self.setting.label
        return label if label == self.name.replace("_", " ") else f"{label} ({self.name})"

    def default_text(self) -> str | None:
        """What leaving the field out means: per task where the task decides, else its value."""
        if self.setting.unset:
            return self.setting.unset
        if self.name in TASK_DEFAULTS["sentiment"]:
            # None as a task default is "the whole split" (eval_samples)
            per_task = {
                task: "all" if values[self.name] is None else values[self.name]
                for task, values in TASK_DEFAULTS.items()
            }
            if len(set(per_task.values())) == 1:
                return str(next(iter(per_task.values())))
            return ", ".join(f"{value} {task}" for task, value in per_task.items())
        if self.required or self.default is None or self.kind in (bool, dict):
            return None
        return str(self.default)

    def check(self, value: Any) -> None:
        """Raise ConfigError naming the field when `value` has the wrong type or is out of range."""
        if value is None and not self.required and self.default is None:
            return
        name, low, high = self.called, self.setting.minimum, self.setting.maximum
        if self.setting.choices is not None and value not in self.setting.choices:
            choices = ", ".join(self.setting.choices)
            raise ConfigError(f"unknown {name} {value!r}; choose one of {choices}")
        if self.kind is int and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
        if self.kind is float and not _in_interval(value, self.setting):
            opening = "(" if self.setting.minimum_exclusive else "["
            raise ConfigError(f"{name} must be in {opening}{low:g}, {high:g}] (got {value!r})")
        if self.kind is dict and not isinstance(value, dict):
            raise ConfigError(f"{name} must be a JSON object of names and values (got {value!r})")
        if self.kind in (str, bool) and not isinstance(value, self.kind):
            raise ConfigError(f"{name} must be {'text' if self.kind is str else 'true or false'} (got {value!r})")


def _in_interval(value: Any, spec: Setting) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return False
    above = value > spec.minimum if spec.minimum_exclusive else value >= spec.minimum
    return above and value <= spec.maximum


def _value_type(hint: Any) -> type:
    """The type a field's values have: `int | None` -> int, `Task` (a Literal) -> str, `dict[...]` -> dict."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [option for option in typing.get_args(hint) if option is not type(None)]
    if typing.get_origin(hint) is Literal:
        return type(typing.get_args(hint)[0])
    return typing.get_origin(hint) or hint


def _run_fields() -> tuple[RunField, ...]:
    hints = typing.get_type_hints(TrainConfig)
    run_fields = tuple(
        RunField(
            spec.name,
            _value_type(hints[spec.name]),
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default,
            spec.metadata["setting"],
        )
        for spec in dataclasses.fields(TrainConfig)
    )
    for field in run_fields:
        if field.kind in (int, float) and (field.setting.minimum is None or field.setting.maximum is None):
            raise TypeError(f"TrainConfig.{field.name} is a number: its Setting needs a minimum and a maximum")
    return run_fields


RUN_FIELDS = _run_fields()
FIELDS = {field.name: field for field in RUN_FIELDS}


def shown_on(surface: Surface) -> tuple[RunField, ...]:
    """The fields `surface` shows, in declaration order."""
    return tuple(field for field in RUN_FIELDS if surface in field.setting.shown)


def config_from(values: Mapping[str, Any]) -> TrainConfig:
    """The config a surface's values describe; None or empty text there means the field's default."""
    return TrainConfig(
        **{name: value for name, value in values.items() if FIELDS[name].required or value not in (None, "")}
    )


# -- the command line: `train` flags, their decoding, and the argv that reproduces a config --------


# Every hyperparameter name across the methods: one flag each.
HPARAM_NAMES = tuple(dict.fromkeys(spec.name for method in METHODS.values() for spec in method.hparams))


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """The `train` subcommand's flags for every command-line field, then one per method hyperparameter."""
    groups: dict[str, Any] = {}
    for field in RUN_FIELDS:
        if not field.setting.shown & COMMAND_LINE or field.kind is dict:
            continue
        group = field.setting.exclusive
        if group and group not in groups:
            groups[group] = parser.add_mutually_exclusive_group()
        (groups[group] if group else parser).add_argument(field.flag, **_flag_options(field))
    _add_method_flags(parser)


def _flag_options(field: RunField) -> dict[str, Any]:
    if "cli" not in field.setting.shown:
        help_text = argparse.SUPPRESS
    else:
        default = field.default_text()
        help_text = _argparse_text(field.setting.help + (f" (default: {default})" if default else ""))
    if field.kind is bool:
        return {"action": "store_true", "help": help_text}
    options = {"type": field.kind, "help": help_text, "required": field.required, "choices": field.setting.choices}
    return options | ({} if field.required else {"default": field.default})


def _add_method_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per hyperparameter name across all methods; help says which methods take it."""
    group = parser.add_argument_group("method hyperparameters (defaults depend on the method)")
    for name in HPARAM_NAMES:
        users = [(method.name, spec) for method in METHODS.values() for spec in method.hparams if spec.name == name]
        spec = users[0][1]
        per_method = ", ".join(f"{method}: {s.default}" for method, s in users)
        defaults = f"Defaults: {per_method}"
        if name in TUNED:  # the engine fills a left-out value from the results suite first
            defaults = (
                "Left out: the results suite's tuned value for the task and model where it has one "
                f"(the summary's `defaults` says which), else the method's. Method defaults: {per_method}"
            )
        group.add_argument(
            spec.flag,
            *FLAG_ALIASES.get(name, []),
            dest=name,
            type=spec.kind,
            default=None,
            help=_argparse_text(". ".join(part for part in (spec.help, spec.range_text(), defaults) if part)),
        )


def _argparse_text(text: str) -> str:
    """`text` as argparse help: argparse formats help with %, so a literal one ("30% of") is doubled."""
    return text.replace("%", "%%")


def config_from_flags(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that parsed `train` flags describe."""
    hparams = {name: getattr(args, name) for name in HPARAM_NAMES if getattr(args, name) is not None}
    values = {field.name: getattr(args, field.name) for field in shown_on("worker") if field.kind is not dict}
    return TrainConfig(**values, hparams=hparams)


def train_arguments(config: TrainConfig) -> list[str]:
    """The `train` arguments that reproduce `config`: what the UI shows and what its worker runs.

    Values equal to the CLI's own defaults are left out so the line stays readable; valued options
    come first, then the method's hyperparameters, then switches."""
    options, switches = [], []
    for field in shown_on("worker"):
        value = getattr(config, field.name)
        if field.kind is dict or value is None or (not field.required and value == field.default):
            continue
        if field.kind is bool:
            switches.append(field.flag)
        else:
            options.append((field.flag, value))
    method = get_method(config.method)
    for name, value in config.hparams.items():
        # The learning rate's default depends on the model (training.core.defaults): always spelled out.
        if value is not None and (name == "learning_rate" or value != method.hparam(name).default):
            options.append((method.hparam(name).flag, value))
    spelled = [[flag, f"{value:g}" if isinstance(value, float) else str(value)] for flag, value in options]
    return ["train", *(part for pair in spelled for part in pair), *switches]


def command_line(config: TrainConfig) -> str:
    """The shell command a person can paste to run the same training from a terminal."""
    return shlex.join(["python", "-m", "training", *train_arguments(replace(config, owner=None))])
