"""What a training run records while it trains: its phases and their clocks, and each step's
loss, speed and memory, streamed to the run store."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from lora_methods import Task
from training.core import compute, distributed, memory
from training.core.runs import Run

# What each phase's time counts as in the summary: loading and evaluation are the run's overhead.
PHASE_CLOCKS = {
    "loading": "load_time_s",
    "base evaluation": "eval_time_s",
    "training": "train_time_s",
    "evaluation": "eval_time_s",
    "final evaluation": "eval_time_s",
    "sentiment control": "eval_time_s",  # reviews written and judged, after the base's or the final evaluation
    "saving": "save_time_s",
}
PHASE_WRITE_INTERVAL_S = 0.5


class Phases:
    """The run's current phase (loading, base evaluation, training, evaluation at step N, final
    evaluation, saving) with its progress, written to the summary for live views, and the time
    spent in each kind of phase."""

    def __init__(self, started_at: float | None = None) -> None:
        """`started_at`: when the request began (epoch seconds), e.g. the worker process's start,
        so that loading counts the interpreter and libraries too; default now."""
        self.run: Run | None = None
        self.timings = {clock: 0.0 for clock in PHASE_CLOCKS.values()}
        self.current: dict[str, Any] = {}
        self._since = time.perf_counter() - (time.time() - started_at if started_at else 0.0)
        self._written = 0.0

    def attach(self, run: Run | None) -> None:
        self.run = run
        self._write()

    def begin(self, name: str, total: int | None = None, step: int | None = None, done: int = 0) -> None:
        """A new phase, written at once with `done` (training resumes at the step reached, not at 0)."""
        self._close()
        self.current = {"name": name, "step": step, "done": done, "total": total, "started_at": time.time()}
        self._write()

    def advance(self, done: int) -> None:
        self.current["done"] = done
        if time.perf_counter() - self._written >= PHASE_WRITE_INTERVAL_S:
            self._write()

    def _close(self) -> None:
        # Before the first phase `_since` is the request's start: the first phase (loading) counts from it.
        if self.current:
            now = time.perf_counter()
            self.timings[PHASE_CLOCKS[self.current["name"]]] += now - self._since
            self._since = now

    def finish(self) -> dict[str, float]:
        """The time spent per kind of phase, its total and the share spent loading and evaluating."""
        self._close()
        wall = sum(self.timings.values())
        overhead = self.timings["load_time_s"] + self.timings["eval_time_s"]
        return {**self.timings, "wall_time_s": wall, "overhead_share": overhead / wall if wall else None}

    def _write(self) -> None:
        if self.run is not None and self.current:
            self._written = time.perf_counter()
            self.run.update_summary(phase={**self.current, "updated_at": time.time()})


class RunRecorder(TrainerCallback):
    """Streams each logged step (with its memory) to metrics.jsonl, evaluates every `eval_steps`,
    honours stop requests."""

    def __init__(
        self,
        run: Run | None,
        phases: Phases,
        total_steps: int,
        batch_size: int,
        eval_steps: int,
        evaluate: Callable[[torch.nn.Module, int], dict | None],
        should_stop: Callable[[], bool],
        memory_of: Callable[[torch.optim.Optimizer], dict[str, int]],
    ) -> None:
        self.run, self.phases, self.total_steps, self.batch_size = run, phases, total_steps, batch_size
        self.eval_steps, self.evaluate, self.should_stop, self.memory_of = eval_steps, evaluate, should_stop, memory_of
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
        self.phases.begin("training", total=self.total_steps, done=state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self._step_started = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        elapsed = time.perf_counter() - self._step_started
        self.step_times.append(elapsed)
        self._time_since_log += elapsed
        self.phases.advance(state.global_step)
        if state.global_step % self.eval_steps == 0 and state.global_step < self.total_steps:
            figures = self.evaluate(model, state.global_step)  # None: stopped during it
            if figures is not None:
                self._write({"kind": "eval", "step": state.global_step, **figures, "elapsed_s": self._elapsed()})
            self.phases.begin("training", total=self.total_steps, done=state.global_step)
        if distributed.anyone(self.should_stop()):  # every process stops at the same step, or none does
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # a stopped run can be resumed from exactly here

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
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
            "elapsed_s": self._elapsed(),
            **self.memory_of(optimizer),
            **memory.process_figures(),
            # whatever else was logged (tokens seen; a method's own telemetry), under its own name
            **{k: v for k, v in logs.items() if k not in ("loss", "epoch", "learning_rate", "grad_norm")},
        }
        self._time_since_log, self._tokens_at_last_log = 0.0, state.num_input_tokens_seen
        self._write(record)
        self._report(state, record, step_time)

    def _report(self, state, record: dict, step_time: float) -> None:
        report_every = max(1, self.total_steps // 20)
        if state.is_world_process_zero and (state.global_step % report_every == 0 or state.global_step == 1):
            eta = (self.total_steps - state.global_step) * statistics.median(self.step_times)
            print(
                f"step {state.global_step}/{self.total_steps}  loss {record['loss']:.4f}  "
                f"{step_time:.2f} s/step  eta {eta:.0f} s (training only)",
                file=sys.stderr,
                flush=True,
            )


class MeasuredTrainer(Trainer):
    """The Trainer, counting the activations each training step saves for its backward pass; a
    causal LM computes its logits only where the loss reads them (compute.logits_where_read)."""

    def __init__(self, *args: Any, meter: memory.ActivationMeter, task: Task, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter, self.task = meter, task

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.task == "generation":
            inputs = compute.logits_where_read(inputs)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    def training_step(self, model, inputs, num_items_in_batch=None):
        with self.meter.measuring():
            return super().training_step(model, inputs, num_items_in_batch)
