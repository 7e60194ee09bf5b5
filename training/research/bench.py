"""Speed benchmark: several methods (each at one or more precisions and attention kernels) on the
same model, data, batches and seed, in one process, steps interleaved (A B A B ...) after a warm-up,
so machine noise hits every contender alike. A step is the engine's: the same precision handling
(frozen weights stored in the compute dtype, autocast) and, for a causal LM, logits only where the
loss reads them.

Yields one record per entry (median step time, tokens/s, speed ratio against the first entry,
and where its memory goes: weights, trainable parameters, gradients, optimizer state, the
activations saved for the backward pass) and, with `train_steps`, trains each entry to the same
budget through the engine and adds its quality metric.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from transformers import set_seed

from lora_methods import Task, get_method
from training.core import compute, data, environment, memory, models
from training.core.compute import Precision
from training.core.config import TASK_DEFAULTS, TrainConfig
from training.core.offline import is_offline
from training.core.runs import RunStore
from training.engine import train


@dataclass(frozen=True)
class Workload:
    """What a measurement runs on: task, model, dataset and batch shape, defaults filled in."""

    task: Task
    model: str
    dataset: str
    model_path: str
    batch_size: int
    seq_len: int
    offline: bool

    @classmethod
    def resolve(
        cls,
        task: Task,
        model: str | None = None,
        dataset: str | None = None,
        batch_size: int | None = None,
        seq_len: int | None = None,
        offline: bool = False,
    ) -> Workload:
        offline = is_offline(offline)
        model = model or models.default_model(task, offline)
        return cls(
            task,
            model,
            dataset or data.default_dataset(task, offline),
            models.resolve_model_path(model, offline),
            batch_size or TASK_DEFAULTS[task]["batch_size"],
            seq_len or TASK_DEFAULTS[task]["seq_len"],
            offline,
        )

    def batches(self, tokenizer, count: int) -> list[dict]:
        """The first `count` batches of the training split, in order (fewer if it is short)."""
        splits = data.load_splits(self.dataset, self.task, self.offline)
        train_split = splits.train.select(range(min(len(splits.train), self.batch_size * count)))
        records = data.tokenize(train_split, tokenizer, self.task, self.seq_len)
        collate = data.collator(tokenizer, self.task)
        rows = [records[i] for i in range(len(records))]
        size = self.batch_size
        batches = [collate(rows[i : i + size]) for i in range(0, len(rows) - size + 1, size)]
        if not batches:
            raise ValueError(f"the training split has fewer than {size} examples")
        return batches


@dataclass(frozen=True)
class Entry:
    """One contender: a method under a label (e.g. `lora-r32`) with its hyperparameters."""

    label: str
    method: str
    hparams: Mapping[str, Any] = field(default_factory=dict)


class _Contender:
    """One entry's model and optimizer at one precision and attention kernel, stepping on shared batches."""

    def __init__(
        self,
        entry: Entry,
        precision: Precision,
        attention: compute.Attention | None,
        logits: str,
        task: Task,
        model_path: str,
        tokenizer,
        seed: int,
    ):
        self.entry, self.method, self.precision, self.logits = entry, get_method(entry.method), precision, logits
        self.trims_logits = task == "generation" and logits == "read"
        self.hparams = self.method.resolve_hparams(entry.hparams)
        set_seed(seed)
        model = models.load_model(model_path, task, tokenizer, self.method.quantize_base, precision, attention)
        self.attention = models.attention_kernel(model)
        models.keep_4bit_layers_trainable(model)
        self.model = self.method.apply(model, task, self.hparams)
        compute.store_frozen_weights(self.model, precision)
        self.weight_bytes = models.weight_memory_bytes(self.model)  # adapters included
        self.model.train()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.hparams["learning_rate"])
        self.times: list[float] = []

    def _inputs(self, batch: dict) -> dict:
        device = next(self.model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        return compute.logits_where_read(batch) if self.trims_logits else batch

    def _loss(self, batch: dict) -> torch.Tensor:
        with compute.autocast(self.precision, self.model):
            return self.model(**self._inputs(batch)).loss

    def step(self, batch: dict, record: bool) -> None:
        synchronize = torch.cuda.synchronize if environment.has_cuda() else (lambda: None)
        synchronize()
        started = time.perf_counter()
        self._loss(batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        if record:
            self.times.append(time.perf_counter() - started)

    def memory(self, batch: dict) -> dict[str, int]:
        """Where a training step's memory goes (training.core.memory): weights, gradients, optimizer
        state and the activations one forward on `batch` saves for the backward pass."""
        meter = memory.ActivationMeter(self.model)
        with meter.measuring():
            loss = self._loss(batch)
        del loss
        figures = memory.breakdown(self.model, self.weight_bytes, self.optimizer, meter.bytes)
        return {key: figures[key] for key, _ in memory.MEMORY_PARTS}

    def cuda_step_bytes(self, batch: dict) -> int | None:
        """The GPU memory one training step of this contender takes at its peak beyond what was
        allocated before it: every contender's weights and optimizer state stay resident in a
        bench, so the process-wide peak would be the largest contender's, not this one's."""
        if not environment.has_cuda():
            return None
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        self.step(batch, record=False)
        return torch.cuda.max_memory_allocated() - resident


def run_bench(
    task: Task,
    entries: list[Entry],
    steps: int,
    warmup: int = 3,
    batch_size: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    offline: bool = False,
    model: str | None = None,
    dataset: str | None = None,
    train_steps: int | None = None,
    runs_dir: str | None = None,
    precisions: tuple[str, ...] = ("auto",),
    logits: tuple[str, ...] = ("read",),
    attentions: tuple[str, ...] = ("auto",),
) -> Iterator[dict]:
    """Time `entries` side by side, each at every one of `precisions` (`auto` resolved for this
    machine), with every one of the `attentions` kernels (`auto` resolved for the precision and
    sequence length, as training does) and, for a causal LM, with its logits computed where the
    loss reads them (`read`, what training does) or at every position (`all`, what the model does
    by default); the first combination is the baseline of the speed ratios."""
    for precision in precisions:
        refusal = compute.precision_refusal(precision)
        if refusal:
            raise ValueError(refusal)
    resolved = list(dict.fromkeys(compute.resolve_precision(precision)[0] for precision in precisions))
    workload = Workload.resolve(task, model, dataset, batch_size, seq_len, offline)
    tokenizer = models.load_tokenizer(workload.model_path)
    batches = workload.batches(tokenizer, steps + warmup)
    contenders = [
        _Contender(entry, precision, attention, mode, task, workload.model_path, tokenizer, seed)
        for entry in entries
        for precision in resolved
        for attention in dict.fromkeys(
            compute.resolve_attention(requested, precision, workload.seq_len)[0] for requested in attentions
        )
        for mode in logits
    ]
    for round_index in range(warmup + steps):
        batch = batches[round_index % len(batches)]
        for contender in contenders:
            contender.step(batch, record=round_index >= warmup)
    timed = [batches[index % len(batches)]["attention_mask"] for index in range(warmup, warmup + steps)]
    tokens = statistics.mean(int(mask.sum()) for mask in timed)
    padding = statistics.median(float((mask == 0).float().mean()) for mask in timed)
    for contender in contenders:
        yield _speed_record(workload, contender, contenders[0], tokens, padding, batches[0], steps, warmup)
    del contenders  # free the timed models before the training runs load theirs
    if train_steps:
        store = RunStore(runs_dir)
        for entry in entries:
            for precision in resolved:
                yield _trained_record(workload, entry, precision, train_steps, seed, store)


def _speed_record(
    workload: Workload,
    contender: _Contender,
    baseline: _Contender,
    tokens: float,
    padding: float,
    batch: dict,
    steps: int,
    warmup: int,
) -> dict:
    """One contender's timing and memory; `tokens` is the batches' mean real tokens, `padding`
    their median share of pad tokens (what SparseLoRA's exact padding skip can save)."""
    median = statistics.median(contender.times)
    telemetry = contender.method.telemetry(contender.model)
    return {
        "task": workload.task,
        "model": workload.model,
        "dataset": workload.dataset,
        "label": contender.entry.label,
        "method": contender.entry.method,
        "precision": contender.precision,
        "attention": contender.attention,
        "logits": contender.logits if workload.task == "generation" else None,
        "batch_size": workload.batch_size,
        "seq_len": workload.seq_len,
        "steps": steps,
        "warmup": warmup,
        "median_step_s": median,
        "quartiles_step_s": statistics.quantiles(contender.times, n=4) if len(contender.times) > 1 else None,
        "tokens_per_s": tokens / median,
        "padding_share": padding,
        "baseline": baseline.entry.label,
        "baseline_precision": baseline.precision,
        "baseline_attention": baseline.attention,
        "baseline_logits": baseline.logits if workload.task == "generation" else None,
        "speedup_vs_baseline": statistics.median(baseline.times) / median,
        "flops_ratio_vs_lora": telemetry.get("flops_ratio_vs_lora"),
        "exact_skip_share": telemetry.get("exact_skip_share"),
        "estimator_recall": telemetry.get("estimator_recall"),
        "memory": contender.memory(batch),
        "process_rss_bytes": psutil.Process().memory_info().rss,
        "allocator": environment.allocator(),
        "cuda_step_bytes": contender.cuda_step_bytes(batch),
        "hparams": contender.hparams,
    }


def _trained_record(
    workload: Workload, entry: Entry, precision: Precision, train_steps: int, seed: int, store: RunStore
) -> dict:
    """Train `entry` to `train_steps` at `precision` through the engine, on the benchmark's workload."""
    summary = train(
        TrainConfig(
            task=workload.task,
            method=entry.method,
            model=workload.model,
            dataset=workload.dataset,
            hparams=dict(entry.hparams),
            max_steps=train_steps,
            batch_size=workload.batch_size,
            seq_len=workload.seq_len,
            precision=precision,
            seed=seed,
            offline=workload.offline,
            control_samples=0,
        ),
        store,
    )
    return {
        "task": workload.task,
        "label": entry.label,
        "method": entry.method,
        "precision": precision,
        "attention": summary["attention"],
        "train_steps": train_steps,
        "status": summary["status"],
        "validation": summary["metrics"]["validation"],
        "test": summary["metrics"]["test"],
        "median_step_time_s": summary["median_step_time_s"],
        "sparsity": summary.get("sparsity"),
    }
