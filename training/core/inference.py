"""Using a trained run: load its adapter onto its base model, classify text, generate text."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from lora_methods import Task, get_method
from training.core import compute
from training.core.compute import Attention, Precision
from training.core.errors import InferenceError
from training.core.models import LABELS, load_model, load_tokenizer, resolve_model_path
from training.core.offline import is_offline
from training.core.runs import Run

MAX_NEW_TOKENS = 256


def check_adapter(run: Run) -> None:
    """InferenceError unless the run has saved its adapter (a run that failed early has none)."""
    if not run.adapter_dir.exists():
        raise InferenceError(f"run {run.id} has no saved adapter yet (status: {run.status})")


def check_texts(texts: list[str], what: str, max_chars: int | None = None) -> None:
    """InferenceError if a text is empty (or, with `max_chars`, too long); `what` names it in the message."""
    if not isinstance(texts, list) or not texts:
        raise InferenceError(f"the {what} is empty; type some text")
    for text in texts:
        if not isinstance(text, str) or not text.strip():
            raise InferenceError(f"the {what} is empty; type some text")
        if max_chars is not None and len(text) > max_chars:
            raise InferenceError(f"the {what} has {len(text)} characters; at most {max_chars} are accepted")


def check_task(run_id: str, task: Task, wanted: Task) -> None:
    """InferenceError unless the run was trained for the `wanted` task (the CLI asks before loading it)."""
    if task != wanted:
        use = "classification" if wanted == "sentiment" else "generation"
        raise InferenceError(f"run {run_id} is a {task} run; {use} needs a {wanted} run")


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, seed: int = 0) -> None:
    """InferenceError naming the first sampling setting out of its range."""
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise InferenceError(f"max new tokens must be between 1 and {MAX_NEW_TOKENS} (got {max_new_tokens})")
    if not 0 <= temperature <= 5:
        raise InferenceError(f"temperature must be between 0 and 5 (got {temperature})")
    if not 0 < top_p <= 1:
        raise InferenceError(f"top_p must be in (0, 1] (got {top_p})")
    if not 0 <= seed < 2**32:
        raise InferenceError(f"seed must be between 0 and {2**32 - 1} (got {seed})")


@dataclass
class LoadedRun:
    run_id: str
    task: Task
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    precision: Precision


def run_precision(run: Run) -> Precision:
    """The precision a run trained in, which its answers are computed in (runs recorded before
    precision was a setting trained in fp32)."""
    return run.config.get("precision", "fp32")


def run_attention(run: Run) -> Attention | None:
    """The attention kernel a run trained with, which its answers are computed with: the same
    function either way, but rounding could tip a borderline answer. None (the model's default)
    for runs recorded before the kernel was chosen per run, which trained with that default."""
    return run.config.get("attention")


def load_run(run: Run, precision: Precision | None = None) -> LoadedRun:
    """The run's base model with its adapter applied (full fine-tuning: its saved model folder),
    ready for inference in `precision` (default: the run's own)."""
    config = run.config
    check_adapter(run)
    method = get_method(config["method"])
    task: Task = config["task"]
    precision = precision or run_precision(run)
    tokenizer = load_tokenizer(str(run.adapter_dir))

    def load(path: str, quantize_4bit: bool) -> torch.nn.Module:
        model = load_model(path, task, tokenizer, quantize_4bit, precision, run_attention(run))
        if Path(path) != run.adapter_dir:  # the base under a saved adapter: frozen in training, stored as then
            compute.prepare_for_inference(model, precision)
        return model  # a saved whole model: every weight trained, float32 as then

    model = method.load_trained(
        run.adapter_dir,
        lambda: resolve_model_path(config["model"], offline=is_offline(config.get("offline", False))),
        load,
    )
    model.requires_grad_(False)
    model.eval()
    return LoadedRun(run.id, task, model, tokenizer, precision)


def class_probabilities(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    precision: Precision,
    max_length: int = 256,
) -> torch.Tensor:
    check_texts(texts, "text")
    device = next(model.parameters()).device
    batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
    with compute.inference(precision, model):
        return torch.softmax(model(**batch).logits.float(), dim=-1).cpu()


def classify(loaded: LoadedRun, texts: list[str]) -> list[dict]:
    """Label and per-class probability for each text, with the batch's latency."""
    check_task(loaded.run_id, loaded.task, "sentiment")
    start = time.perf_counter()
    probabilities = class_probabilities(loaded.model, loaded.tokenizer, texts, loaded.precision)
    latency = time.perf_counter() - start
    return [
        {"label": LABELS[int(row.argmax())], "probabilities": dict(zip(LABELS, row.tolist())), "latency_s": latency}
        for row in probabilities
    ]


def sample(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    *,
    precision: Precision,
    max_new_tokens: int = 48,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
) -> list[str]:
    """Continuations of `prompts` (the prompt itself is not repeated). temperature 0 means greedy."""
    check_texts(prompts, "prompt")
    check_sampling(max_new_tokens, temperature, top_p, seed)
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
    with compute.inference(precision, model):
        output = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    model.train(was_training)
    return tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)


def generate(loaded: LoadedRun, prompts: list[str], **sampling) -> list[dict]:
    check_task(loaded.run_id, loaded.task, "generation")
    start = time.perf_counter()
    texts = sample(loaded.model, loaded.tokenizer, prompts, precision=loaded.precision, **sampling)
    latency = time.perf_counter() - start
    return [{"text": text, "latency_s": latency} for text in texts]
