"""Speed benchmark: several methods on the same model, data, batches and seed, in one process,
steps interleaved (A B A B ...) after a warm-up, so machine noise hits every method alike.

Prints one JSON line per method (median step time, tokens/s, speed ratio against the first
method) and, with `train_steps`, trains each method to the same budget through the engine and
adds its quality metric.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator, Mapping
from typing import Any

import psutil
import torch
from transformers import set_seed

from lora_methods import Task, get_method

from . import data, models
from .engine import TASK_DEFAULTS, TrainConfig, train
from .offline import is_offline
from .runs import RunStore


def _batches(
    task: Task, dataset_id: str, offline: bool, tokenizer, batch_size: int, seq_len: int, count: int
) -> list[dict]:
    splits = data.load_splits(dataset_id, task, offline)
    records = data.tokenize(
        splits.train.select(range(min(len(splits.train), batch_size * count))), tokenizer, task, seq_len
    )
    collate = data.collator(tokenizer, task)
    rows = [records[i] for i in range(len(records))]
    batches = [collate(rows[i : i + batch_size]) for i in range(0, len(rows) - batch_size + 1, batch_size)]
    if not batches:
        raise ValueError(f"the training split has fewer than {batch_size} examples")
    return batches


class _Contender:
    """One method's model and optimizer, stepping on shared batches."""

    def __init__(self, name: str, task: Task, model_path: str, tokenizer, hparams: Mapping[str, Any], seed: int):
        self.name, self.method = name, get_method(name)
        self.hparams = self.method.resolve_hparams(hparams)
        set_seed(seed)
        model = models.load_model(model_path, task, tokenizer, quantize_4bit=self.method.quantize_base)
        models.keep_4bit_layers_trainable(model)
        self.model = self.method.apply(model, task, self.hparams)
        self.model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=self.hparams["learning_rate"])
        self.times: list[float] = []

    def step(self, batch: dict, record: bool) -> None:
        synchronize = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        device = next(self.model.parameters()).device
        batch = {key: value.to(device) for key, value in batch.items()}
        synchronize()
        started = time.perf_counter()
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize()
        if record:
            self.times.append(time.perf_counter() - started)


def run_bench(
    task: Task,
    methods: list[str],
    steps: int,
    warmup: int = 3,
    batch_size: int | None = None,
    seq_len: int | None = None,
    seed: int = 0,
    offline: bool = False,
    model: str | None = None,
    dataset: str | None = None,
    hparams: Mapping[str, Mapping[str, Any]] | None = None,
    train_steps: int | None = None,
    runs_dir: str | None = None,
) -> Iterator[dict]:
    hparams = hparams or {}
    offline = is_offline(offline)
    batch_size = batch_size or TASK_DEFAULTS[task]["batch_size"]
    seq_len = seq_len or TASK_DEFAULTS[task]["seq_len"]
    model_id = model or models.default_model(task, offline)
    dataset_id = dataset or data.default_dataset(task, offline)
    model_path = models.resolve_model_path(model_id, offline)
    tokenizer = models.load_tokenizer(model_path)
    batches = _batches(task, dataset_id, offline, tokenizer, batch_size, seq_len, steps + warmup)
    contenders = [_Contender(name, task, model_path, tokenizer, hparams.get(name, {}), seed) for name in methods]

    for round_index in range(warmup + steps):
        batch = batches[round_index % len(batches)]
        for contender in contenders:
            contender.step(batch, record=round_index >= warmup)

    tokens = statistics.mean(int(batch["attention_mask"].sum()) for batch in batches)
    baseline = statistics.median(contenders[0].times)
    for contender in contenders:
        median = statistics.median(contender.times)
        controller = getattr(contender.model, "sparsity_controller", None)
        result = {
            "task": task,
            "model": model_id,
            "dataset": dataset_id,
            "method": contender.name,
            "batch_size": batch_size,
            "seq_len": seq_len,
            "steps": steps,
            "warmup": warmup,
            "median_step_s": median,
            "quartiles_step_s": statistics.quantiles(contender.times, n=4) if len(contender.times) > 1 else None,
            "tokens_per_s": tokens / median,
            f"speedup_vs_{contenders[0].name}": baseline / median,
            "flops_ratio_vs_lora": controller.flops_ratio if controller else None,
            "estimator_recall": controller.recall if controller else None,
            "process_rss_bytes": psutil.Process().memory_info().rss,
            "cuda_peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
            "hparams": contender.hparams,
        }
        yield result
    del contenders

    if train_steps:
        store = RunStore(runs_dir)
        for name in methods:
            summary = train(
                TrainConfig(
                    task=task,
                    method=name,
                    model=model_id,
                    dataset=dataset_id,
                    hparams=dict(hparams.get(name, {})),
                    max_steps=train_steps,
                    batch_size=batch_size,
                    seq_len=seq_len,
                    seed=seed,
                    offline=offline,
                    control_samples=0,
                ),
                store,
            )
            yield {
                "task": task,
                "method": name,
                "train_steps": train_steps,
                "status": summary["status"],
                "validation": summary["metrics"]["validation"],
                "test": summary["metrics"]["test"],
                "median_step_time_s": summary["median_step_time_s"],
                "sparsity": summary.get("sparsity"),
            }
