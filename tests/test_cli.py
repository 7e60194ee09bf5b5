"""The command line: help documents every option, bad options fail fast with one line, runs are usable."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import typing
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

import training.engine
from lora_methods import METHODS, get_method
from training.cli import build_parser, main
from training.core import environment, inference
from training.core.config import RUN_FIELDS, RunField, TrainConfig, command_line, config_from_flags, train_arguments
from training.core.runs import RunStore

ROOT = Path(__file__).resolve().parent.parent


def without_allocator_settings(environ: dict[str, str]) -> dict[str, str]:
    """The environment without what sets glibc's allocator, which would override the workers' own."""
    return {k: v for k, v in environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def cli(*args: str, runs_dir: Path) -> subprocess.CompletedProcess:
    env = {**without_allocator_settings(dict(os.environ)), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "training", "--runs-dir", str(runs_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def cli_here(capsys, *args: str, runs_dir: Path) -> subprocess.CompletedProcess:
    """`cli`, run by `main` in this process, for what needs no process of its own: the libraries
    are loaded already, so an answer takes a fraction of a second instead of seconds."""
    capsys.readouterr()
    status = main(["--runs-dir", str(runs_dir), *args])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, status, out, err)


def test_train_help_documents_every_hyperparameter(tmp_path):
    result = cli("train", "--help", runs_dir=tmp_path)
    assert result.returncode == 0
    flags = {spec.flag for method in METHODS.values() for spec in method.hparams}
    for flag in flags | {"--lr", "--max-steps", "--epochs", "--batch-size", "--seq-len", "--seed", "--offline"}:
        assert flag in result.stdout
    help_text = " ".join(result.stdout.split())  # argparse wraps the help
    # a left-out rate is the suite's tuned one where it has one: the help says so, not only the methods' own
    assert "Left out: the results suite's tuned value for the task and model" in help_text
    export = " ".join(cli("export", "--help", runs_dir=tmp_path).stdout.split())
    assert "merged into its base model (LoRA, DoRA, HiRA, SparseLoRA:" in export  # what merge_blocker allows


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "lora", "--lr", "-0.1"], "learning_rate must satisfy 0 < learning_rate"),
        (["--method", "lora", "--rank", "0"], "rank must satisfy 1 <= rank"),
        (["--method", "full", "--rank", "8"], "method 'full' does not take rank"),
        (["--method", "lora", "--dataset", "nope.csv"], "does not exist"),
    ],
)
def test_bad_options_exit_non_zero_with_one_line_and_no_run(tmp_path, args, message, capsys):
    # In this process: that a refusal loads nothing heavy is the next test's, in a process of its own.
    result = cli_here(capsys, "train", "--task", "sentiment", "--offline", *args, runs_dir=tmp_path / "runs")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "command, flags",
    [
        ("bench", ["--steps", "0"]),
        ("bench", ["--steps", "-3"]),
        ("bench", ["--warmup", "-2"]),
        ("bench", ["--train-steps", "0"]),
        ("bench", ["--batch-size", "0"]),
        ("bench", ["--seq-len", "-3"]),
        ("probe", ["--batch-size", "0"]),
        ("probe", ["--seq-len", "-3"]),
        ("probe", ["--batches", "0"]),
    ],
)
def test_bench_and_probe_refuse_a_count_below_its_minimum_by_name(tmp_path, command, flags, capsys):
    chosen = ["--methods", "lora"] if command == "bench" else []
    result = cli_here(capsys, command, "--task", "sentiment", *chosen, "--offline", *flags, runs_dir=tmp_path)
    assert result.returncode == 2 and flags[0] in result.stderr and "at least" in result.stderr


def test_probe_refuses_a_model_of_the_other_task_before_loading_it(tmp_path, capsys):
    args = ["probe", "--task", "generation", "--model", "bundled/all-MiniLM-L6-v2", "--offline"]
    result = cli_here(capsys, *args, runs_dir=tmp_path)
    assert result.returncode == 2 and "is a sentiment model, not a generation one" in result.stderr


HEAVY_LIBRARIES = (
    "peft",
    "bitsandbytes",
    "transformers.trainer",
    "transformers.modeling_utils",
    "datasets.arrow_dataset",
)


@pytest.mark.parametrize(
    "args, status, answer",
    [
        (["--help"], 0, "train one run"),
        (["list"], 0, "no runs in"),
        (["train", "--task", "sentiment", "--method", "lora", "--rank", "0", "--offline"], 2, "rank must satisfy"),
        (
            ["train", "--task", "generation", "--method", "qlora", "--lr", "-1", "--processes", "2", "--offline"],
            2,
            "learning_rate must satisfy",
        ),
    ],
)
def test_help_list_and_a_refused_setting_answer_without_loading_the_training_stack(tmp_path, args, status, answer):
    """PEFT, bitsandbytes, the Trainer and the model classes take about 7 s to import here: a user
    asking for help, a list of runs or a bad setting gets the answer without waiting for them."""
    script = (
        "import sys\nfrom training.cli import main\n"
        f"try:\n    status = main({['--runs-dir', str(tmp_path), *args]!r})\n"
        "except SystemExit as exit:\n    status = exit.code\n"
        f"print(status, [name for name in {HEAVY_LIBRARIES!r} if name in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == f"{status} []", result.stdout + result.stderr
    assert answer in result.stdout + result.stderr


def test_train_list_predict_round_trip(tmp_path, tiny_models, review_csv, capsys, monkeypatch):
    runs = tmp_path / "runs"
    train = ["train", "--task", "sentiment", "--method", "lora", "--model", tiny_models["bert"]]
    train += ["--dataset", str(review_csv), "--offline"]
    result = cli(*train, "--max-steps", "3", "--batch-size", "4", "--eval-samples", "8", "--rank", "4", runs_dir=runs)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "completed"
    (run,) = RunStore(runs).runs()
    run_dir = run.dir
    config = json.loads((run_dir / "config.json").read_text())
    assert config["hparams"]["rank"] == 4
    assert config["device"]["allocator"] == environment.HELD_ALLOCATOR  # a `python -m training` process's

    # The process itself matters for `train` (its allocator) and `predict` (its printed lines); the
    # other commands answer from `main` in this process.
    listing = cli_here(capsys, "list", runs_dir=runs)
    assert run_dir.name in listing.stdout and "completed" in listing.stdout

    predicted = cli("predict", "--run", run_dir.name, "--text", "a triumph", "--text", "a mess", runs_dir=runs)
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    in_process = inference.classify(inference.load_run(run), ["a triumph", "a mess"])  # the run's own answers
    assert [r["label"] for r in rows] == [r["label"] for r in in_process]
    for row, expected in zip(rows, in_process):
        assert row["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)

    # export: the folder, then the merged model as a .zip; printed where; never over something existing
    exported = cli_here(capsys, "export", "--run", run_dir.name, "--to", str(tmp_path / "home"), runs_dir=runs)
    assert exported.returncode == 0 and exported.stdout.strip() == str((tmp_path / "home").resolve())
    assert (tmp_path / "home" / "adapter_config.json").exists() and (tmp_path / "home" / "README.md").exists()
    zipped = cli_here(
        capsys, "export", "--run", run_dir.name, "--merged", "--to", str(tmp_path / "home.zip"), runs_dir=runs
    )
    assert zipped.returncode == 0 and zipped.stdout.strip() == str((tmp_path / "home.zip").resolve())
    assert "home/model.safetensors" in zipfile.ZipFile(tmp_path / "home.zip").namelist()
    again = cli_here(capsys, "export", "--run", run_dir.name, "--to", str(tmp_path / "home"), runs_dir=runs)
    assert again.returncode == 2 and "already exists" in again.stderr
    tarball = cli_here(capsys, "export", "--run", run_dir.name, "--to", str(tmp_path / "home.tar.gz"), runs_dir=runs)
    assert (
        tarball.returncode == 2 and "a folder or a .zip" in tarball.stderr and not (tmp_path / "home.tar.gz").exists()
    )
    not_a_run = cli_here(capsys, "predict", "--run", str(tmp_path), "--text", "fine", runs_dir=runs)
    assert not_a_run.returncode == 2 and "a folder but not a run" in not_a_run.stderr

    # Refused before any model loads (and before any folder is made): each would otherwise wait for a load first.
    def never(*args, **kwargs):
        raise AssertionError("a model was loaded for a request that is refused")

    for module, name in ((inference, "load_run"), (training.engine, "train"), (training.engine, "resume")):
        monkeypatch.setattr(module, name, never)
    for args, message in [
        (["generate", "--run", run_dir.name, "--prompt", "Once"], "is a sentiment run; generation needs"),
        (["predict", "--run", "../etc", "--text", "x"], "not a valid run id"),
        (["predict", "--run", run_dir.name, "--text", "  "], "empty"),
        (["resume", "--run-id", run_dir.name], "is completed; only stopped"),
        ([*train, "--run-id", run_dir.name], "already exists"),
        ([*train, "--run-id", "trailing-newline\n"], "not a valid run id"),
        ([*train, "--target-modules", " , "], "names no module"),
        ([*train, "--target-modules", "query,nowhere"], "nowhere not found"),
        ([*train, "--rank", "128"], "larger than layer"),
        (
            ["train", "--task", "generation", "--method", "lora", "--model", "bundled/all-MiniLM-L6-v2", "--offline"],
            "sentiment model",
        ),
    ]:
        refused = cli_here(capsys, *args, runs_dir=runs)
        assert refused.returncode == 2 and message in refused.stderr, (args, refused.stderr)
    assert [run.id for run in RunStore(runs).runs()] == [run_dir.name]


def same_request(parsed: TrainConfig, config: TrainConfig) -> bool:
    """Equal, with hyperparameters compared after defaults (the argv leaves default ones out)."""
    method = get_method(config.method)
    hparams = method.resolve_hparams(parsed.hparams) == method.resolve_hparams(config.hparams)
    return hparams and replace(parsed, hparams={}) == replace(config, hparams={})


@pytest.mark.parametrize(
    "config",
    [
        TrainConfig(task="sentiment", method="lora"),
        TrainConfig(
            task="generation",
            method="sparselora",
            model="bundled/SmolLM2-135M-Instruct",
            dataset="my data.csv",  # spaces survive the shell quoting
            hparams={"learning_rate": 3e-4, "rank": 16, "ffn_sparsity": 0.5, "layer_sparsity": "auto"},
            max_steps=40,
            batch_size=4,
            seq_len=96,
            seed=7,
            eval_steps=10,
            eval_samples=50,
            eval_subsample=20,
            control_samples=0,
            checkpoint_steps=5,
            owner="a1b2",
            offline=True,
        ),
        TrainConfig(task="sentiment", method="hira", epochs=1.5, hparams={"dropout": 0.1}, judge_run="x"),
        TrainConfig(task="generation", method="full", eval_samples=1, control_samples=1024, offline=True),
    ],
)
def test_the_workers_argv_and_the_shown_command_parse_back_to_the_config(config):
    """The job manager starts a worker with `train_arguments(config)` and the Train tab shows
    `command_line(config)` (without the owner); parsed by the CLI, each is the same request."""
    parser = build_parser()
    assert same_request(config_from_flags(parser.parse_args(train_arguments(config))), config)
    shown = shlex.split(command_line(config))[3:]
    assert same_request(config_from_flags(parser.parse_args(shown)), replace(config, owner=None))


def example_value(field: RunField) -> object:
    """A value other than the default that `field` accepts."""
    if field.setting.choices:
        return field.setting.choices[1]  # the first is the default; a later one may need a GPU (fp16)
    return {int: lambda: int(field.setting.minimum) + 1, float: lambda: 1.5, str: lambda: "x", bool: lambda: True}[
        field.kind
    ]()


@pytest.mark.parametrize("field", [field for field in RUN_FIELDS if field.kind is not dict], ids=lambda f: f.name)
def test_a_field_declared_once_reaches_every_surface_it_names(field, capsys):
    """One declaration in TrainConfig is a documented flag, a worker argument that comes back,
    a typed start_run parameter and a form field, as its Setting says."""
    from ui import api, train_tab

    shown = field.setting.shown
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    assert (field.flag in help_text) == ("cli" in shown)
    config = replace(TrainConfig(task="sentiment", method="lora"), **{field.name: example_value(field)})
    config.resolved()  # the example is a valid value
    if "worker" in shown:
        parsed = config_from_flags(build_parser().parse_args(train_arguments(config)))
        assert getattr(parsed, field.name) == getattr(config, field.name)
    parameter = api.START_RUN.parameters.get(field.name)
    assert (parameter is not None) == ("api" in shown)
    if parameter is not None:
        assert field.kind in (parameter.annotation, *typing.get_args(parameter.annotation))
    generated = field in train_tab.FORM_SETTINGS
    own_widget = field.name in train_tab.OWN_WIDGETS
    on_form = field.setting.on_form()  # "form" in shown, and the machine can use it (processes: 2+ GPUs or cores)
    assert generated == (on_form and not own_widget and (field.kind is int or bool(field.setting.choices)))


def test_start_run_keeps_its_documented_parameters_in_order():
    """The README's gradio_client example and existing clients name these parameters."""
    from ui import api

    assert list(api.START_RUN.parameters) == [
        "task",
        "method",
        "hparams",
        "model",
        "dataset",
        "max_steps",
        "batch_size",
        "seq_len",
        "seed",
        "eval_steps",
        "eval_samples",
        "eval_subsample",
        "checkpoint_steps",
        "precision",
        "processes",
        "owner_token",
    ]
    assert api.START_RUN.parameters["seed"].default == 0 and api.START_RUN.parameters["task"].annotation is str


ALLOCATE_AND_FREE = """
import json, sys, psutil, torch
from training.core import environment
allocator = environment.hold_freed_memory() if sys.argv[1] == "hold" else environment.allocator()
before = psutil.Process().memory_info().rss
block = torch.ones(64 * 2**20)  # 256 MB, far above glibc's mmap threshold
del block
print(json.dumps({"allocator": allocator, "kept_mb": (psutil.Process().memory_info().rss - before) / 2**20}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
@pytest.mark.parametrize(
    ("mode", "variables", "allocator", "kept"),
    [
        ("hold", {}, environment.HELD_ALLOCATOR, True),
        ("default", {}, environment.DEFAULT_ALLOCATOR, False),
        ("hold", {"MALLOC_MMAP_MAX_": "65536"}, "glibc, as the environment sets it", False),
        ("hold", {"GLIBC_TUNABLES": "glibc.malloc.mmap_max=65536"}, "glibc, as the environment sets it", False),
    ],
)
def test_training_processes_keep_freed_memory_for_the_next_step(mode, variables, allocator, kept):
    env = {**without_allocator_settings(dict(os.environ)), **variables}
    result = subprocess.run(
        [sys.executable, "-c", ALLOCATE_AND_FREE, mode], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["allocator"] == allocator
    # held: the freed pages stay in the process for the next allocation; else they go back at once
    assert (figures["kept_mb"] > 200) == kept, figures


def test_bench_times_each_method_at_each_precision_attention_kernel_and_logits_setting(tiny_models, capsys):
    from training.cli import main

    common = ["--steps", "2", "--warmup", "1", "--model", tiny_models["llama"], "--dataset", "bundled/hamlet"]
    arguments = [
        "bench",
        "--task",
        "generation",
        "--methods",
        "lora",
        "--precision",
        "fp32,bf16",
        "--logits",
        "all,read",
        "--attention",
        "sdpa,eager",
    ]
    assert main([*arguments, *common, "--offline"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    combinations = [(r["precision"], r["attention"], r["logits"]) for r in lines]
    assert combinations == [
        (precision, attention, logits)
        for precision in ("fp32", "bf16")
        for attention in ("sdpa", "eager")
        for logits in ("all", "read")
    ]
    assert lines[0]["speedup_vs_baseline"] == 1.0 and lines[-1]["baseline_precision"] == "fp32"
    assert lines[-1]["baseline_attention"] == "sdpa"
    assert all(r["median_step_s"] > 0 and r["tokens_per_s"] > 0 for r in lines)
    # the frozen base is stored in bf16: its weights take half the bytes
    assert lines[4]["memory"]["weights_bytes"] < 0.6 * lines[0]["memory"]["weights_bytes"]
    # eager attention keeps each layer's token-by-token probabilities for its backward pass
    assert lines[2]["memory"]["activation_bytes"] > lines[0]["memory"]["activation_bytes"]

    for option, values, message in (
        ("--precision", "fp32,fp8", "unknown precision fp8"),
        ("--precision", "fp16", "fp16 needs a CUDA GPU"),
        ("--attention", "sdpa,flash", "unknown attention flash"),
    ):
        assert main(["bench", "--task", "generation", "--methods", "lora", option, values, *common]) == 2
        assert message in capsys.readouterr().err


def test_bench_times_one_method_twice_under_two_labels(tmp_path, tiny_models, review_csv, capsys):
    from training.cli import main

    common = ["--steps", "2", "--warmup", "1", "--model", tiny_models["bert"], "--dataset", str(review_csv)]
    arguments = ["bench", "--task", "sentiment", "--methods", "lora,wide=lora", "--set", "wide.rank=16", *common]
    assert main(arguments + ["--offline"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["label"], r["method"], r["hparams"]["rank"]) for r in lines] == [
        ("lora", "lora", 8),
        ("wide", "lora", 16),
    ]
    # reviews of unequal length pad each batch to its longest; the share is the workload's, not a method's
    assert 0 < lines[0]["padding_share"] == lines[1]["padding_share"] < 1
    assert lines[0]["speedup_vs_baseline"] == 1.0 and lines[1]["baseline"] == "lora"
    assert lines[1]["memory"]["gradient_bytes"] > lines[0]["memory"]["gradient_bytes"]

    arguments = ["bench", "--task", "sentiment", "--methods", "lora", "--set", "other.rank=4", *common]
    assert main(arguments + ["--offline"]) == 2
    assert "--set names other, which --methods does not list" in capsys.readouterr().err
    arguments = ["bench", "--task", "sentiment", "--methods", "a=lora,a=dora", *common]
    assert main(arguments + ["--offline"]) == 2
    assert "--methods gives a label twice" in capsys.readouterr().err
