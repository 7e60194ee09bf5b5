"""Training one run, top to bottom: validate, load, evaluate the base, train with Trainer, evaluate,
save, summarise. Everything the run produces goes to its folder in the run store.

The engine holds no global state and never imports a UI: a job manager, the CLI and
`torchrun -m training train ...` all call `train()`. Under a launcher every process runs this
same code; rank 0 records the run (training.core.distributed).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerBase,
    PrinterCallback,
    Trainer,
    TrainingArguments,
    set_seed,
)

from lora_methods import FineTuningMethod, get_method
from training.core import compute, data, defaults, distributed, evaluation, inference, memory, models
from training.core.config import ConfigError, TrainConfig
from training.core.environment import device, has_cuda, library_versions
from training.core.metrics import primary_metric
from training.core.offline import is_offline
from training.core.runs import Run, RunStore, find_judge, resumable, write_json_atomic
from training.engine.recorder import PHASE_CLOCKS, MeasuredTrainer, Phases, RunRecorder

WARMUP_FRACTION = 0.05


def _count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT: counts 4-bit weights unpacked
        return model.get_nb_trainable_parameters()
    return (sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))


def _dir_size(path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# What a run's end writes about itself (`_Job._summarise`, `Phases.finish`) besides its clocks.
SEGMENT_END = (
    "finished_at",
    "steps",
    "metrics",
    "gain",
    "training_memory_bytes",
    "memory_breakdown",
    "peak_rss_bytes",
    "cuda_peak_bytes",
    "median_step_time_s",
    "adapter_size_bytes",
    "wall_time_s",
    "overhead_share",
)


def resume(
    run_id: str,
    store: RunStore | None = None,
    should_stop: Callable[[], bool] | None = None,
    started_at: float | None = None,
) -> dict:
    """Continue a stopped, interrupted or failed run from its latest checkpoint, same run id:
    its step count, loss curve and data order carry on where the checkpoint left them."""
    store = store or RunStore()
    run = store.get(run_id)

    def pick() -> tuple[TrainConfig, str]:
        picked = resumable(run)
        run.clear_obeyed_stop_request()  # a stop asked for while this waited or loads is kept
        return picked

    # Every process resumes from the checkpoint rank 0 finds, before rank 0 marks the run running.
    config, checkpoint = distributed.from_main(pick)
    return train(config, store, should_stop, resume_from=(run, checkpoint), started_at=started_at)


def with_tuned_defaults(config: TrainConfig, model_id: str) -> TrainConfig:
    """`config` resolved, hyperparameters it leaves out taken from the results suite's tuned values
    for its task and model (training.core.defaults), else from the method."""
    tuned = defaults.hparam_defaults(config.task, model_id, config.method)
    return replace(config, hparams={**tuned, **config.hparams}).resolved()


def _model_to_train(
    model_path: str, config: TrainConfig, method: FineTuningMethod, attention: compute.Attention | None
) -> tuple[PreTrainedTokenizerBase, torch.nn.Module, int]:
    """The tokenizer, the model `method` trains (its frozen weights stored in the run's precision)
    and the bytes the base's weights take as stored."""
    set_seed(config.seed)  # before loading: a new classification head is initialised randomly
    tokenizer = models.load_tokenizer(model_path)
    model = models.load_model(model_path, config.task, tokenizer, method.quantize_base, config.precision, attention)
    models.keep_4bit_layers_trainable(model)
    base_parameters = {id(parameter) for parameter in model.parameters()}
    # Every method starts as the identity on the base (LoRA/HiRA zero-initialise one factor), so the
    # wrapped model evaluated before the first step *is* the base model.
    model = method.apply(model, config.task, config.hparams)
    compute.store_frozen_weights(model, config.precision)
    added = sum(p.nbytes for p in model.parameters() if id(p) not in base_parameters)  # adapters, head copies
    return tokenizer, model, models.weight_memory_bytes(model) - added


def train(
    config: TrainConfig,
    store: RunStore | None = None,
    should_stop: Callable[[], bool] | None = None,
    run_id: str | None = None,
    resume_from: tuple[Run, str] | None = None,
    started_at: float | None = None,
) -> dict:
    """Run one training job to the end (or a stop request); return its summary.

    Invalid requests (options, model, dataset, a rank too large for the model) raise ConfigError,
    HParamError, ModelError or DataError before any run folder exists. A failure after that marks
    the run `failed` with its error, then re-raises. `resume_from` (a run and its checkpoint) is
    how `resume` continues an existing run instead of creating one. `started_at` (epoch seconds):
    when the request began, if before this call (a worker's process start), for the loading time.
    """
    phases = Phases(started_at)
    phases.begin("loading")
    config = _with_processes(config, resuming=resume_from is not None)
    offline = is_offline(config.offline)
    model_id = config.model or models.default_model(config.resolved().task, offline)
    given_rate = "learning_rate" in config.hparams
    config = with_tuned_defaults(config, model_id)
    precision, precision_source = compute.resolve_precision(config.precision)
    config = replace(config, precision=precision)  # what config.json records: a resumed run keeps it
    if resume_from is None:
        attention, attention_source = compute.resolve_attention("auto", precision, config.seq_len)
    else:  # a resumed run keeps the kernel it trained with (runs from before the choice: the default)
        recorded = resume_from[0].config
        attention, attention_source = recorded.get("attention"), recorded.get("attention_source", "the default")
    method = get_method(config.method)
    store = store or RunStore()
    dataset_id = config.dataset or data.default_dataset(config.task, offline)
    model_path = models.resolve_model_path(model_id, offline)
    splits = data.load_splits(dataset_id, config.task, offline)
    # A resumed run keeps the judge it started with (or none).
    wants_judge = splits.controlled and config.control_samples and (resume_from is None or config.judge_run)
    judge = find_judge(store, config.judge_run) if wants_judge else None

    # Wrapping before the run exists lets a rank or target that does not fit this model fail first.
    tokenizer, model, base_weight_memory = _model_to_train(model_path, config, method, attention)
    kernel = models.attention_kernel(model)  # what it computes with: the default made concrete
    computing = f"computing in {precision} ({precision_source}), {kernel} attention ({attention_source})"
    print(computing, file=sys.stderr, flush=True)

    if resume_from is not None:
        run, checkpoint = resume_from
        step = int(Path(checkpoint).name.rsplit("-", 1)[1])
        for clock in set(PHASE_CLOCKS.values()):  # the time spent before the stop counts too
            phases.timings[clock] += run.summary.get(clock) or 0.0
        if distributed.is_main():
            run.keep_metrics_until(step)  # what was logged after the checkpoint is trained again
            # Running again: the figures of the segment that ended are not this run's end (live views
            # would show them as its own); its end writes them anew, its clocks summed above.
            ended = dict.fromkeys((*SEGMENT_END, *PHASE_CLOCKS.values()))
            run.update_summary(status="running", pid=os.getpid(), error=None, resumed_from_step=step, **ended)
    else:
        record = {
            **asdict(config),
            "model": model_id,
            "dataset": dataset_id,
            "model_path": model_path,
            "dataset_sizes": splits.sizes(),
            "offline": offline,
            "versions": library_versions(),
            "device": device(),
            "judge_run": judge.id if judge else None,
            "precision_source": precision_source,
            "attention": attention,  # as asked for (None: the model's default), which serving asks for again
            "attention_source": attention_source,
        }
        # Rank 0 creates the run; the other processes train into its folder (their checkpoint shards).
        run, checkpoint = store.get(distributed.from_main(lambda: store.create(record, run_id).id)), None
    recording = run if distributed.is_main() else None
    phases.attach(recording)

    def stop_requested() -> bool:  # by the caller (Ctrl-C) or through the run store (another process)
        return bool(should_stop and should_stop()) or (recording is not None and recording.stop_requested())

    rate_source = "given" if given_rate else defaults.source(config.task, model_id, config.method)
    if resume_from is not None:  # its config holds the rate it started with: where that came from stays
        rate_source = run.summary.get("defaults", {}).get("learning_rate", {}).get("source", rate_source)
    if recording is not None:
        recording.update_summary(
            defaults={"learning_rate": {"value": config.hparams["learning_rate"], "source": rate_source}},
            precision=precision,
            precision_source=run.config.get("precision_source", precision_source),
            attention=kernel,
            attention_source=attention_source,
            processes=config.processes,
            global_batch_size=config.batch_size * config.processes,
        )
    job = _Job(
        config, method, recording, run.dir, model, tokenizer, base_weight_memory, splits, judge, phases, stop_requested
    )
    try:
        return job.execute(checkpoint)
    except BaseException as error:
        if recording is not None:
            recording.update_summary(status="failed", error=f"{type(error).__name__}: {error}", finished_at=time.time())
        raise


def _with_processes(config: TrainConfig, resuming: bool) -> TrainConfig:
    """`config` with the number of processes actually training: under a launcher, as many as it
    started (which `processes`, if given, must match); without one, a single process. A resumed
    run continues on as many as it recorded: each has its share of the checkpoint and the data."""
    launched = distributed.world_size()
    if config.processes != launched and (resuming or config.processes != 1):
        again = "resume --run-id ID" if resuming else f"train --processes {config.processes} ..."
        hint = f"`python -m training {again}` starts them"
        raise ConfigError(f"processes {config.processes} asked for, but {launched} running: {hint}")
    if has_cuda() and launched > torch.cuda.device_count():
        raise ConfigError(f"{launched} processes for {torch.cuda.device_count()} GPUs: one process per GPU at most")
    return replace(config, processes=launched)


@dataclass
class _Job:
    """One run from its loaded model to its summary: prepare (tokenize, evaluate the base), fit
    (the Trainer, evaluating every `eval_steps`), finish (final evaluation, save, summarise)."""

    config: TrainConfig
    method: FineTuningMethod
    run: Run | None  # the run this process records: rank 0's only, under a launcher
    run_dir: Path  # every process's: checkpoints hold each process's shard of the state
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    base_weight_memory: int
    splits: data.Splits
    judge: Run | None
    phases: Phases
    should_stop: Callable[[], bool]

    def execute(self, checkpoint: str | None) -> dict:
        base_metrics = self.prepare(checkpoint)
        # Stopped during the base evaluation (rank 0's, the others wait here): nothing trained, nothing to keep.
        if distributed.anyone(base_metrics is None):
            return self._update(
                status="stopped", finished_at=time.time(), steps=0, metrics=None, **self.phases.finish()
            )
        trainer, recorder = self.fit(checkpoint)
        return self.finish(trainer, recorder, base_metrics)

    # -- prepare ----------------------------------------------------------------------------

    def prepare(self, checkpoint: str | None) -> dict | None:
        """Tokenized splits, the evaluation subsample, the plan; the base model's metrics (measured
        when the run began, for a resumed run), or None if a stop came during their evaluation."""
        config = self.config
        self.tokenized = {
            name: data.tokenize(getattr(self.splits, name), self.tokenizer, config.task, config.seq_len)
            for name in ("train", "validation", "test")
        }
        if config.eval_samples:
            for name in ("validation", "test"):
                split = self.tokenized[name]
                self.tokenized[name] = split.select(range(min(config.eval_samples, len(split))))
        # The subsample is the validation set's first examples, so the base and final evaluations,
        # which cover the whole set, report it too without a second pass.
        self.subsample = min(config.eval_subsample, len(self.tokenized["validation"]))
        self.collate = data.collator(self.tokenizer, config.task)
        # the judge scores rank 0's evaluations only
        self.judge_model = inference.load_run(self.judge) if self.judge is not None and self.run is not None else None
        steps_per_epoch = math.ceil(len(self.tokenized["train"]) / (config.batch_size * config.processes))
        self.total_steps = config.max_steps or math.ceil(steps_per_epoch * config.epochs)
        self.eval_steps = config.eval_steps or max(1, self.total_steps // 5)
        trainable, total = _count_parameters(self.model)
        self._update(
            planned_steps=self.total_steps,
            eval_steps=self.eval_steps,
            eval_examples=self.subsample,
            final_eval_examples=len(self.tokenized["validation"]) + len(self.tokenized["test"]),
            # the base and final evaluations' examples per split (all of it unless eval_samples cuts it)
            split_examples={name: len(self.tokenized[name]) for name in ("validation", "test")},
            primary_metric=primary_metric(config.task),
            trainable_params=trainable,
            total_params=total,
            trainable_percent=100.0 * trainable / total,
            base_weight_memory_bytes=self.base_weight_memory,
        )
        if self.run is None:  # another process's: rank 0 evaluates and records
            return {}
        if checkpoint is not None:
            return self.run.summary["base_metrics"]
        try:
            base_metrics = self._evaluate_base()
        except evaluation.EvaluationStopped:
            return None
        self._update(base_metrics=base_metrics)
        return base_metrics

    def _evaluate_base(self) -> dict:
        """The base model's metrics on the whole validation set (the subsample's go on the curve);
        taken from the store's earlier measurement of the same base, data and settings if any:
        every method starts as the identity on its base, so comparing methods on one model pays
        for its base evaluation once."""
        cached = self._base_cache()
        if cached is not None and cached.exists():
            known = json.loads(cached.read_text(encoding="utf-8"))
            self._record_eval(0, known["subsample"], self.subsample, 0.0, base=True, reused=True)
            self._update(base_metrics_from=known["run"])
            return known["metrics"]
        validation = self._evaluate("base evaluation", ["validation"])["validation"]
        self._record_eval(0, validation.metrics(self.subsample), self.subsample, 0.0, base=True)
        metrics = {"validation": validation.metrics()}
        if self.judge_model is not None:
            metrics["control_share"] = self._control_share()
        if cached is not None:
            cached.parent.mkdir(exist_ok=True)
            known = {"metrics": metrics, "subsample": validation.metrics(self.subsample), "run": self.run.id}
            write_json_atomic(cached, known)
        return metrics

    def _base_cache(self) -> Path | None:
        """Where the store keeps the base metrics for everything they depend on: model, data, its
        file's size and time, sequence length, evaluation sizes, 4-bit or not, seed (a new head's
        initialisation, sampled reviews), judge and library versions."""
        if self.run is None:
            return None
        config, recorded = self.config, self.run.config
        dataset = Path(recorded["dataset"])
        stat = dataset.stat() if dataset.is_file() else None
        settings = {
            "model": recorded["model_path"],
            "dataset": [recorded["dataset"], stat and stat.st_size, stat and stat.st_mtime_ns],
            "task": config.task,
            "sizes": [config.seq_len, config.eval_samples, config.eval_subsample, config.control_samples],
            "quantized": self.method.quantize_base,
            "precision": config.precision,
            "seed": config.seed,
            "judge": self.judge.id if self.judge else None,
            "versions": recorded["versions"],
        }
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:32]
        return self.run.dir.parent / ".base-metrics" / f"{digest}.json"

    # -- evaluation -------------------------------------------------------------------------

    def _evaluate(self, phase: str, names: list[str], step: int | None = None, first: int | None = None) -> dict:
        """Per-example figures on each named split (its first `first` examples), under `phase`;
        raises EvaluationStopped when a stop is requested through the run store meanwhile."""
        records = {name: self.tokenized[name] for name in names}
        if first is not None:
            records = {name: split.select(range(first)) for name, split in records.items()}
        total = sum(len(split) for split in records.values())
        self.phases.begin(phase, total=total, step=step)
        started, done, results = time.perf_counter(), 0, {}
        with distributed.every_core():
            for name, split in records.items():

                def progress(count: int, before: int = done) -> None:
                    self.phases.advance(before + count)
                    if self.should_stop():  # the run store's stop file, or the caller's (Ctrl-C)
                        raise evaluation.EvaluationStopped

                results[name] = evaluation.evaluate_examples(
                    self.model, split, self.collate, self.config.task, self.config.precision, 32, progress
                )
                done += len(split)
        self._update(eval_s_per_example=(time.perf_counter() - started) / max(total, 1))
        return results

    def _evaluate_during_training(self, model: torch.nn.Module, step: int) -> dict | None:
        if self.run is None:  # rank 0 evaluates; the others wait for it at the next step
            return None
        try:
            figures = self._evaluate("evaluation", ["validation"], step, self.subsample)["validation"]
        except evaluation.EvaluationStopped:
            return None
        return {**figures.metrics(), "examples": self.subsample}

    def _control_share(self, step: int | None = None) -> float:
        """Share of sampled reviews that the judge reads with the sentiment their prompt asked for:
        a phase of its own (writing the reviews takes minutes on a CPU), `step` None for the base's."""
        judge = self.judge_model
        self.phases.begin("sentiment control", total=self.config.control_samples, step=step)
        started = time.perf_counter()

        def classify(texts: list[str]) -> list[int]:
            texts = [t if t.strip() else "." for t in texts]
            return (
                inference.class_probabilities(judge.model, judge.tokenizer, texts, judge.precision).argmax(-1).tolist()
            )

        def generate(prompts: list[str]) -> list[str]:
            return inference.sample(
                self.model, self.tokenizer, prompts, precision=self.config.precision, seed=self.config.seed
            )

        share = evaluation.control_share(generate, classify, self.config.control_samples)
        self._update(control_time_s=time.perf_counter() - started)
        return share

    def _record_eval(self, step: int, metrics: dict, examples: int, elapsed: float, **flags: bool) -> None:
        if self.run is not None:
            self.run.append_metrics(
                {"kind": "eval", "step": step, **metrics, "examples": examples, **flags, "elapsed_s": elapsed}
            )

    def _update(self, **fields: Any) -> dict:
        return self.run.update_summary(**fields) if self.run is not None else {}

    # -- fit --------------------------------------------------------------------------------

    def fit(self, checkpoint: str | None) -> tuple[Trainer, RunRecorder]:
        """Train with the Trainer from the start or from `checkpoint`, to the end or a stop."""
        config, run = self.config, self.run
        self.optimizer_name = self.method.optimizer_name(has_cuda())
        args = TrainingArguments(
            output_dir=str(self.run_dir / "checkpoints"),
            per_device_train_batch_size=config.batch_size,
            max_steps=self.total_steps,
            learning_rate=config.hparams["learning_rate"],
            lr_scheduler_type="linear",
            warmup_steps=math.ceil(WARMUP_FRACTION * self.total_steps),
            optim=self.optimizer_name,
            # Mixed precision: the Trainer computes under autocast (fp16 with loss scaling); the
            # weights that train stay float32, the frozen ones were stored in the compute dtype.
            bf16=config.precision == "bf16",
            fp16=config.precision == "fp16",
            weight_decay=0.0,
            logging_steps=1,
            # Resumable checkpoints (the latest only); a completed run deletes them, see finish().
            save_strategy="steps",
            save_steps=config.checkpoint_steps or max(1, self.total_steps // 5),
            save_total_limit=1,
            eval_strategy="no",
            report_to="none",
            disable_tqdm=True,
            seed=config.seed,
            data_seed=config.seed,
            include_num_input_tokens_seen="non_padding",
            # Several processes: a causal LM's loss is a mean over the global batch's tokens, which
            # the Trainer computes by counting them on every process and scaling by the process count.
            # A classifier's loss is a mean over its own examples whatever it is given, so that scaling
            # would multiply its gradients by the process count: DDP's average is the right mean there.
            average_tokens_across_devices=config.task == "generation",
            use_cpu=not has_cuda(),
            dataloader_num_workers=0,
        )
        meter = memory.ActivationMeter(self.model)

        def memory_of(optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
            optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
            return memory.breakdown(self.model, weight_memory, optimizer, meter.bytes)

        weight_memory = models.weight_memory_bytes(self.model)  # the base's and the adapter's, as stored
        recorder = RunRecorder(
            run,
            self.phases,
            self.total_steps,
            config.batch_size,
            self.eval_steps,
            self._evaluate_during_training,
            self.should_stop,
            memory_of,
        )
        self.method_callbacks = self.method.callbacks(self.model, config.hparams)
        trainer = MeasuredTrainer(
            model=self.model,
            args=args,
            train_dataset=self.tokenized["train"],
            data_collator=self.collate,
            callbacks=[*self.method_callbacks, recorder],  # method callbacks first: they may add to the logs
            meter=meter,
            task=config.task,
        )
        trainer.remove_callback(PrinterCallback)  # the recorder reports progress; keep stdout for the summary
        previous = run.metrics() if checkpoint is not None and run is not None else []
        recorder.elapsed_before = previous[-1]["elapsed_s"] if previous else 0.0
        trainer.train(resume_from_checkpoint=checkpoint)
        return trainer, recorder

    # -- finish -----------------------------------------------------------------------------

    def finish(self, trainer: Trainer, recorder: RunRecorder, base_metrics: dict) -> dict:
        """Final evaluation on the validation and test splits (eval_samples of each, else all;
        skipped when stopped: a stop must take effect within seconds), the adapter saved, the
        summary written."""
        if self.run is None:  # another process's: rank 0 evaluates, saves and summarises
            return {}
        metrics = None
        if not recorder.stopped:
            try:
                metrics = self._evaluate_final(trainer.state.global_step, recorder)
            except evaluation.EvaluationStopped:
                recorder.stopped = True
        run = self.run
        self.phases.begin("saving")
        self.model.save_pretrained(run.adapter_dir)
        self.tokenizer.save_pretrained(run.adapter_dir)
        if not recorder.stopped:  # finished: nothing left to resume, free the disk (a stopped run keeps its checkpoint)
            shutil.rmtree(run.dir / "checkpoints", ignore_errors=True)
        return self._summarise(trainer, recorder, base_metrics, metrics)

    def _evaluate_final(self, step: int, recorder: RunRecorder) -> dict:
        results = self._evaluate("final evaluation", ["validation", "test"], step)
        metrics = {split: figures.metrics() for split, figures in results.items()}
        if self.judge_model is not None:
            metrics["control_share"] = self._control_share(step)
        examples = len(self.tokenized["validation"])
        self._record_eval(step, metrics["validation"], examples, recorder._elapsed(), final=True)
        return metrics

    def _summarise(self, trainer: Trainer, recorder: RunRecorder, base_metrics: dict, metrics: dict | None) -> dict:
        step_records = [r for r in self.run.metrics() if r.get("kind") == "train"]  # a resumed run's too
        peak = max(step_records, key=lambda r: r.get(memory.TOTAL, 0), default={})
        primary = self.run.summary["primary_metric"]
        judge = self.judge
        telemetry = [cb.summary() for cb in self.method_callbacks if hasattr(cb, "summary")]  # a method's own
        return self._update(
            status="stopped" if recorder.stopped else "completed",
            finished_at=time.time(),
            steps=trainer.state.global_step,
            optimizer=self.optimizer_name,
            metrics=metrics,
            gain=metrics["validation"][primary] - base_metrics["validation"][primary] if metrics else None,
            judge_run=judge.id if judge else None,
            judge_accuracy=judge.summary["metrics"]["validation"]["accuracy"] if judge else None,
            training_memory_bytes=peak.get(memory.TOTAL),
            memory_breakdown={key: peak[key] for key, _ in memory.MEMORY_PARTS if key in peak},
            peak_rss_bytes=max((r.get("rss_bytes", 0) for r in step_records), default=None),
            cuda_peak_bytes=max((r.get("cuda_peak_bytes") or 0 for r in step_records), default=0) or None,
            median_step_time_s=statistics.median(r["step_time_s"] for r in step_records) if step_records else None,
            adapter_size_bytes=_dir_size(self.run.adapter_dir),
            **self.phases.finish(),
            **{key: value for figures in telemetry for key, value in figures.items()},
        )
