"""The results suite behind `make bench`: every method on both tasks under equal budgets, so the
seed's five research questions get measured answers (written by research/report).

For each plan (a task with its model, data and budget), in this order:
1. speed and memory: every variant timed interleaved in one process (bench.run_bench);
2. the learning-rate sweep: each family's representative (full, lora, lora-r32, hira, hira-r32) at
   a few rates on the validation split, first seed; the best rate serves the whole family (LoRA's
   rate also serves QLoRA and SparseLoRA: they train the same adapter; HiRA's serves HiRA on 4-bit);
3. quality: every variant at every seed, trained by the engine into the suite's own run store.

Cells are run ids made from their configuration, so a suite that was interrupted (or rerun)
reuses the runs that completed and trains only what is missing.
"""

from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_methods import get_method
from lora_methods.sparselora import MOST_LAYERS
from training.core.compute import resolve_precision
from training.core.config import TrainConfig
from training.core.defaults import RESULTS_DIR  # noqa: F401  (where its results go; the UI reads them there)
from training.core.environment import hardware, library_versions
from training.core.offline import is_offline
from training.core.runs import Run, RunNotFound, RunStore
from training.engine import train
from training.research.bench import Entry, run_bench
from training.research.probe import probe

DEFAULT_RUNS_DIR = Path("runs") / "bench-suite"


@dataclass(frozen=True)
class Variant:
    """A method at fixed settings; `family` names the representative whose swept rate it uses."""

    name: str
    method: str
    family: str
    hparams: Mapping[str, Any] = field(default_factory=dict)


# alpha = 2 r keeps LoRA's update scale (alpha / r) the same at both ranks; the rank-32 variants
# still get their own sweep (a rank-8 rate made rank-32 LoRA unstable on sentiment).
VARIANTS: dict[str, Variant] = {
    variant.name: variant
    for variant in (
        Variant("full", "full", "full"),
        Variant("lora", "lora", "lora", {"rank": 8, "alpha": 16}),
        Variant("lora-r32", "lora", "lora-r32", {"rank": 32, "alpha": 64}),
        # LoRA at SparseLoRA's dropout 0: what of SparseLoRA's quality and speed is the dropout, not sparsity
        Variant("lora-nodrop", "lora", "lora", {"rank": 8, "alpha": 16, "dropout": 0.0}),
        Variant("qlora", "qlora", "lora", {"rank": 8, "alpha": 16}),
        Variant("dora", "dora", "lora", {"rank": 8, "alpha": 16}),
        # the paper's schedule (SparseLoRA's default): the deep half at 0.9, the first half dense, no LoRA dropout
        Variant("sparselora", "sparselora", "lora", {"rank": 8, "alpha": 16}),
        Variant("sparselora-4bit", "sparselora-4bit", "lora", {"rank": 8, "alpha": 16}),
        # the schedule this project used first: every layer but the first and the last at 0.75
        Variant("sparselora-most-layers", "sparselora", "lora", {"rank": 8, "alpha": 16, **MOST_LAYERS}),
        # what sparsity costs on that schedule: half of the FFN channels skipped, and 90%
        Variant("sparselora-s50", "sparselora", "lora", {"rank": 8, "alpha": 16, **MOST_LAYERS, "ffn_sparsity": 0.5}),
        Variant("sparselora-s90", "sparselora", "lora", {"rank": 8, "alpha": 16, **MOST_LAYERS, "ffn_sparsity": 0.9}),
        # and where: only the deeper layers sparse (3 and 4 of MiniLM's 6, the default's layers there),
        # at the first schedule's 0.75 and dropout 0.05
        Variant(
            "sparselora-deep", "sparselora", "lora", {"rank": 8, "alpha": 16, **MOST_LAYERS, "dense_first_layers": 3}
        ),
        # the paper's schedule (the default's deep half, not `sparselora-deep` above) at 0.5 and at the
        # top of the reference range; and more layers sparse at its 0.9: SmolLM2's 10-28 of 30 (a model
        # needs 12 layers or more for this one)
        Variant("sparselora-deep-s50", "sparselora", "lora", {"rank": 8, "alpha": 16, "ffn_sparsity": 0.5}),
        Variant("sparselora-deep-s99", "sparselora", "lora", {"rank": 8, "alpha": 16, "ffn_sparsity": 0.99}),
        Variant(
            "sparselora-dense-first10",
            "sparselora",
            "lora",
            {"rank": 8, "alpha": 16, "layer_sparsity": "auto", "dense_first_layers": 10},
        ),
        Variant("hira", "hira", "hira", {"rank": 8}),
        Variant("hira-r32", "hira", "hira-r32", {"rank": 32}),
        Variant("hira-4bit", "hira-4bit", "hira", {"rank": 8}),
    )
}


@dataclass(frozen=True)
class Plan:
    """One task's equal budget for every variant; cells are `<name>/<variant>`."""

    name: str
    task: str
    model: str
    dataset: str
    steps: int
    batch_size: int
    seq_len: int
    seeds: tuple[int, ...]
    variants: tuple[str, ...]
    sweep: Mapping[str, tuple[float, ...]]  # family -> rates tried; empty: the rates of `rates_from`
    rates_from: str | None = None
    # TrainConfig fields this plan sets beyond the budget above, e.g. a smaller evaluation, judged reviews
    run_settings: Mapping[str, Any] = field(default_factory=lambda: {"control_samples": 0})
    speed_steps: int = 10
    speed_extra: Mapping[str, tuple[str, Mapping[str, Any]]] = field(default_factory=dict)  # timed only
    # variant (or, for the timed-only extras, method) name -> hparams that fit this plan's model
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # FFN sparsities the probe measures the model's channel sparsity at (none: not probed)
    probe_sparsities: tuple[float, ...] = ()

    def hparams(self, variant: Variant, rate: float) -> dict[str, Any]:
        return {**variant.hparams, **self.overrides.get(variant.name, {}), "learning_rate": rate}


METHODS = (
    "full",
    "lora",
    "lora-r32",
    "qlora",
    "dora",
    "sparselora",
    "sparselora-4bit",
    "hira",
    "hira-r32",
    "hira-4bit",
)
SPARSITIES = ("sparselora-most-layers", "sparselora-s50", "sparselora-s90", "sparselora-deep")
LAYERS = {  # SparseLoRA's layer schedules, timed against LoRA (not trained)
    # the first schedule (0.75, dropout 0.05) with every layer sparse but the last
    "sparselora-all-layers": ("sparselora", {**MOST_LAYERS, "dense_first_layers": 0}),
    # the last layer's FFN for every token, not only the output tokens: what skipping unread work buys
    "sparselora-last-all": ("sparselora", {"last_layer": "all"}),
    "sparselora-attn50": ("sparselora", {"attention_sparsity": 0.5}),  # value/output channels too
}
DECODER_EXTRAS = {  # on the decoder: what of SparseLoRA's speed is exact, and what is the paper's dropout 0
    "lora-nodrop": ("lora", {"dropout": 0.0}),
    "sparselora-pads-computed": ("sparselora", {"pad_tokens": "compute"}),  # padding not skipped
    "sparselora-last-all": LAYERS["sparselora-last-all"],
    # the reference code's estimator: a rank-8 SVD scoring each sequence's mean context token
    "sparselora-reference": ("sparselora", {"estimator": "sequence-mean", "estimator_rank": 8}),
}
# the probe's sparsities: the suite's 0.5, the first schedule's 0.75, the paper's 0.9 and where it
# stops paying (0.95 loses more output than 0.9 for FLOPs that barely move)
PROBED = (0.5, 0.75, 0.9, 0.95)
SUITES: dict[str, tuple[Plan, ...]] = {
    "full": (
        Plan(
            "sentiment",
            "sentiment",
            "bundled/all-MiniLM-L6-v2",
            "bundled/rotten-tomatoes",
            steps=120,
            batch_size=16,
            seq_len=128,
            seeds=(0, 1, 2, 3, 4),  # seed-to-seed spread is 1-3 points: three seeds resolved too little
            variants=METHODS + SPARSITIES,
            sweep={
                "full": (5e-5, 1e-4, 2e-4),
                "lora": (1e-3, 2e-3, 4e-3),
                "lora-r32": (1e-3, 2e-3, 4e-3),
                "hira": (5e-3, 1e-2, 2e-2),
                "hira-r32": (5e-3, 1e-2, 2e-2),
            },
            speed_steps=15,
            speed_extra=LAYERS,
            probe_sparsities=PROBED,
        ),
        Plan(
            "generation",
            "generation",
            "bundled/SmolLM2-135M-Instruct",
            "bundled/review-writing",
            steps=30,
            batch_size=8,
            seq_len=128,
            seeds=(0,),
            variants=METHODS,
            sweep={
                "full": (2e-5, 1e-4),
                "lora": (1e-3, 3e-3),
                "lora-r32": (1e-3, 3e-3),
                "hira": (1e-2, 3e-2),
                "hira-r32": (1e-2, 3e-2),
            },
            run_settings={"eval_samples": 100, "control_samples": 32},
            speed_steps=8,
            probe_sparsities=PROBED,
        ),
        Plan(
            "decoder-sentiment",
            "sentiment",
            "bundled/SmolLM2-135M-Instruct",
            "bundled/rotten-tomatoes",
            steps=100,
            batch_size=16,
            seq_len=128,
            seeds=(0, 1, 2, 3, 4),
            # full fine-tuning fits (135M parameters) but at ~1.4x LoRA's step would add about a quarter
            variants=("lora", "qlora", "hira", "sparselora", "sparselora-most-layers", "sparselora-4bit"),
            sweep={},  # the methods' default rates: the MiniLM sweep's rates do not carry over to a decoder
            speed_steps=20,  # SparseLoRA's speed claims are quoted at 20 interleaved steps: 8 ranged too widely
            speed_extra=DECODER_EXTRAS,
            probe_sparsities=PROBED,
        ),
        Plan(
            "continuation",
            "generation",
            "bundled/SmolLM2-135M-Instruct",
            "bundled/hamlet-continuation",
            steps=30,
            batch_size=8,
            seq_len=128,
            # what sparsity costs on the paper's schedule, with LoRA at its dropout beside it, and the
            # schedules between the default and most layers sparse: where speed meets perplexity
            variants=(
                "lora",
                "lora-nodrop",
                "sparselora",
                "sparselora-deep-s50",
                "sparselora-deep-s99",
                "sparselora-dense-first10",
                "sparselora-most-layers",
            ),
            seeds=(0, 1),
            sweep={},
            rates_from="generation",
            run_settings={"eval_samples": 100, "control_samples": 0},
            speed_steps=20,
            speed_extra={
                **LAYERS,
                # LoRA without dropout is a trained variant here, timed with the others
                **{label: extra for label, extra in DECODER_EXTRAS.items() if label != "lora-nodrop"},
                "qlora": ("qlora", {}),
                "sparselora-4bit": ("sparselora-4bit", {}),
            },
            probe_sparsities=PROBED,
        ),
    ),
}
# A taste of the suite in a few minutes: one seed, short budgets, no sweep (the methods' defaults).
SUITES["quick"] = (
    Plan(
        "sentiment",
        "sentiment",
        "bundled/all-MiniLM-L6-v2",
        "bundled/rotten-tomatoes",
        steps=40,
        batch_size=16,
        seq_len=128,
        seeds=(0,),
        variants=("full", "lora", "qlora", "hira", "sparselora"),
        sweep={},
        speed_steps=6,
    ),
)


class SuiteError(ValueError):
    """A suite request that cannot run (unknown suite or cell, no published results)."""


def _primary(task: str) -> tuple[str, bool]:
    """The validation figure rates are chosen on, and whether higher is better."""
    return ("accuracy", True) if task == "sentiment" else ("loss", False)


def cell_config(plan: Plan, variant: Variant, rate: float, seed: int, offline: bool, judge: str | None) -> TrainConfig:
    return TrainConfig(
        task=plan.task,
        method=variant.method,
        model=plan.model,
        dataset=plan.dataset,
        hparams=plan.hparams(variant, rate),
        max_steps=plan.steps,
        batch_size=plan.batch_size,
        seq_len=plan.seq_len,
        seed=seed,
        eval_steps=plan.steps,  # validation once, at the end: the loss curve comes from training
        checkpoint_steps=plan.steps,
        offline=offline,
        **plan.run_settings,
        judge_run=judge if plan.run_settings["control_samples"] else None,
    )


# Run settings added after cells were published: at these values they stay out of the digest, so
# the published cells keep their ids and are reused, not trained again.
ADDED_LATER = {"processes": 1}


def cell_run_id(plan: Plan, variant: Variant, config: TrainConfig) -> str:
    """A readable id with a digest of everything that decides the run's outcome."""
    settings = {
        k: v
        for k, v in asdict(config.resolved()).items()
        if k not in ("offline", "owner") and not (k in ADDED_LATER and v == ADDED_LATER[k])
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{plan.name}-{variant.name}-lr{config.hparams['learning_rate']:g}-s{config.seed}-{digest}"


def _train_cell(store: RunStore, run_id: str, config: TrainConfig, log: Callable[[str], None]) -> Run:
    """The completed run `run_id`, trained now unless an earlier suite finished it."""
    try:
        run = store.get(run_id)
    except RunNotFound:
        run = None
    if run is not None and run.status == "completed":
        log(f"{run_id}: done before, reused")
        return run
    if run is not None:  # an interrupted or failed attempt: start it again from nothing
        store.remove(run)
    log(f"{run_id}: training")
    train(config, store, run_id=run_id)
    return store.get(run_id)


def cell_record(plan: Plan, variant: Variant, run: Run) -> dict[str, Any]:
    """One trained cell as the results keep it."""
    summary, config = run.summary, run.config
    losses = [r["loss"] for r in run.metrics() if r.get("kind") == "train"]
    return {
        "cell": f"{plan.name}/{variant.name}",
        "plan": plan.name,
        "variant": variant.name,
        "method": variant.method,
        "seed": config["seed"],
        "precision": config.get("precision", "fp32"),  # cells trained before the setting ran in fp32
        # cells trained before the kernel was chosen per run used the default, fused on the suite's models
        "attention": summary.get("attention", "sdpa"),
        "run": run.id,
        "hparams": config["hparams"],
        "validation": summary["metrics"]["validation"],
        "test": summary["metrics"]["test"],
        "control_share": summary["metrics"].get("control_share"),
        "base": summary["base_metrics"],
        "trainable_params": summary["trainable_params"],
        "total_params": summary["total_params"],
        "trainable_percent": summary["trainable_percent"],
        "base_weight_memory_bytes": summary["base_weight_memory_bytes"],
        # the process's resident set (cells trained before the tensor accounting named it peak_memory_bytes)
        "peak_rss_bytes": summary.get("peak_rss_bytes", summary.get("peak_memory_bytes")),
        "training_memory_bytes": summary.get("training_memory_bytes"),
        "median_step_time_s": summary["median_step_time_s"],
        "train_time_s": summary["train_time_s"],
        "adapter_size_bytes": summary["adapter_size_bytes"],
        "sparsity": summary.get("sparsity"),
        "versions": config["versions"],  # a reused cell may predate the suite's own run
        "trained_at": summary["created_at"],
        "loss_curve": [round(loss, 4) for loss in losses],
    }


def _default_rate(variant: Variant) -> float:
    return get_method(variant.method).resolve_hparams({})["learning_rate"]


def _median(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return statistics.median(known) if known else None


def _spread(values: list[float]) -> dict[str, float | int | None]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def aggregate(cells: list[dict]) -> dict[str, dict[str, dict]]:
    """Per plan and variant: mean and standard deviation over seeds of every quality figure."""
    grouped: dict[tuple[str, str], list[dict]] = {}
    for cell in cells:
        grouped.setdefault((cell["plan"], cell["variant"]), []).append(cell)
    table: dict[str, dict[str, dict]] = {}
    for (plan, variant), group in grouped.items():
        first = group[0]
        figures = {
            f"{split}_{name}": _spread([cell[split][name] for cell in group])
            for split in ("validation", "test")
            for name in first[split]
        }
        if first["control_share"] is not None:
            figures["control_share"] = _spread([cell["control_share"] for cell in group])
            figures["base_control_share"] = _spread([cell["base"]["control_share"] for cell in group])
        table.setdefault(plan, {})[variant] = {
            **figures,
            "method": first["method"],
            "learning_rate": first["hparams"]["learning_rate"],
            "seeds": sorted(cell["seed"] for cell in group),
            "base_validation": first["base"]["validation"],
            "trainable_params": first["trainable_params"],
            "trainable_percent": first["trainable_percent"],
            "base_weight_memory_bytes": first["base_weight_memory_bytes"],
            "peak_rss_bytes": statistics.median(cell["peak_rss_bytes"] for cell in group),
            "training_memory_bytes": _median([cell["training_memory_bytes"] for cell in group]),
            "median_step_time_s": statistics.median(cell["median_step_time_s"] for cell in group),
            "train_time_s": statistics.median(cell["train_time_s"] for cell in group),
            "adapter_size_bytes": first["adapter_size_bytes"],
            "sparsity": first["sparsity"],
        }
    return table


def _sweep(
    plan: Plan, store: RunStore, offline: bool, judge: str | None, log: Callable[[str], None]
) -> tuple[dict[str, float], list[dict]]:
    """Each family's best rate on the validation split (first seed), and every trial."""
    name, higher_is_better = _primary(plan.task)
    chosen, trials = {}, []
    for family, rates in plan.sweep.items():
        variant = VARIANTS[family]
        scored = []
        for rate in rates:
            config = cell_config(plan, variant, rate, plan.seeds[0], offline, judge)
            run = _train_cell(store, cell_run_id(plan, variant, config), config, log)
            score = run.summary["metrics"]["validation"][name]
            if math.isfinite(score):  # a diverged rate never wins
                scored.append((score, rate))
            trials.append(
                {"plan": plan.name, "family": family, "learning_rate": rate, f"validation_{name}": score, "run": run.id}
            )
        if not scored:
            raise SuiteError(f"plan {plan.name}: every rate tried for {family} diverged ({', '.join(map(str, rates))})")
        # On a tie the rate listed first wins.
        chosen[family] = (max if higher_is_better else min)(scored, key=lambda pair: pair[0])[1]
        for trial in trials:
            if trial["plan"] == plan.name and trial["family"] == family:
                trial["chosen"] = trial["learning_rate"] == chosen[family]
    return chosen, trials


JUDGE_PLAN = "sentiment"  # its most accurate cell judges the generated reviews' sentiment


def _judge(cells: list[dict]) -> dict | None:
    """The suite's most accurate sentiment cell judges the generated reviews' sentiment."""
    sentiment = [c for c in cells if c["plan"] == JUDGE_PLAN]
    best = max(sentiment, key=lambda c: c["validation"]["accuracy"], default=None)
    return (
        {"run": best["run"], "cell": best["cell"], "validation_accuracy": best["validation"]["accuracy"]}
        if best
        else None
    )


def _training_record(store: RunStore, run_ids: set[str], started: float) -> dict[str, Any]:
    """How the runs behind the results were trained: how many by this invocation (the others were
    reused from an earlier one) and their wall time, so a rerun's short duration misleads no one."""
    summaries = [store.get(run_id).summary for run_id in run_ids]
    return {
        "runs": len(summaries),
        "trained_now": sum(s["created_at"] >= started for s in summaries),
        "run_time_s": sum(s["finished_at"] - s["created_at"] for s in summaries),
        "first_started_at": _utc(min((s["created_at"] for s in summaries), default=started)),
        "last_finished_at": _utc(max((s["finished_at"] for s in summaries), default=started)),
    }


def _utc(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _speed(plan: Plan, offline: bool, variants: Mapping[str, Variant] = VARIANTS) -> list[dict]:
    """Every variant (and the plan's timed-only extras), at the methods' default rates: a rate does
    not change what a step costs."""
    entries = [
        Entry(name, variants[name].method, plan.hparams(variants[name], _default_rate(variants[name])))
        for name in plan.variants
    ]
    entries += [
        Entry(label, method, {**plan.overrides.get(method, {}), **hparams})
        for label, (method, hparams) in plan.speed_extra.items()
    ]
    return list(
        run_bench(
            plan.task,  # type: ignore[arg-type]
            entries,
            plan.speed_steps,
            warmup=2,
            batch_size=plan.batch_size,
            seq_len=plan.seq_len,
            offline=offline,
            model=plan.model,
            dataset=plan.dataset,
        )
    )


def _probe(plan: Plan, offline: bool) -> list[dict]:
    """How much of each layer's FFN output the plan's model loses to channel sparsity (research/probe)."""
    return list(
        probe(
            plan.task,  # type: ignore[arg-type]
            plan.probe_sparsities,
            batch_size=plan.batch_size,
            seq_len=plan.seq_len,
            model=plan.model,
            dataset=plan.dataset,
            offline=offline,
        )
    )


def _check_plans(plans: list[Plan], only: Collection[str], previous: Mapping[str, Any], name: str) -> None:
    """Fail before hours of training, not after: unknown variants or plans, rates from nowhere, and
    plans kept beside ones run again that would no longer fit them."""
    names = [plan.name for plan in plans]
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise SuiteError(f"no plan {', '.join(map(repr, unknown))} in this suite; its plans: {', '.join(names)}")
    kept = [plan for plan in plans if only and plan.name not in only]
    if kept:
        if not previous:
            raise SuiteError(
                f"no published results to keep plan {', '.join(plan.name for plan in kept)} from: run the whole "
                "suite, or point --out at the folder of its results.json"
            )
        if previous.get("suite") != name:
            raise SuiteError(
                f"the published results are the {previous.get('suite')} suite's, not the {name} suite's: "
                "run the whole suite, not some of its plans"
            )
        missing = [plan.name for plan in kept if plan.name not in {p["name"] for p in previous["plans"]}]
        if missing:
            raise SuiteError(
                f"plan {', '.join(missing)} has no published results to keep: run it too (--plan), or the whole suite"
            )
        check_precision(previous, "run some of its plans again")
    for plan in kept:  # a kept plan built on a plan run again would no longer match it
        if plan.rates_from in only:
            raise SuiteError(
                f"plan {plan.name} takes its learning rates from plan {plan.rates_from}: "
                f"run it too (--plan {plan.name})"
            )
        if plan.run_settings["control_samples"] and JUDGE_PLAN in only:
            raise SuiteError(
                f"plan {plan.name}'s reviews are judged by a run of plan {JUDGE_PLAN}: run it too (--plan {plan.name})"
            )
    earlier = {plan.name for plan in kept}
    for plan in plans:
        for variant in plan.variants:
            if variant not in VARIANTS:
                raise SuiteError(f"plan {plan.name}: unknown variant {variant!r}")
        if not plan.sweep and plan.rates_from and plan.rates_from not in earlier:
            raise SuiteError(f"plan {plan.name} takes its rates from {plan.rates_from!r}, which must run before it")
        earlier.add(plan.name)


def check_precision(results: Mapping[str, Any], doing: str) -> None:
    """Refuse to mix these results with steps this machine would compute at another precision."""
    precision, why = resolve_precision("auto")  # what the suite's steps compute in here
    if results.get("precision") and precision != results["precision"]:
        raise SuiteError(
            f"these results were measured in {results['precision']}, and this machine computes steps in {precision} "
            f"({why}): {doing} on a machine like theirs, or run the whole suite (`make bench`)"
        )


def run_suite(
    plans: Iterable[Plan],
    runs_dir: Path | str = DEFAULT_RUNS_DIR,
    offline: bool = False,
    log: Callable[[str], None] = print,
    name: str = "custom",
    command: str | None = None,
    previous: Mapping[str, Any] | None = None,
    only: Collection[str] = (),
) -> dict[str, Any]:
    """Run every plan (speed, probe, sweep, quality) and return the results (report.write saves them).
    `previous`: the results this suite replaces; where they were measured at another precision,
    their quality and speed figures are kept beside the new ones (see `precision_reference`).
    `only`: run these plans and keep every other plan's published figures from `previous` (a plan
    that changed is measured again in its own time, not the whole suite's)."""
    plans, published = list(plans), previous or {}
    only = set(only) if set(only) != {plan.name for plan in plans} else set()  # every plan: the whole suite
    _check_plans(plans, only, published, name)
    offline = is_offline(offline)
    store = RunStore(runs_dir)
    started = time.time()
    rates: dict[str, dict[str, float]] = {}
    sweep: list[dict] = []
    cells: list[dict] = []
    speed: dict[str, list[dict]] = {}
    probes: dict[str, list[dict]] = {}
    recorded: list[dict] = []
    run_ids: set[str] = set()  # the runs these results stand on, trained now or reused
    for plan in plans:
        if only and plan.name not in only:
            log(f"== {plan.name}: kept as published")
            kept = _published_plan(published, plan.name)
            recorded.append(kept["plan"])
            rates[plan.name], speed[plan.name] = kept["rates"], kept["speed"]
            sweep, cells = sweep + kept["sweep"], cells + kept["cells"]
            if kept["probe"]:
                probes[plan.name] = kept["probe"]
            continue
        recorded.append(asdict(plan))
        judge = _judge(cells)
        if judge and plan.run_settings["control_samples"] and not _exists(store, judge["run"]):
            raise SuiteError(
                f"plan {plan.name}'s reviews are judged by run {judge['run']} ({judge['cell']}), which is not in "
                f"{runs_dir}: run its plan {judge['cell'].split('/')[0]} too (--plan)"
            )
        log(f"== {plan.name}: speed and memory, {plan.speed_steps} interleaved steps")
        speed[plan.name] = _speed(plan, offline)
        if plan.probe_sparsities:
            log(f"== {plan.name}: probe, FFN sparsity {', '.join(map(str, plan.probe_sparsities))}")
            probes[plan.name] = _probe(plan, offline)
        log(f"== {plan.name}: learning-rate sweep")
        chosen, trials = _sweep(plan, store, offline, judge and judge["run"], log)
        rates[plan.name] = chosen or dict(rates.get(plan.rates_from or "", {}))
        sweep += trials
        log(f"== {plan.name}: {len(plan.variants)} variants x {len(plan.seeds)} seeds, {plan.steps} steps each")
        for variant_name in plan.variants:
            variant = VARIANTS[variant_name]
            rate = rates[plan.name].get(variant.family, _default_rate(variant))
            for seed in plan.seeds:
                config = cell_config(plan, variant, rate, seed, offline, judge and judge["run"])
                run = _train_cell(store, cell_run_id(plan, variant, config), config, log)
                cells.append(cell_record(plan, variant, run))
                run_ids.add(run.id)
        run_ids |= {trial["run"] for trial in trials}
    finished = time.time()
    precision = "+".join(sorted({cell["precision"] for cell in cells})) or None
    invocation = {
        "command": command,
        "started_at": _utc(started),
        "duration_s": finished - started,
        "training": _training_record(store, run_ids, started),
        "hardware": hardware(),
        "versions": library_versions(),
    }
    variants = {n: asdict(v) for n, v in VARIANTS.items()}
    if only:  # the suite's own record stays; this invocation is told apart, with the plans it measured
        provenance = {key: published[key] for key in (*invocation, "timed") if key in published}
        provenance["reruns"] = [
            *published.get("reruns", []),
            {"plans": [plan.name for plan in plans if plan.name in only], **invocation},
        ]
        # the kept plans' variants as their cells were trained, whatever the code says now
        used = {variant for plan in recorded if plan["name"] not in only for variant in plan["variants"]}
        variants |= {n: v for n, v in published["variants"].items() if n in used}
    else:
        provenance = invocation
    return {
        "suite": name,
        "precision": precision,
        "reference": precision_reference(previous, precision),
        **provenance,
        "offline": offline,
        "runs_dir": str(runs_dir),
        "plans": recorded,
        "variants": variants,
        "sweep": sweep,
        "learning_rates": rates,
        "judge": _judge(cells),
        "cells": cells,
        "aggregate": aggregate(cells),
        "speed": speed,
        "probe": probes,
    }


def _published_plan(previous: Mapping[str, Any], plan: str) -> dict[str, Any]:
    """One plan's published figures, as `run_suite` keeps them when it runs other plans."""
    return {
        "plan": next(p for p in previous["plans"] if p["name"] == plan),
        "rates": dict(previous["learning_rates"].get(plan, {})),
        "speed": previous["speed"].get(plan, []),
        "sweep": [trial for trial in previous["sweep"] if trial["plan"] == plan],
        "cells": [cell for cell in previous["cells"] if cell["plan"] == plan],
        "probe": previous.get("probe", {}).get(plan, []),
    }


def precision_reference(previous: Mapping[str, Any] | None, precision: str | None) -> dict[str, Any] | None:
    """The figures of the last suite measured at a precision other than `precision`: the previous
    results themselves when they were, else the reference they kept. Results from before the
    precision setting were measured in fp32."""
    if previous is None:
        return None
    measured_at = previous.get("precision") or "fp32"
    if measured_at == precision:
        return previous.get("reference")
    keep = ("started_at", "hardware", "versions", "learning_rates", "aggregate", "speed")
    return {"precision": measured_at, **{key: previous[key] for key in keep if key in previous}}


def retime(
    results: Mapping[str, Any], offline: bool = False, log: Callable[[str], None] = print, command: str | None = None
) -> dict[str, Any]:
    """The published results with every plan's speed and memory timed again (step 1 of the suite,
    the plans and variants as they record them) and the trained cells kept: what a change to how a
    step computes (a kernel, the allocator) moves, in minutes rather than the hours of training."""
    check_precision(results, "retime them")
    started, offline = time.time(), is_offline(offline)
    variants = {name: Variant(**variant) for name, variant in results["variants"].items()}
    speed = {}
    for plan in (Plan(**p) for p in results["plans"]):
        log(f"== {plan.name}: speed and memory, {plan.speed_steps} interleaved steps")
        speed[plan.name] = _speed(plan, offline, variants)
    timed = {
        "command": command,
        "started_at": _utc(started),
        "duration_s": time.time() - started,
        "hardware": hardware(),
        "versions": library_versions(),
    }
    return {**results, "speed": speed, "timed": timed}


def rerun_cell(
    cell: str, seed: int, results: Mapping[str, Any], runs_dir: Path | str = DEFAULT_RUNS_DIR, offline: bool = False
) -> dict[str, Any]:
    """Train one published cell again from the configuration the results record, and set its new
    figures beside the published ones. Nothing published is changed."""
    published = next((c for c in results["cells"] if c["cell"] == cell and c["seed"] == seed), None)
    if published is None:
        cells = sorted({f"{c['cell']} --seed {c['seed']}" for c in results["cells"]})
        raise SuiteError(f"no published cell {cell!r} with seed {seed}; published: {', '.join(cells)}")
    plan = next(Plan(**p) for p in results["plans"] if p["name"] == published["plan"])
    variant = Variant(**results["variants"][published["variant"]])
    store = RunStore(runs_dir)
    judge = (results.get("judge") or {}).get("run")
    judged = plan.run_settings["control_samples"] and judge and _exists(store, judge)
    if plan.run_settings["control_samples"] and not judged:  # the review judge is a run of the suite's own store
        plan = Plan(**{**asdict(plan), "run_settings": {**plan.run_settings, "control_samples": 0}})
    config = cell_config(plan, variant, published["hparams"]["learning_rate"], seed, offline, judge)
    config.hparams = dict(published["hparams"])
    run_id = f"{cell_run_id(plan, variant, config)}-rerun-{time.strftime('%Y%m%d-%H%M%S')}"
    metrics = train(config, store, run_id=run_id)["metrics"]
    return {
        "cell": cell,
        "seed": seed,
        "run": run_id,
        "validation": metrics["validation"],
        "test": metrics["test"],
        "control_share": metrics.get("control_share"),
        "published": {k: published[k] for k in ("run", "validation", "test", "control_share")},
        "difference": {
            split: {name: metrics[split][name] - published[split][name] for name in published[split]}
            for split in ("validation", "test")
        },
    }


def _exists(store: RunStore, run_id: str) -> bool:
    try:
        store.get(run_id)
    except RunNotFound:
        return False
    return True
