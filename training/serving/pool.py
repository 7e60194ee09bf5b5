"""Serving many runs at once: one base model per (task, model, quantization, precision, attention
kernel) in memory, each run's adapter attached to it on demand, so comparing eight runs costs one
base model, not eight. Every answer is computed in the precision and with the attention kernel its
run trained with (the base's: this machine's `auto` for a run at the task's default settings)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from lora_methods import Task, get_method
from training.core import compute
from training.core.compute import Attention, Precision
from training.core.config import TASK_DEFAULTS
from training.core.inference import LoadedRun, check_adapter, load_run, run_attention, run_precision
from training.core.models import load_model, load_tokenizer, resolve_model_path
from training.core.offline import is_offline
from training.core.runs import Run


class _BaseKey(NamedTuple):
    task: Task
    model: str  # its path
    quantized: bool
    precision: Precision
    attention: Attention | None  # None: the model's default
    adapter_type: str | None  # None: no adapter loaded yet


@dataclass
class _SharedBase:
    """One base model in memory with every adapter loaded onto it so far (PEFT multi-adapter)."""

    model: torch.nn.Module  # a PeftModel once the first adapter is loaded; the plain base before
    tokenizer: PreTrainedTokenizerBase
    precision: Precision
    adapters: set[str]


class AdapterPool:
    """Serves any number of runs side by side without a model copy per run.

    Runs that share a base model, its quantization and their adapter type (LoRA and HiRA are
    different PEFT tuners) share one base with their adapters swapped in by name; the base model's
    own answer comes from the same object with adapters disabled. Full fine-tuning runs are whole
    models and are kept, two at most, by themselves.
    """

    FULL_MODELS_KEPT = 2

    def __init__(self) -> None:
        self._bases: dict[_BaseKey, _SharedBase] = {}
        self._full: dict[str, LoadedRun] = {}
        self._finished_at: dict[str, float | None] = {}  # each loaded run's, as it was when loaded
        self._lock = threading.RLock()  # PEFT's active adapter is per model: one request at a time

    def _base(self, key: _BaseKey) -> _SharedBase:
        if key not in self._bases:
            plain = key._replace(adapter_type=None)
            if key.adapter_type is not None and plain in self._bases and not self._bases[plain].adapters:
                self._bases[key] = self._bases.pop(plain)  # adapters go onto the base already loaded
            else:
                tokenizer = load_tokenizer(key.model)
                torch.manual_seed(0)  # the untrained head of a classifier base is the same every time
                model = load_model(key.model, key.task, tokenizer, key.quantized, key.precision, key.attention)
                compute.prepare_for_inference(model, key.precision)
                self._bases[key] = _SharedBase(model, tokenizer, key.precision, set())
        return self._bases[key]

    def base_for_task(self, task: Task, model_path: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, Precision]:
        """The unadapted base (adapters disabled where the shared base carries some): one already in
        memory at full width, else loaded in this machine's `auto` precision and attention kernel."""
        with self._lock:
            for key, shared in self._bases.items():
                if key.task == task and key.model == model_path and not key.quantized:
                    return shared.model, shared.tokenizer, shared.precision
            # as a run of the task at its default settings computes, so that such runs' adapters share it
            precision = compute.resolve_precision("auto")[0]
            attention = compute.resolve_attention("auto", precision, TASK_DEFAULTS[task]["seq_len"])[0]
            shared = self._base(_BaseKey(task, model_path, False, precision, attention, None))
            return shared.model, shared.tokenizer, shared.precision

    def _adapter(self, run: Run) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, Precision, str | None]:
        """(model, tokenizer, precision, adapter name) ready to serve `run`; full fine-tuning has no
        adapter name."""
        config = run.config
        method = get_method(config["method"])
        check_adapter(run)
        finished_at = run.summary.get("finished_at")
        if self._finished_at.setdefault(run.id, finished_at) != finished_at:
            self.forget(run.id)  # it was resumed since it was loaded: its adapter on disk is newer
            self._finished_at[run.id] = finished_at
        if method.saves_full_model:
            if run.id not in self._full:
                while len(self._full) >= self.FULL_MODELS_KEPT:
                    self._full.pop(next(iter(self._full)))
                self._full[run.id] = load_run(run)
            loaded = self._full[run.id]
            return loaded.model, loaded.tokenizer, loaded.precision, None
        adapter_type = json.loads((run.adapter_dir / "adapter_config.json").read_text())["peft_type"]
        model_path = resolve_model_path(config["model"], offline=is_offline(config.get("offline", False)))
        key = _BaseKey(
            config["task"], model_path, method.quantize_base, run_precision(run), run_attention(run), adapter_type
        )
        shared = self._base(key)
        if run.id not in shared.adapters:
            if shared.adapters:
                shared.model.load_adapter(str(run.adapter_dir), adapter_name=run.id)
            else:
                shared.model = PeftModel.from_pretrained(shared.model, str(run.adapter_dir), adapter_name=run.id)
            shared.model.eval()
            shared.adapters.add(run.id)
        shared.model.set_adapter(run.id)
        return shared.model, shared.tokenizer, shared.precision, run.id

    def loaded(self) -> dict[str, list]:
        """What is in memory: each shared base model (task, model path, whether 4-bit, precision,
        attention kernel, adapter type and the runs whose adapters it carries, sorted) and the ids
        of the full fine-tuned models kept."""
        with self._lock:
            bases = [{**key._asdict(), "runs": sorted(shared.adapters)} for key, shared in self._bases.items()]
            return {"bases": bases, "full_models": list(self._full)}

    def forget(self, run_id: str) -> None:
        """Unload a run's adapter (its run was deleted, or resumed)."""
        with self._lock:
            self._finished_at.pop(run_id, None)
            self._full.pop(run_id, None)
            for key, shared in list(self._bases.items()):
                if shared.adapters == {run_id}:
                    del self._bases[key]  # its last adapter: free the base too
                elif run_id in shared.adapters:
                    shared.model.delete_adapter(run_id)
                    shared.adapters.discard(run_id)

    @contextmanager
    def serving(self, run: Run | None, task: Task, model_path: str | None = None, merged: bool = False):
        """The model, tokenizer and compute precision for `run` (None: the base at `model_path`), exclusively.

        `merged` folds the adapter into the base weights for the duration, for methods that merge
        (FineTuningMethod.merge_blocker: exact on a full-precision base, lossy into 4-bit weights)."""
        with self._lock:
            if run is None:
                model, tokenizer, precision = self.base_for_task(task, model_path)
                context = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
                with context:
                    yield model, tokenizer, precision
                return
            model, tokenizer, precision, adapter = self._adapter(run)
            if merged and adapter is not None and get_method(run.config["method"]).merge_blocker is None:
                # Unmerging in bf16 rounds twice and would not give the shared base its weights back
                # exactly: the adapted layers' weights are restored from a copy instead.
                kept = [(p, p.detach().clone()) for name, p in model.named_parameters() if ".base_layer." in name]
                model.merge_adapter([adapter])
                try:
                    yield model, tokenizer, precision
                finally:
                    model.unmerge_adapter()
                    with torch.no_grad():
                        for parameter, original in kept:
                            parameter.copy_(original)
            else:
                yield model, tokenizer, precision
