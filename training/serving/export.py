"""Taking a run home: its adapter (or, for full fine-tuning, its model) as one folder or .zip with
a Hugging Face model card, the adapter merged into its base, and an upload to the Hub.

Nothing here writes to the run store: an export goes where the caller says. The app reaches this
module through `ui.arena.Arena` and it never imports a UI. A Hub token given to `push_run` serves
that one upload and is kept nowhere: not in a file, a log line or an error message.

An export folder (and the single top folder of its .zip):
  adapter_config.json, adapter_model.safetensors   the PEFT adapter (merged / full: config.json,
                                                   model.safetensors)
  tokenizer files
  README.md        the model card: YAML front matter, how it was trained, its figures, how to load it
  run/config.json  the run's configuration (minus who started it and server paths)
  run/summary.json the run's figures as the run store holds them
The run's files sit in run/ because a model folder's own config.json is the model's.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lora_methods import FineTuningMethod, get_method
from training.core import offline
from training.core.config import ConfigError, TrainConfig, command_line
from training.core.errors import InferenceError
from training.core.inference import check_adapter, load_run
from training.core.memory import MB
from training.core.metrics import metric_text
from training.core.models import BUNDLED_SMOLLM2, CATALOG, LABELS
from training.core.runs import Run, write_json_atomic

EXPORTABLE = ("completed", "stopped")
RUN_FOLDER = "run"
# Who started the run (a hash of a browser's token) and paths on the server: not for sharing.
PRIVATE_FIELDS = ("owner", "model_path")
STORED_SUFFIXES = (".safetensors", ".bin")  # weights barely compress: deflating them only costs time
HUB_NAME_PART = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
PIPELINES = {"sentiment": "text-classification", "generation": "text-generation"}
TASK_TAGS = {"sentiment": "sentiment-analysis", "generation": "text-generation"}
AUTO_CLASSES = {"sentiment": "AutoModelForSequenceClassification", "generation": "AutoModelForCausalLM"}
OFFLINE_PUSH = (
    "pushing needs the Hugging Face Hub, which this server cannot reach (it runs offline); download the "
    "archive and upload it from a machine that is online: `hf upload OWNER/NAME UNPACKED_FOLDER`"
)


# -- what may be exported ----------------------------------------------------------------------


def check_exportable(run: Run) -> None:
    """Raise InferenceError unless the run has finished (completed or stopped) with a saved adapter."""
    status = run.status
    if status == "running":
        raise InferenceError(
            f"run {run.id} is still training; it can be downloaded once it has finished or been stopped"
        )
    if status not in EXPORTABLE:
        raise InferenceError(
            f"run {run.id} ended {status}: only completed or stopped runs can be exported (resume it first)"
        )
    check_adapter(run)


def check_mergeable(run: Run) -> None:
    """Raise InferenceError with the method's own reason when its result cannot be merged."""
    blocker = get_method(run.config["method"]).merge_blocker
    if blocker:
        raise InferenceError(f"run {run.id} cannot be exported merged: {blocker}")


def _check(run: Run, merged: bool) -> None:
    check_exportable(run)
    if merged:
        check_mergeable(run)


def _hub_name(name: str | None) -> bool:
    """`owner/name` as the Hub spells repository ids (a shape check; the Hub has the last word)."""
    if not name or "--" in name or ".." in name or name.endswith(".git"):
        return False
    parts = name.split("/")
    return len(parts) == 2 and all(HUB_NAME_PART.match(part) for part in parts)


def check_repo_id(repo_id: str | None) -> str:
    """The repository id, stripped; ConfigError when it is not `owner/name` in the Hub's alphabet."""
    repo_id = (repo_id or "").strip()
    if not _hub_name(repo_id):
        raise ConfigError(
            f"{repo_id!r} is not a Hub repository name: write owner/name (your user or organisation, then "
            "the model's name; letters, digits, '-', '_' and '.', at most 96 each, no '--' or '..')"
        )
    return repo_id


def check_token(token: str | None) -> str:
    """The token, stripped; ConfigError (which never repeats it) when it cannot be one."""
    token = (token or "").strip()
    if not token:
        raise ConfigError(
            "pushing needs a Hugging Face access token with write permission (huggingface.co/settings/tokens); "
            "it is used for this upload only and kept nowhere"
        )
    if len(token) < 8 or any(character.isspace() for character in token):
        raise ConfigError("that is not a Hugging Face access token (one word of at least 8 characters)")
    return token


# -- the model card ---------------------------------------------------------------------------


def base_model_hub_id(model: str | None) -> str | None:
    """The Hub model a run's base is (a bundled copy names its origin); None for a local folder."""
    entry = next((entry for entry in CATALOG if entry.id == model), None)
    if entry is not None:
        return entry.hub_id or (None if entry.bundled else entry.id)
    return model if _hub_name(model) and not Path(model).exists() else None


def _shown_name(value: str | None) -> str:
    """A catalog or Hub id as it is; a server path reduced to its last part."""
    if not value:
        return "unknown"
    return Path(value).name if Path(value).is_absolute() or Path(value).exists() else value


def _front_matter(config: dict, method: FineTuningMethod, merged: bool) -> str:
    whole_model = merged or method.saves_full_model
    task = config["task"]
    lines = ["---"]
    base = base_model_hub_id(config.get("model"))
    if base:
        lines.append(f"base_model: {base}")
    lines.append(f"library_name: {'transformers' if whole_model else 'peft'}")
    lines.append(f"pipeline_tag: {PIPELINES[task]}")
    tags = ["lora-arena", method.name, TASK_TAGS[task], *([] if whole_model else ["peft"])]
    lines += ["tags:", *(f"- {tag}" for tag in tags + (["merged"] if merged else []))]
    dataset = config.get("dataset")
    if _hub_name(dataset) and not str(dataset).startswith("bundled/"):
        lines += ["datasets:", f"- {dataset}"]
    return "\n".join([*lines, "---"])


def _base_text(config: dict) -> str:
    model = config.get("model")
    entry = next((entry for entry in CATALOG if entry.id == model), None)
    if entry is not None and entry.bundled and entry.hub_id:
        return f"`{entry.hub_id}` (the copy bundled with LoRA Arena, `{model}`)"
    if base_model_hub_id(model):
        return f"`{model}`"
    return f"a local model folder, `{_shown_name(model)}`"


def _intro(run: Run, config: dict, summary: dict, method: FineTuningMethod, merged: bool) -> str:
    what = {"sentiment": "sentiment classification (negative / positive)", "generation": "text generation"}
    done = (
        "the adapter merged into its base" if merged else ("a whole model" if method.saves_full_model else "an adapter")
    )
    lines = [
        f"# {run.id}",
        "",
        f"**{method.title}** fine-tuning of {_base_text(config)} for {what[config['task']]}, trained with "
        f"LoRA Arena; this is {done}. {method.summary}",
    ]
    if summary.get("status") == "stopped":
        lines += ["", f"Stopped at step {summary.get('steps')} of {summary.get('planned_steps')}."]
    if config.get("model") == BUNDLED_SMOLLM2:
        converted = "The bundled SmolLM2 is converted from a Q4_1 GGUF file: on the Hub's own weights"
        lines += ["", f"{converted} the adapter behaves very nearly, not exactly, as measured here."]
    return "\n".join(lines)


def _hyperparameters(config: dict, summary: dict) -> str:
    source = ((summary.get("defaults") or {}).get("learning_rate") or {}).get("source")
    parts = []
    for name, value in (config.get("hparams") or {}).items():
        note = f" ({source})" if name == "learning_rate" and source else ""
        parts.append(f"{name} {value:g}{note}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts) or "none"


def _targets(run: Run) -> str | None:
    """The layers the adapter was attached to and those trained in full beside it (PEFT's config)."""
    path = run.adapter_dir / "adapter_config.json"
    if not path.exists():
        return None
    adapter = json.loads(path.read_text(encoding="utf-8"))
    targets = adapter.get("target_modules") or []
    text = ", ".join(sorted(targets)) if isinstance(targets, list) else str(targets)
    if adapter.get("modules_to_save"):
        text += f" (trained in full: {', '.join(adapter['modules_to_save'])})"
    return text


def _hardware(device: dict) -> str:
    if device.get("type") == "cuda":
        return f"CUDA: {device.get('name')} x{device.get('count', 1)}"
    return f"CPU ({device.get('name', '?')}, {device.get('threads', '?')} threads)"


def _figures(config: dict, summary: dict) -> list[tuple[str, str | None]]:
    """Budget, size, time and memory rows of the training table (None: not recorded)."""
    trainable, total = summary.get("trainable_params"), summary.get("total_params")
    weights, peak = summary.get("base_weight_memory_bytes"), summary.get("training_memory_bytes")
    steps = f"{summary.get('steps')} of {summary.get('planned_steps')} planned"
    budget = f"batch {config.get('batch_size')} · sequence length {config.get('seq_len')} · seed {config.get('seed')}"
    return [
        ("steps", f"{steps} · {budget}"),
        (
            "trainable parameters",
            trainable and total and f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)",
        ),
        (
            "training time",
            summary.get("wall_time_s")
            and f"{summary.get('train_time_s') or 0:.1f} s training, {summary['wall_time_s']:.1f} s in all",
        ),
        ("hardware", _hardware(config.get("device") or {})),
        # runs recorded before precision was a setting trained in fp32
        ("precision", f"{config.get('precision', 'fp32')} (trained weights float32)"),
        ("attention kernel", summary.get("attention")),  # not recorded by runs from before it was chosen
        ("memory", weights and peak and f"base weights {weights / MB:,.1f} MB, training peak {peak / MB:,.1f} MB"),
    ]


def _training_table(run: Run, config: dict, summary: dict, method: FineTuningMethod) -> str:
    sizes = config.get("dataset_sizes") or {}
    splits = " · ".join(f"{name} {count:,}" for name, count in sizes.items())
    quantized = ", base in 4-bit NF4" if method.quantize_base else ""
    versions = ", ".join(f"{name} {version}" for name, version in (config.get("versions") or {}).items())
    rows = [
        ("base model", _base_text(config)),
        ("method", f"{method.title} (`{method.name}`){quantized}"),
        ("hyperparameters", _hyperparameters(config, summary)),
        ("adapted layers", _targets(run)),
        ("dataset", f"`{_shown_name(config.get('dataset'))}`" + (f": {splits}" if splits else "")),
        *_figures(config, summary),
        ("libraries", versions),
    ]
    lines = ["## Training", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows if value]
    return "\n".join([*lines, "", "MB = 10^6 bytes; the time in all includes loading and evaluation."])


def _results(summary: dict) -> str:
    """The final figures on the whole validation and test splits beside the base model's."""
    metric = summary.get("primary_metric", "accuracy")
    metrics = summary.get("metrics") or {}
    base = (summary.get("base_metrics") or {}).get("validation") or {}
    names = [metric, *sorted(name for name in {**metrics.get("validation", {}), **base} if name != metric)]
    rows = [("validation", metrics.get("validation")), ("test", metrics.get("test")), ("base model, validation", base)]
    lines = ["## Results", "", "| split | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, figures in rows:
        if figures:
            lines.append(
                f"| {label} | " + " | ".join(metric_text(n, figures[n]) if n in figures else "" for n in names) + " |"
            )
    if not metrics:
        lines += ["", "Stopped before its final evaluation: no validation or test figures."]
    if metrics.get("control_share") is not None:
        lines += ["", f"Share of sampled reviews in the requested sentiment: {metrics['control_share']:.3f}."]
    note = "the base model with its new, untrained classification head" if metric == "accuracy" else "the base model"
    return "\n".join([*lines, "", f"The last row is {note}, measured on validation only."])


def _usage(run: Run, method: FineTuningMethod, merged: bool, location: str) -> str:
    task, auto = run.config["task"], AUTO_CLASSES[run.config["task"]]
    if merged or method.saves_full_model:
        load = f'model = {auto}.from_pretrained("{location}")'
        code = [f"from transformers import {auto}", load]
    else:
        base = base_model_hub_id(run.config.get("model")) or f"path/to/{_shown_name(run.config.get('model'))}"
        labels = ", num_labels=2" if task == "sentiment" else ""
        load = f'model = PeftModel.from_pretrained({auto}.from_pretrained("{base}"{labels}), "{location}")'
        code = ["from peft import PeftModel", f"from transformers import {auto}", load]
    lines = ["## Use it", "", "```python", *code, "```", ""]
    lines.append(f'The tokenizer is saved beside it: `AutoTokenizer.from_pretrained("{location}")`.')
    if task == "sentiment":
        lines.append(f"Label 0 is {LABELS[0]}, 1 is {LABELS[1]}.")
    if method.quantize_base and not merged:
        nf4 = 'BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)'
        lines += ["", f"It was trained on the base loaded in 4-bit (`{nf4}`): load it so to reproduce its figures."]
    again = command_line(train_config(run))
    files = f"`{RUN_FOLDER}/config.json` holds its whole configuration, `{RUN_FOLDER}/summary.json` its figures"
    lines += ["", f"Train it again with LoRA Arena: `{again}`. {files}."]
    return "\n".join(lines)


def model_card(run: Run, merged: bool = False, location: str | None = None) -> str:
    """The README.md of an export: Hub front matter, then the run's story and how to load it from
    `location` (a repository id or a folder; default: the export's own folder name)."""
    config, summary = run.config, run.summary
    method = get_method(config["method"])
    location = location or f"./{export_name(run, merged)}"
    sections = [
        _front_matter(config, method, merged),
        _intro(run, config, summary, method, merged),
        _training_table(run, config, summary, method),
        _results(summary),
        _usage(run, method, merged, location),
    ]
    return "\n\n".join(sections) + "\n"


# -- folders and archives ---------------------------------------------------------------------


def train_config(run: Run) -> TrainConfig:
    """The run's configuration as the engine takes it, without its owner or server paths."""
    return TrainConfig.from_record(_shareable_config(run.config))


def export_name(run: Run, merged: bool = False) -> str:
    return f"{run.id}-merged" if merged else run.id


def _shareable_config(config: dict) -> dict:
    kept = {key: value for key, value in config.items() if key not in PRIVATE_FIELDS}
    for key in ("model", "dataset"):
        if kept.get(key) and Path(kept[key]).is_absolute():
            kept[key] = Path(kept[key]).name
    return kept


def _point_at_hub_base(folder: Path, model: str | None) -> None:
    """The adapter's config names the base it was loaded from, a path on this server: name the
    Hub model instead where it is known, so `AutoPeftModel` finds it on another machine."""
    path, hub_id = folder / "adapter_config.json", base_model_hub_id(model)
    if path.exists() and hub_id:
        adapter = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps({**adapter, "base_model_name_or_path": hub_id}, indent=2), encoding="utf-8")


def _write_model(run: Run, folder: Path, merged: bool) -> None:
    if not merged:
        shutil.copytree(run.adapter_dir, folder, dirs_exist_ok=True)
        _point_at_hub_base(folder, run.config.get("model"))
        return
    loaded = load_run(run, precision="fp32")  # the merged weights in full precision, whatever it trained in
    model = loaded.model.merge_and_unload()  # the base weights with the update folded in, no PEFT left
    model.save_pretrained(folder)  # safetensors
    loaded.tokenizer.save_pretrained(folder)


def write_export(run: Run, target: Path, merged: bool = False, location: str | None = None) -> Path:
    """Write the run's export into the new folder `target` (see the module's docstring); a failure
    leaves nothing behind. Refused (nothing written): an unfinished run, merging a method that does
    not merge, an existing non-empty `target`."""
    _check(run, merged)
    target = Path(target)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"{target} already exists and is not empty; choose another place")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        _write_model(run, staging, merged)
        (staging / RUN_FOLDER).mkdir()
        write_json_atomic(staging / RUN_FOLDER / "config.json", _shareable_config(run.config))
        write_json_atomic(staging / RUN_FOLDER / "summary.json", {k: v for k, v in run.summary.items() if k != "pid"})
        (staging / "README.md").write_text(model_card(run, merged, location or f"./{target.name}"), encoding="utf-8")
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def write_archive(folder: Path, archive: Path) -> Path:
    """`folder` as a .zip whose one top folder bears its name, so unpacking never scatters files;
    written under a temporary name and renamed, so a reader never sees half an archive."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=archive.parent, prefix=f".{archive.name}.")
    os.close(handle)
    try:
        with zipfile.ZipFile(partial, "w") as bundle:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    packing = zipfile.ZIP_STORED if path.suffix in STORED_SUFFIXES else zipfile.ZIP_DEFLATED
                    bundle.write(path, Path(folder.name) / path.relative_to(folder), compress_type=packing)
        os.replace(partial, archive)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return archive


def export_to(run: Run, target: Path, merged: bool = False) -> Path:
    """The export as the folder `target`, or as an archive when `target` ends in .zip."""
    target = Path(target)
    if target.suffix.lower() in (".tar", ".gz", ".tgz", ".bz2", ".xz", ".7z", ".rar"):
        raise ConfigError(
            f"{target.name}: the export is a folder or a .zip archive; give a folder or a name ending .zip"
        )
    if target.suffix.lower() != ".zip":
        return write_export(run, target, merged)
    if target.exists():
        raise ConfigError(f"{target} already exists; choose another name")
    _check(run, merged)  # before any temporary folder
    with tempfile.TemporaryDirectory(prefix="lora-arena-export-") as work:
        return write_archive(write_export(run, Path(work) / target.stem, merged), target)


# One lock per archive name: two pages asking for the same run at once get the one archive, built
# once, and neither removes the other's half-written slot as stale.
_ARCHIVE_LOCKS: dict[str, threading.Lock] = {}
_ARCHIVE_LOCKS_GUARD = threading.Lock()


def archive(run: Run, exports: Path, merged: bool = False) -> Path:
    """The run's export as `<run id>[-merged].zip` under `exports`, built once per finished state of
    the run (a run resumed and finished again gets a new one, and its old one goes)."""
    _check(run, merged)
    name = export_name(run, merged)
    slot = Path(exports) / f"{name}@{str(run.summary.get('finished_at', 0)).replace('.', '-')}"
    target = slot / f"{name}.zip"
    with _ARCHIVE_LOCKS_GUARD:
        lock = _ARCHIVE_LOCKS.setdefault(str(slot.parent / name), threading.Lock())
    with lock:
        if target.exists():
            return target
        for stale in Path(exports).glob(f"{name}@*"):
            shutil.rmtree(stale, ignore_errors=True)
        return export_to(run, target, merged)


# -- the Hub ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadPlan:
    """What an upload sends and where; nothing has left the machine when one exists."""

    repo_id: str
    folder: Path
    files: tuple[str, ...]
    card: str
    commit_message: str
    private: bool = True
    repo_type: str = "model"


def plan_upload(run: Run, repo_id: str, staging: Path, merged: bool = False) -> UploadPlan:
    """Write the export into `staging` (its model card loads from `repo_id`) and say what would go up."""
    repo_id = check_repo_id(repo_id)
    folder = write_export(run, Path(staging) / export_name(run, merged), merged, location=repo_id)
    files = tuple(str(path.relative_to(folder)) for path in sorted(folder.rglob("*")) if path.is_file())
    message = f"LoRA Arena run {run.id}: {'merged ' if merged else ''}{run.config['method']}"
    return UploadPlan(repo_id, folder, files, (folder / "README.md").read_text(encoding="utf-8"), message)


def _upload(plan: UploadPlan, token: str) -> str:
    """Create the repository (private; an existing one is reused as it is) and upload the folder."""
    from huggingface_hub import HfApi  # only a push needs it

    # The endpoint is read now, not when huggingface_hub was imported: a deployment may point it elsewhere.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type=plan.repo_type)
        api.upload_folder(
            repo_id=plan.repo_id, folder_path=plan.folder, repo_type=plan.repo_type, commit_message=plan.commit_message
        )
    except Exception as error:  # the network or the Hub said no: tell it, without the token or its traceback
        reason = (str(error) or type(error).__name__).replace(token, "[token]")
        raise InferenceError(f"the upload to {plan.repo_id} failed: {reason}") from None
    return str(url)


def push_run(run: Run, repo_id: str, token: str, merged: bool = False) -> dict:
    """Upload the run's export with its model card to the private Hub repository `repo_id`. Every
    input is checked before anything is written; the token is used for this call only."""
    repo_id, token = check_repo_id(repo_id), check_token(token)
    _check(run, merged)
    if offline.is_offline():
        raise ConfigError(OFFLINE_PUSH)
    with tempfile.TemporaryDirectory(prefix="lora-arena-push-") as staging:
        plan = plan_upload(run, repo_id, Path(staging), merged)
        url = _upload(plan, token)
    return {"repo_id": repo_id, "url": url, "private": plan.private, "files": list(plan.files)}
