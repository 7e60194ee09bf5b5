"""`python -m training ...`: train, list, predict and generate from a shell.

Method hyperparameter flags are generated from the registry's schemas, so they match the UI.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from lora_methods import METHODS, TASKS
from lora_methods.sparselora.estimator import SCORINGS
from training.core import distributed
from training.core.compute import ATTENTIONS, PRECISIONS
from training.core.config import ConfigError, add_train_flags, config_from_flags
from training.core.defaults import RESULTS_DIR
from training.core.environment import die_with_parent
from training.core.errors import USER_ERRORS
from training.core.runs import RunNotFound, RunStore, resumable
from training.research.leaderboard import leaderboard

# The research commands (bench, probe) still refuse some bad arguments with a plain ValueError; in a
# shell its message is the answer, while the UI keeps to USER_ERRORS so that a fault never reads as a typo.
COMMAND_LINE_ERRORS = (*USER_ERRORS, ValueError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description="LoRA Arena: train and use adapters.")
    parser.add_argument("--runs-dir", help="run store folder (default: $LORA_ARENA_RUNS or ./runs)")
    commands = parser.add_subparsers(dest="command", required=True)
    trainer = commands.add_parser(
        "train",
        help="train one run; prints its summary JSON as the last line",
        description="Train one run; prints its summary JSON as the last line. On several processes: "
        "--processes N starts them with torchrun, or launch them yourself, e.g. `OMP_NUM_THREADS=1 python -m "
        "torch.distributed.run --standalone --nproc_per_node=2 -m training train ...`; each process takes "
        "--batch-size examples per step.",
    )
    add_train_flags(trainer)
    trainer.add_argument("--run-id", help="name the run (default: time, task, method and a random suffix)")
    _add_bench(commands)
    _add_probe(commands)
    resumer = commands.add_parser("resume", help="continue a stopped, interrupted or failed run from its checkpoint")
    # --run-id under torchrun: its parser reads a bare --run as an ambiguous abbreviation of its --run-path.
    resumer.add_argument("--run-id", "--run", dest="run", required=True, help="run id")
    commands.add_parser("list", help="list the runs in the store")
    _add_use(commands)
    commands.add_parser(
        "standby",
        help="import the training libraries, then run the one command that arrives on stdin as a JSON line "
        '{"argv": [...], "log": FILE, "started_at": EPOCH_SECONDS} with its output appended to FILE (the app '
        "keeps one ready)",
    )
    return parser


def _add_bench(commands: Any) -> None:
    bench = commands.add_parser(
        "bench",
        help="time methods side by side in one process; or run the results suite (--suite, --only, --report)",
        description="Either --task and --methods (a speed benchmark), --suite (the results suite that "
        "`make bench` runs: every method, both tasks, equal budgets, into assets/results), --only CELL "
        "(train one published cell again), --retime (time the published plans again, cells kept) or --report "
        "(rewrite report and figures from results.json).",
    )
    mode = bench.add_mutually_exclusive_group(required=True)
    mode.add_argument("--task", choices=TASKS, help="speed benchmark: the task")
    mode.add_argument("--suite", choices=("full", "quick"), help="the results suite (quick: a few minutes)")
    mode.add_argument("--only", metavar="PLAN/VARIANT", help="rerun one published cell, e.g. sentiment/lora")
    mode.add_argument("--report", action="store_true", help="rewrite report.md and figures from results.json")
    mode.add_argument(
        "--retime",
        action="store_true",
        help="time every plan of results.json again (speed and memory, minutes) and rewrite the report; "
        "the trained cells stay",
    )
    bench.add_argument(
        "--methods",
        help="speed benchmark: comma-separated methods, or LABEL=METHOD to time one method twice with different "
        "--set values; the first is the baseline of the ratios",
    )
    bench.add_argument("--steps", type=int, default=20, help="timed steps per method, interleaved")
    bench.add_argument(
        "--precision",
        default="auto",
        help="comma-separated precisions to time each method at (auto, fp32, bf16, fp16), e.g. fp32,bf16; "
        "the first method at the first precision is the baseline",
    )
    bench.add_argument(
        "--logits",
        default="read",
        help="generation: where a step computes logits, comma-separated: read (where the loss reads them, "
        "as training does) or all (every position, the model's default), e.g. all,read",
    )
    bench.add_argument(
        "--attention",
        default="auto",
        help="comma-separated attention kernels to time each method with: auto (what training picks for the "
        "precision and --seq-len), sdpa (PyTorch's fused kernel) or eager (transformers' plain products), "
        "e.g. sdpa,eager",
    )
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    bench.add_argument("--batch-size", type=int)
    bench.add_argument("--seq-len", type=int)
    bench.add_argument("--seed", type=int, default=0, help="the seed (with --only: the published seed to rerun)")
    bench.add_argument("--model")
    bench.add_argument("--dataset")
    bench.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD.NAME=VALUE",
        help="a hyperparameter of one entry, named by its label (the method name unless given as LABEL=METHOD), "
        "e.g. sparselora.ffn_sparsity=0.5 (repeatable)",
    )
    bench.add_argument("--train-steps", type=int, help="also train each method this many steps and report quality")
    bench.add_argument(
        "--plan",
        action="append",
        default=[],
        metavar="PLAN",
        help="with --suite: run only this plan (repeatable), e.g. continuation; every other plan keeps its "
        "published figures from results.json",
    )
    bench.add_argument("--out", default=str(RESULTS_DIR), help="suite results folder (default: assets/results)")
    bench.add_argument("--offline", action="store_true")


def _add_probe(commands: Any) -> None:
    prober = commands.add_parser(
        "probe",
        help="how sparse each FFN is: per layer and sparsity, the FFN output lost with only the top channels",
        description="Per layer and FFN sparsity, on real training batches: the mean share of a context token's "
        "FFN output lost when only the batch's top channels run (picked by the oracle and by SparseLoRA's "
        "estimator), the estimator's recall, and what the oracle's channels would lose with a set per sequence "
        "or per token instead of one per batch. The evidence for SparseLoRA's layer schedule.",
    )
    prober.add_argument("--task", required=True, choices=TASKS)
    prober.add_argument("--model")
    prober.add_argument("--dataset")
    prober.add_argument("--sparsities", default="0.5,0.75,0.9", help="comma-separated, each in [0, 1)")
    prober.add_argument("--batches", type=int, default=4, help="training batches to average over")
    prober.add_argument("--batch-size", type=int)
    prober.add_argument("--seq-len", type=int)
    prober.add_argument("--estimator-rank", type=int, help="default: SparseLoRA's")
    prober.add_argument(
        "--estimator",
        choices=SCORINGS,
        default="tokens",
        help="score a sample of context tokens (SparseLoRA's default) or each sequence's mean (the reference code's)",
    )
    prober.add_argument("--offline", action="store_true")


def _add_use(commands: Any) -> None:
    """The commands that use a finished run: predict, export, generate."""
    predict = commands.add_parser("predict", help="classify text with a sentiment run")
    predict.add_argument("--run", required=True, help="run id or run folder")
    predict.add_argument("--text", required=True, action="append", help="text to classify (repeatable)")

    exporter = commands.add_parser(
        "export",
        help="write a finished run's adapter (or model) with its tokenizer and a model card, as a folder or a .zip",
    )
    exporter.add_argument("--run", required=True, help="run id or run folder")
    exporter.add_argument(
        "--merged",
        action="store_true",
        help="the adapter merged into its base model ("
        + ", ".join(method.title for method in METHODS.values() if method.merge_blocker is None)
        + ": the methods on a full-precision base)",
    )
    exporter.add_argument("--to", help="a new folder, or a file ending in .zip (default: ./RUN_ID or ./RUN_ID-merged)")

    generate = commands.add_parser("generate", help="generate text with a generation run")
    generate.add_argument("--run", required=True, help="run id or run folder")
    generate.add_argument("--prompt", required=True, action="append", help="prompt (repeatable)")
    generate.add_argument("--max-new-tokens", type=int, default=48)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    generate.add_argument("--top-p", type=float, default=0.95)
    generate.add_argument("--seed", type=int, default=0)


def _train(args: argparse.Namespace, store: RunStore, started_at: float) -> dict:
    from training.engine import train  # the Trainer and the models: keep `--help`, `list` and refusals fast

    config = config_from_flags(args)
    return train(config, store, should_stop=_stop_on_ctrl_c(), run_id=args.run_id, started_at=started_at)


def _resume(args: argparse.Namespace, store: RunStore, started_at: float) -> dict:
    from training.engine import resume  # as in _train

    return resume(args.run, store, should_stop=_stop_on_ctrl_c(), started_at=started_at)


def _launch_plan(args: argparse.Namespace, store: RunStore, argv: list[str]) -> tuple[int, list[str], str | None]:
    """How many processes `train` or `resume` asks for, the arguments that run it under torchrun
    and its run id (named here, so that Ctrl-C can reach the run)."""
    if args.command == "resume":
        store.mark_interrupted()  # a run whose processes died is resumable without starting the app
        run = store.get(args.run)
        resumable(run)  # a completed run, or one without a checkpoint, is refused before anything loads
        processes = run.config.get("processes", 1)  # each has its shard of the checkpoint
        return processes, ["--runs-dir", str(store.root), "resume", "--run-id", args.run], args.run
    config = config_from_flags(args)
    resolved = config.resolved()  # a bad request is refused here: before the Trainer loads, and not once per process
    if args.run_id:
        store.check_new_id(args.run_id)
    from training.core import models  # transformers: after the registry's refusals, which need none of it

    models.check_before_loading(resolved)
    if config.processes == 1:
        return 1, argv, args.run_id
    run_id = args.run_id or store.new_id(resolved.task, resolved.method)
    return config.processes, [*argv, "--run-id", run_id] if not args.run_id else argv, run_id


def _launch(processes: int, arguments: list[str], store: RunStore, run_id: str) -> int:
    """Run `python -m training ARGUMENTS` on `processes` processes under torchrun and wait for it.
    Ctrl-C asks the run to stop through the run store, so every process ends at the same step and
    torchrun exits cleanly (torchrun itself, sent SIGINT, ends with an error); a second one ends them."""
    command = distributed.launch_command(processes, arguments)
    print(f"starting {processes} processes: {shlex.join(command)}", file=sys.stderr, flush=True)
    launcher = subprocess.Popen(
        command,
        env=distributed.launch_environment(processes),
        start_new_session=True,  # the terminal's Ctrl-C reaches this process only
        preexec_fn=die_with_parent,
    )

    def on_ctrl_c(signum: int, frame: Any) -> None:
        try:
            run = store.get(run_id)
        except RunNotFound:
            run = None
        if run is None or run.stop_requested():  # still loading, or a second Ctrl-C
            launcher.terminate()
            return
        run.request_stop()
        print("stopping at the end of this step (Ctrl-C again to abort)...", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, on_ctrl_c)
    return launcher.wait()


def _process_start() -> float:
    """When this process began: a run's loading time counts starting Python and its libraries."""
    return psutil.Process().create_time()


def _standby() -> int:
    """Import the training stack, then wait for one command on stdin and run it as `main` would.

    The app's job manager keeps one such process ready while nothing trains, so that a run does
    not wait for Python to import PyTorch, Transformers and PEFT first (about 6-7 s of a run's
    loading here). The command is one JSON line: its arguments, the log file that takes this
    process's output from then on, and when it was asked for. End of input (the manager let the
    process go) ends it."""
    import peft  # noqa: F401  (imported for the time it takes, before a run waits on it)

    import training.engine  # noqa: F401  (as peft)

    print(f"standby: libraries imported in {time.time() - _process_start():.1f} s, waiting for a command", flush=True)
    line = sys.stdin.readline()
    if not line:
        return 0
    command = json.loads(line)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(command["log"], "a", encoding="utf-8") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    with open(os.devnull, encoding="utf-8") as nothing:  # as a worker started for its run: no input
        os.dup2(nothing.fileno(), sys.stdin.fileno())
    return main(command["argv"], command["started_at"])  # loading counts from the request, not this process


def _stop_on_ctrl_c() -> Callable[[], bool]:
    """Ctrl-C stops at the end of the current step (the adapter is saved); a second one aborts."""
    stop_flag: list[bool] = []

    def request_stop(signum: int, frame: Any) -> None:
        if stop_flag:
            raise KeyboardInterrupt
        stop_flag.append(True)
        print("stopping at the end of this step (Ctrl-C again to abort)...", file=sys.stderr)

    signal.signal(signal.SIGINT, request_stop)
    return lambda: bool(stop_flag)


def _list(store: RunStore) -> None:
    columns = ["run", "status", "metric", "validation", "test", "trainable %", "median step s"]
    frame = leaderboard(store)
    print(frame[columns].to_string(index=False, na_rep="-") if not frame.empty else f"no runs in {store.root}")
    for reason in store.unreadable():
        print(f"left out: {reason}", file=sys.stderr)


def _bench(args: argparse.Namespace) -> None:
    from training.research import report, suite  # plotly and the Trainer: only these commands need them
    from training.research.bench import Entry, run_bench

    runs_dir = args.runs_dir or suite.DEFAULT_RUNS_DIR
    if args.plan and not args.suite:
        raise ConfigError(
            "--plan picks plans of the results suite: give it with --suite, e.g. --suite full --plan continuation"
        )
    if args.report or args.only or args.retime:
        results = report.read(args.out)
        if results is None:
            raise suite.SuiteError(f"no results.json in {args.out}; `make bench` writes it")
        if args.report:
            print(report.write(results, args.out))
        elif args.retime:
            command = "python -m training bench --retime" + (" --offline" if args.offline else "")
            print(report.write(suite.retime(results, args.offline, _log, command), args.out))
        else:
            print(json.dumps(suite.rerun_cell(args.only, args.seed, results, runs_dir, args.offline)))
    elif args.suite:
        plan_flags = "".join(f" --plan {plan}" for plan in args.plan)
        command = f"python -m training bench --suite {args.suite}{plan_flags}" + (" --offline" if args.offline else "")
        results = suite.run_suite(
            suite.SUITES[args.suite],
            runs_dir,
            args.offline,
            log=_log,
            name=args.suite,
            command=command,
            previous=report.read(args.out),
            only=args.plan,
        )
        print(report.write(results, args.out))
    else:
        if not args.methods:
            raise ConfigError("a speed benchmark needs --methods (comma-separated, the first is the baseline)")
        _check_counts(args, "steps", "train_steps", "batch_size", "seq_len")
        if args.warmup < 0:
            raise ConfigError(f"--warmup must be at least 0 (got {args.warmup})")
        overrides: dict[str, dict] = {}
        for item in args.set:
            key, _, value = item.partition("=")
            label, _, name = key.partition(".")
            if not (label and name and value):
                raise ConfigError(f"--set takes LABEL.NAME=VALUE (got {item!r})")
            overrides.setdefault(label, {})[name] = value
        entries = []
        for item in args.methods.split(","):
            label, _, method = item.rpartition("=")  # "LABEL=METHOD" or just "METHOD"
            entries.append(Entry(label or method, method, overrides.pop(label or method, {})))
        if overrides:
            raise ConfigError(f"--set names {', '.join(overrides)}, which --methods does not list")
        labels = [entry.label for entry in entries]
        if len(set(labels)) < len(labels):
            raise ConfigError(f"--methods gives a label twice ({', '.join(labels)}); each entry needs its own")
        for result in run_bench(
            args.task,
            entries,
            args.steps,
            args.warmup,
            args.batch_size,
            args.seq_len,
            args.seed,
            args.offline,
            args.model,
            args.dataset,
            args.train_steps,
            args.runs_dir,
            _choices(args.precision, "precision", PRECISIONS),
            _choices(args.logits, "logits", ("read", "all")),
            _choices(args.attention, "attention", ATTENTIONS),
        ):
            print(json.dumps(result, default=str), flush=True)


def _check_counts(args: argparse.Namespace, *names: str) -> None:
    """ConfigError naming the first of these options given below 1 (None: left to its default)."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _choices(text: str, name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """A comma-separated list of `allowed` values; ConfigError naming what is not one."""
    values = tuple(part.strip() for part in text.split(","))
    unknown = [part for part in values if part not in allowed]
    if unknown:
        raise ConfigError(f"unknown {name} {', '.join(unknown)}; choose from {', '.join(allowed)}")
    return values


def _probe(args: argparse.Namespace) -> None:
    from training.research.probe import probe

    try:
        sparsities = tuple(float(part) for part in args.sparsities.split(","))
    except ValueError:
        raise ConfigError(f"--sparsities takes comma-separated numbers (got {args.sparsities!r})") from None
    _check_counts(args, "batches", "estimator_rank", "batch_size", "seq_len")
    if args.model:
        from training.core import models  # transformers: after the cheap refusals

        models.check_model_task(args.model, args.task)
    for record in probe(
        args.task,
        sparsities,
        args.batches,
        args.batch_size,
        args.seq_len,
        args.model,
        args.dataset,
        args.estimator_rank,
        scoring=args.estimator,
        offline=args.offline,
    ):
        print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None, started_at: float | None = None) -> int:
    """Run one command line; its exit status. `started_at`: when a `train` or `resume` request
    began, where that is not this process's start (a standby process's command)."""
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.command == "standby":
        return _standby()
    store = RunStore(args.runs_dir)
    if distributed.launched():
        die_with_parent()  # with its launcher: no process trains on alone
        # torchrun ends the others with SIGTERM when one fails: rank 0 then records the run failed
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"ended by the launcher (signal {signum})"))
    try:
        if args.command in ("list", "export", "predict", "generate"):
            store.mark_interrupted()  # a run whose process died reads as interrupted, not as still training
        if args.command in ("train", "resume"):
            if not distributed.launched():
                processes, arguments, run_id = _launch_plan(args, store, argv)
                if processes > 1:
                    return _launch(processes, arguments, store, run_id)
            summary = (_train if args.command == "train" else _resume)(args, store, started_at or _process_start())
            if distributed.is_main():  # one summary line, from the process that recorded the run
                print(json.dumps(summary))
        elif args.command == "bench":
            _bench(args)
        elif args.command == "probe":
            _probe(args)
        elif args.command == "list":
            _list(store)
        elif args.command == "export":
            run = store.resolve(args.run)  # an unknown run is refused before the models' libraries load
            from training.serving import export  # loads torch models; keep `list` and `--help` fast

            print(export.export_to(run, Path(args.to or export.export_name(run, args.merged)), args.merged).resolve())
        else:
            run = store.resolve(args.run)  # as for export
            from training.core import inference  # as for export

            if args.command == "predict":  # refused before the model loads
                inference.check_task(run.id, run.config["task"], "sentiment")
                inference.check_texts(args.text, "text")
            else:
                inference.check_task(run.id, run.config["task"], "generation")
                inference.check_texts(args.prompt, "prompt")
                inference.check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)
            loaded = inference.load_run(run)
            if args.command == "predict":
                results = inference.classify(loaded, args.text)
            else:
                results = inference.generate(
                    loaded,
                    args.prompt,
                    max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature,
                    top_p=args.top_p,
                    seed=args.seed,
                )
            for result in results:
                print(json.dumps(result))
    except COMMAND_LINE_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
