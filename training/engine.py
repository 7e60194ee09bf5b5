"""Training one run, top to bottom: validate, load, evaluate the base, train with Trainer, evaluate,
save, summarise. Everything the run produces goes to its folder in the run store.

The engine holds no global state and never imports a UI: a job manager, the CLI and
`accelerate launch -m training train ...` all call `train()`.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import psutil
import torch
from transformers import (
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from lora_methods import TASKS, FineTuningMethod, Task, get_method

from . import data, evaluation, inference, models
from .offline import is_offline
from .runs import Run, RunStore

TASK_DEFAULTS: dict[Task, dict[str, Any]] = {
    "sentiment": {"batch_size": 16, "seq_len": 128, "max_steps": 300, "eval_samples": None},
    "generation": {"batch_size": 8, "seq_len": 128, "max_steps": 60, "eval_samples": 200},
}
LIMITS = {  # name -> (minimum, maximum), inclusive
    "batch_size": (1, 512),
    "seq_len": (8, 4096),
    "max_steps": (1, 1_000_000),
    "seed": (0, 2**31 - 1),
    "eval_steps": (1, 1_000_000),
    "eval_samples": (1, 1_000_000),
    "checkpoint_steps": (1, 1_000_000),
    "control_samples": (0, 1024),
}
WARMUP_FRACTION = 0.05


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
    eval_samples: int | None = None  # validation examples per evaluation; None: the task's default
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
        if values["eval_samples"] is None:
            values["eval_samples"] = defaults["eval_samples"]
        for name, (low, high) in LIMITS.items():
            value = values[name]
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ConfigError(f"{name} must be a whole number from {low} to {high} (got {value!r})")
        return TrainConfig(**values)


def _library_versions() -> dict[str, str]:
    packages = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "datasets")
    return {"python": platform.python_version(), **{name: importlib.metadata.version(name) for name in packages}}


def _device() -> dict[str, Any]:
    if torch.cuda.is_available():
        return {"type": "cuda", "name": torch.cuda.get_device_name(), "count": torch.cuda.device_count()}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


def _memory_now() -> dict[str, int]:
    """CUDA: allocated and peak since the previous call; CPU: the process's resident set."""
    if torch.cuda.is_available():
        figures = {
            "cuda_allocated_bytes": torch.cuda.memory_allocated(),
            "cuda_peak_bytes": torch.cuda.max_memory_allocated(),
        }
        torch.cuda.reset_peak_memory_stats()
        return figures
    return {"rss_bytes": psutil.Process().memory_info().rss}


def _peak(records: list[dict]) -> int:
    return max((r.get("cuda_peak_bytes", r.get("rss_bytes", 0)) for r in records), default=0)


class RunRecorder(TrainerCallback):
    """Streams each logged step to metrics.jsonl, evaluates every `eval_steps`, honours stop requests."""

    def __init__(
        self,
        run: Run | None,
        total_steps: int,
        batch_size: int,
        eval_steps: int,
        evaluate: Callable[[torch.nn.Module], dict],
        should_stop: Callable[[], bool],
    ) -> None:
        self.run, self.total_steps, self.batch_size = run, total_steps, batch_size
        self.eval_steps, self.evaluate, self.should_stop = eval_steps, evaluate, should_stop
        self.step_times: list[float] = []
        self.stopped = False
        self.elapsed_before = 0.0
        self.started = self._step_started = time.perf_counter()
        self._time_since_log = 0.0
        self._tokens_at_last_log = 0

    def _write(self, record: dict) -> None:
        if self.run is not None:
            self.run.append_metrics(record)

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run continues its clock and token count from the checkpoint.
        self.started = time.perf_counter() - self.elapsed_before
        self._tokens_at_last_log = state.num_input_tokens_seen

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        elapsed = time.perf_counter() - self._step_started
        self.step_times.append(elapsed)
        self._time_since_log += elapsed
        if state.global_step % self.eval_steps == 0 and state.global_step < self.total_steps:
            self._write(
                {
                    "kind": "eval",
                    "step": state.global_step,
                    **self.evaluate(model),
                    "elapsed_s": time.perf_counter() - self.started,
                }
            )
        if self.should_stop():
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # a stopped run can be resumed from exactly here

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return  # Trainer's end-of-training summary, not a step
        step_time = self._time_since_log / max(args.logging_steps, 1)
        tokens = state.num_input_tokens_seen - self._tokens_at_last_log
        record = {
            "kind": "train",
            "step": state.global_step,
            "epoch": logs.get("epoch"),
            "loss": logs["loss"],
            "learning_rate": logs.get("learning_rate"),
            "grad_norm": logs.get("grad_norm"),
            "step_time_s": step_time,
            "samples_per_s": self.batch_size * args.world_size / step_time if step_time else None,
            "tokens_per_s": tokens / self._time_since_log if self._time_since_log else None,
            "elapsed_s": time.perf_counter() - self.started,
            **_memory_now(),
            # whatever else was logged (tokens seen; a method's own telemetry), under its own name
            **{k: v for k, v in logs.items() if k not in ("loss", "epoch", "learning_rate", "grad_norm")},
        }
        self._time_since_log, self._tokens_at_last_log = 0.0, state.num_input_tokens_seen
        self._write(record)
        report_every = max(1, self.total_steps // 20)
        if state.is_world_process_zero and (state.global_step % report_every == 0 or state.global_step == 1):
            eta = (self.total_steps - state.global_step) * statistics.median(self.step_times)
            print(
                f"step {state.global_step}/{self.total_steps}  loss {record['loss']:.4f}  "
                f"{step_time:.2f} s/step  eta {eta:.0f} s",
                file=sys.stderr,
                flush=True,
            )


def find_judge(store: RunStore, judge_run: str | None) -> Run | None:
    """The sentiment run that judges generated reviews: the one named, else the store's most accurate."""
    if judge_run:
        run = store.resolve(judge_run)
        if run.config.get("task") != "sentiment":
            raise ConfigError(f"judge run {judge_run} is not a sentiment run")
        return run
    candidates = [
        run
        for run in store.runs()
        if run.config.get("task") == "sentiment"
        and run.summary.get("status") == "completed"
        and run.adapter_dir.exists()
    ]
    return max(candidates, key=lambda r: r.summary["metrics"]["validation"]["accuracy"], default=None)


def _count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT: counts 4-bit weights unpacked
        return model.get_nb_trainable_parameters()
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def _dir_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


RESUMABLE = ("stopped", "interrupted", "failed")


def latest_checkpoint(run: Run) -> str | None:
    """The newest complete checkpoint: a process killed while saving leaves a folder without the
    trainer state the Trainer writes last, and the previous checkpoint is the one to resume."""

    def complete(path: Path) -> bool:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return path.name.rsplit("-", 1)[1].isdigit()

    saved = [path for path in (run.dir / "checkpoints").glob("checkpoint-*") if complete(path)]
    return str(max(saved, key=lambda path: int(path.name.rsplit("-", 1)[1]))) if saved else None


def resumable(run: Run) -> tuple[TrainConfig, str]:
    """The config a run was started with and the checkpoint to continue from; ConfigError if the
    run cannot be resumed (still running, completed, or stopped before its first checkpoint)."""
    if run.status not in RESUMABLE:
        raise ConfigError(f"run {run.id} is {run.status}; only {', '.join(RESUMABLE)} runs can be resumed")
    checkpoint = latest_checkpoint(run)
    if checkpoint is None:
        raise ConfigError(f"run {run.id} has no checkpoint to resume from (it stopped before the first one)")
    names = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{key: value for key, value in run.config.items() if key in names}), checkpoint


def resume(run_id: str, store: RunStore | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Continue a stopped, interrupted or failed run from its latest checkpoint, same run id:
    its step count, loss curve and data order carry on where the checkpoint left them."""
    store = store or RunStore()
    run = store.get(run_id)
    config, checkpoint = resumable(run)
    return train(config, store, should_stop, resume_from=(run, checkpoint))


def train(
    config: TrainConfig,
    store: RunStore | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_id: str | None = None,
    resume_from: tuple[Run, str] | None = None,
) -> dict:
    """Run one training job to the end (or a stop request); return its summary.

    Invalid requests (options, model, dataset, a rank too large for the model) raise ConfigError,
    HParamError, ModelError or DataError before any run folder exists. A failure after that marks
    the run `failed` with its error, then re-raises. `resume_from` (a run and its checkpoint) is
    how `resume` continues an existing run instead of creating one.
    """
    config = config.resolved()
    method = get_method(config.method)
    store = store or RunStore()
    offline = is_offline(config.offline)
    model_id = config.model or models.default_model(config.task, offline)
    dataset_id = config.dataset or data.default_dataset(config.task, offline)
    model_path = models.resolve_model_path(model_id, offline)
    splits = data.load_splits(dataset_id, config.task, offline)
    # A resumed run keeps the judge it started with (or none).
    wants_judge = splits.controlled and config.control_samples and (resume_from is None or config.judge_run)
    judge = find_judge(store, config.judge_run) if wants_judge else None

    set_seed(config.seed)  # before loading: a new classification head is initialised randomly
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_model(model_path, config.task, tokenizer, quantize_4bit=method.quantize_base)
    models.keep_4bit_layers_trainable(model)
    base_weight_memory = models.weight_memory_bytes(model)
    # Every method starts as the identity on the base (LoRA/HiRA zero-initialise one factor), so the
    # wrapped model evaluated before the first step *is* the base model; wrapping first lets a rank
    # or target that does not fit this model fail before a run is created.
    model = method.apply(model, config.task, config.hparams)

    is_main = int(os.environ.get("RANK", "0")) == 0  # under `accelerate launch`, one process records
    if resume_from is not None:
        run, checkpoint = resume_from
        step = int(Path(checkpoint).name.rsplit("-", 1)[1])
        run.keep_metrics_until(step)  # what was logged after the checkpoint is trained again
        run.clear_stop_request()
        run.update_summary(status="running", pid=os.getpid(), error=None, resumed_from_step=step)
    else:
        record = {
            **asdict(config),
            "model": model_id,
            "dataset": dataset_id,
            "model_path": model_path,
            "dataset_sizes": splits.sizes(),
            "offline": offline,
            "versions": _library_versions(),
            "device": _device(),
            "judge_run": judge.id if judge else None,
        }
        run, checkpoint = (store.create(record, run_id) if is_main else None), None

    def stop_requested() -> bool:  # by the caller (Ctrl-C) or through the run store (another process)
        return bool(should_stop and should_stop()) or (run is not None and run.stop_requested())

    try:
        return _train(
            config, method, run, model, tokenizer, base_weight_memory, splits, judge, stop_requested, checkpoint
        )
    except BaseException as error:
        if run is not None:
            run.update_summary(status="failed", error=f"{type(error).__name__}: {error}", finished_at=time.time())
        raise


def _train(
    config: TrainConfig,
    method: FineTuningMethod,
    run: Run | None,
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    base_weight_memory: int,
    splits: data.Splits,
    judge: Run | None,
    should_stop: Callable[[], bool],
    checkpoint: str | None,
) -> dict:
    task = config.task
    tokenized = {
        name: data.tokenize(getattr(splits, name), tokenizer, task, config.seq_len)
        for name in ("train", "validation", "test")
    }
    if config.eval_samples:
        for name in ("validation", "test"):
            tokenized[name] = tokenized[name].select(range(min(config.eval_samples, len(tokenized[name]))))
    collate = data.collator(tokenizer, task)

    def validate(m: torch.nn.Module) -> dict:
        return evaluation.evaluate(m, tokenized["validation"], collate, task)

    judge_model = inference.load_run(judge) if judge is not None else None

    def measure_control(m: torch.nn.Module) -> float | None:
        def classify(texts: list[str]) -> list[int]:
            texts = [t if t.strip() else "." for t in texts]
            return inference.class_probabilities(judge_model.model, judge_model.tokenizer, texts).argmax(-1).tolist()

        return evaluation.control_share(
            lambda p: inference.sample(m, tokenizer, p, seed=config.seed), classify, config.control_samples
        )

    if checkpoint is not None:
        base_metrics = run.summary["base_metrics"]  # measured when the run began
    else:
        base_metrics = {"validation": validate(model)}
        if judge_model is not None:
            base_metrics["control_share"] = measure_control(model)
    trainable, total = _count_parameters(model)

    steps_per_epoch = math.ceil(len(tokenized["train"]) / config.batch_size)
    total_steps = config.max_steps or math.ceil(steps_per_epoch * config.epochs)
    eval_steps = config.eval_steps or max(1, total_steps // 5)
    checkpoint_steps = config.checkpoint_steps or max(1, total_steps // 5)
    if run is not None:  # what a live view shows before the first step
        run.update_summary(
            planned_steps=total_steps,
            base_metrics=base_metrics,
            primary_metric="accuracy" if task == "sentiment" else "perplexity",
            trainable_params=trainable,
            total_params=total,
            trainable_percent=100.0 * trainable / total,
            base_weight_memory_bytes=base_weight_memory,
        )
    optimizer = "paged_adamw_8bit" if method.paged_optimizer and torch.cuda.is_available() else "adamw_torch"
    output_dir = str(run.dir / "checkpoints") if run is not None else "/tmp/lora-arena-replica"
    args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=config.batch_size,
        max_steps=total_steps,
        learning_rate=config.hparams["learning_rate"],
        lr_scheduler_type="linear",
        warmup_steps=math.ceil(WARMUP_FRACTION * total_steps),
        optim=optimizer,
        weight_decay=0.0,
        logging_steps=1,
        # Resumable checkpoints (the latest only); a completed run deletes them, see below.
        save_strategy="steps" if run is not None else "no",
        save_steps=checkpoint_steps,
        save_total_limit=1,
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=config.seed,
        data_seed=config.seed,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    recorder = RunRecorder(run, total_steps, config.batch_size, eval_steps, validate, should_stop)
    method_callbacks = method.callbacks(model, config.hparams) if method.callbacks else []
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=tokenized["train"],
        data_collator=collate,
        callbacks=[*method_callbacks, recorder],  # method callbacks first: they may add to the logs
    )
    trainer.remove_callback(PrinterCallback)  # the recorder reports progress; keep stdout for the summary
    previous = run.metrics() if checkpoint is not None else []
    recorder.elapsed_before = previous[-1]["elapsed_s"] if previous else 0.0
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=checkpoint)
    train_time = recorder.elapsed_before + time.perf_counter() - started

    metrics = {"validation": validate(model), "test": evaluation.evaluate(model, tokenized["test"], collate, task)}
    if judge_model is not None:
        metrics["control_share"] = measure_control(model)
    if run is None:
        return {}
    model.save_pretrained(run.adapter_dir)
    tokenizer.save_pretrained(run.adapter_dir)
    if not recorder.stopped:  # finished: nothing left to resume, free the disk
        shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
    step_records = [r for r in run.metrics() if r.get("kind") == "train"]  # a resumed run's too

    primary = run.summary["primary_metric"]
    return run.update_summary(
        status="stopped" if recorder.stopped else "completed",
        finished_at=time.time(),
        steps=trainer.state.global_step,
        optimizer=optimizer,
        metrics=metrics,
        gain=metrics["validation"][primary] - base_metrics["validation"][primary],
        judge_run=judge.id if judge else None,
        judge_accuracy=judge.summary["metrics"]["validation"]["accuracy"] if judge else None,
        peak_memory_bytes=_peak(step_records),
        train_time_s=train_time,
        median_step_time_s=statistics.median(r["step_time_s"] for r in step_records) if step_records else None,
        adapter_size_bytes=_dir_size(run.adapter_dir),
        **{key: value for cb in method_callbacks if hasattr(cb, "summary") for key, value in cb.summary().items()},
    )
