"""Using a trained run: load its adapter onto its base model, classify text, generate text."""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from lora_methods import Task, get_method

from .models import LABELS, load_model, load_tokenizer, resolve_model_path
from .offline import is_offline
from .runs import Run

MAX_NEW_TOKENS = 256


class InferenceError(ValueError):
    """A request that cannot be served (bad input, unusable run); the message says why."""


@dataclass
class LoadedRun:
    run_id: str
    task: Task
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase


def load_run(run: Run) -> LoadedRun:
    """The run's base model with its adapter applied (full fine-tuning: its saved model folder)."""
    config = run.config
    if not run.adapter_dir.exists():
        status = run.summary.get("status", "unknown")
        raise InferenceError(f"run {run.id} has no saved adapter (status: {status})")
    method = get_method(config["method"])
    task: Task = config["task"]
    tokenizer = load_tokenizer(str(run.adapter_dir))
    if method.saves_full_model:
        model = load_model(str(run.adapter_dir), task, tokenizer)
    else:
        base_path = resolve_model_path(config["model"], offline=is_offline(config.get("offline", False)))
        base = load_model(base_path, task, tokenizer, quantize_4bit=method.quantize_base)
        model = PeftModel.from_pretrained(base, str(run.adapter_dir))
    model.eval()
    return LoadedRun(run.id, task, model, tokenizer)


def _require_text(texts: list[str], what: str) -> None:
    if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
        raise InferenceError(f"the {what} is empty; type some text")


@torch.no_grad()
def class_probabilities(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int = 256
) -> torch.Tensor:
    _require_text(texts, "text")
    device = next(model.parameters()).device
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
    return torch.softmax(model(**batch).logits.float(), dim=-1).cpu()


def classify(loaded: LoadedRun, texts: list[str]) -> list[dict]:
    """Label and per-class probability for each text, with the batch's latency."""
    if loaded.task != "sentiment":
        raise InferenceError(f"run {loaded.run_id} is a {loaded.task} run; classification needs a sentiment run")
    start = time.perf_counter()
    probabilities = class_probabilities(loaded.model, loaded.tokenizer, texts)
    latency = time.perf_counter() - start
    return [
        {"label": LABELS[int(row.argmax())], "probabilities": dict(zip(LABELS, row.tolist())), "latency_s": latency}
        for row in probabilities
    ]


@torch.no_grad()
def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompts` (the prompt itself is not repeated). temperature 0 means greedy."""
    _require_text(prompts, "prompt")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InferenceError(f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_new_tokens})")
    if not 0 <= temperature <= 5:
        raise InferenceError(f"temperature must be between 0 and 5 (got {temperature})")
    if not 0 < top_p <= 1:
        raise InferenceError(f"top_p must be in (0, 1] (got {top_p})")
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Generation continues from the last position of every row, so pad on the left; the tokenizer
    # may be the one a training collator pads with, so its own setting is put back.
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    tokenizer.padding_side = padding_side
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
    )
    output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    model.train(was_training)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generate(loaded: LoadedRun, prompts: list[str], **sampling) -> list[dict]:
    if loaded.task != "generation":
        raise InferenceError(f"run {loaded.run_id} is a {loaded.task} run; generation needs a generation run")
    start = time.perf_counter()
    texts = sample(loaded.model, loaded.tokenizer, prompts, **sampling)
    latency = time.perf_counter() - start
    return [{"text": text, "latency_s": latency} for text in texts]


@dataclass
class _SharedBase:
    """One base model in memory with every adapter loaded onto it so far (PEFT multi-adapter)."""

    model: torch.nn.Module  # a PeftModel once the first adapter is loaded; the plain base before
    tokenizer: PreTrainedTokenizerBase
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
        self._bases: dict[tuple, _SharedBase] = {}
        self._full: dict[str, LoadedRun] = {}
        self._lock = threading.RLock()  # PEFT's active adapter is per model: one request at a time

    def _base(self, task: Task, model_path: str, quantized: bool, adapter_type: str | None) -> _SharedBase:
        key = (task, model_path, quantized, adapter_type)
        if key not in self._bases:
            plain = (task, model_path, quantized, None)
            if adapter_type is not None and plain in self._bases and not self._bases[plain].adapters:
                self._bases[key] = self._bases.pop(plain)  # adapters go onto the base already loaded
            else:
                tokenizer = load_tokenizer(model_path)
                torch.manual_seed(0)  # the untrained head of a classifier base is the same every time
                model = load_model(model_path, task, tokenizer, quantize_4bit=quantized).eval()
                self._bases[key] = _SharedBase(model, tokenizer, set())
        return self._bases[key]

    def base_for_task(self, task: Task, model_path: str) -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
        """The unadapted base (adapters disabled where the shared base carries some)."""
        with self._lock:
            for (base_task, path, quantized, _), shared in self._bases.items():
                if base_task == task and path == model_path and not quantized:
                    return shared.model, shared.tokenizer
            shared = self._base(task, model_path, False, None)
            return shared.model, shared.tokenizer

    def _adapter(self, run: Run) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str | None]:
        """(model, tokenizer, adapter name) ready to serve `run`; full fine-tuning has no adapter name."""
        config = run.config
        method = get_method(config["method"])
        if not run.adapter_dir.exists():
            raise InferenceError(f"run {run.id} has no saved adapter yet (status: {run.status})")
        if method.saves_full_model:
            if run.id not in self._full:
                while len(self._full) >= self.FULL_MODELS_KEPT:
                    self._full.pop(next(iter(self._full)))
                self._full[run.id] = load_run(run)
            loaded = self._full[run.id]
            return loaded.model, loaded.tokenizer, None
        adapter_type = json.loads((run.adapter_dir / "adapter_config.json").read_text())["peft_type"]
        model_path = resolve_model_path(config["model"], offline=is_offline(config.get("offline", False)))
        shared = self._base(config["task"], model_path, method.quantize_base, adapter_type)
        if run.id not in shared.adapters:
            if shared.adapters:
                shared.model.load_adapter(str(run.adapter_dir), adapter_name=run.id)
            else:
                shared.model = PeftModel.from_pretrained(shared.model, str(run.adapter_dir), adapter_name=run.id)
            shared.model.eval()
            shared.adapters.add(run.id)
        shared.model.set_adapter(run.id)
        return shared.model, shared.tokenizer, run.id

    def forget(self, run_id: str) -> None:
        """Unload a run's adapter (its run was deleted)."""
        with self._lock:
            self._full.pop(run_id, None)
            for key, shared in list(self._bases.items()):
                if shared.adapters == {run_id}:
                    del self._bases[key]  # its last adapter: free the base too
                elif run_id in shared.adapters:
                    shared.model.delete_adapter(run_id)
                    shared.adapters.discard(run_id)

    @contextmanager
    def serving(self, run: Run | None, task: Task, model_path: str | None = None, merged: bool = False):
        """The model and tokenizer for `run` (None: the base at `model_path`), exclusively.

        `merged` folds the adapter into the base weights for the duration, for methods that merge
        (FineTuningMethod.merge_blocker: exact on a full-precision base, lossy into 4-bit weights)."""
        with self._lock:
            if run is None:
                model, tokenizer = self.base_for_task(task, model_path)
                context = model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()
                with context:
                    yield model, tokenizer
                return
            model, tokenizer, adapter = self._adapter(run)
            if merged and adapter is not None and get_method(run.config["method"]).merge_blocker is None:
                model.merge_adapter([adapter])
                try:
                    yield model, tokenizer
                finally:
                    model.unmerge_adapter()
            else:
                yield model, tokenizer
