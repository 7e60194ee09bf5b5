"""The benchmark report as Markdown: how it was measured, the answers with their tables, each
plan's headline and speed tables, the sweep, and how to reproduce it."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from lora_methods.sparselora.schedule import layer_schedule
from training.core.config import FIELDS
from training.core.memory import MEMORY_PARTS
from training.core.presentation import markdown_table

from .answers import QUESTIONS, answers, headlines, megabytes_text, question_table, ratio_text
from .queries import Results, Row, plan_rows, ranking, rows, speed_ratio, speedup, timings

METHOD_TEXT = (
    "**How it was measured.** Each plan trains every variant on the same model, data, split, "
    "steps, batch, sequence length and seeds (AdamW, linear decay, 5% warm-up). Quality comes from "
    "those runs: sentiment test accuracy on the held-out test split (mean ± standard deviation over "
    "seeds), generation perplexity on validation and test. Step time and memory come from one process "
    "per plan that steps every variant in turn (A B C ... A B C) on the same batches after a warm-up; "
    "the ratios are between medians of that one process. Memory is counted from the tensors "
    "(weights as stored, gradients, optimizer state, the activations autograd saves for one batch). "
)
SWEEP_TEXT = (
    "Learning rates: a sweep on the validation split (first seed) for full fine-tuning and for "
    "LoRA and HiRA at each rank; LoRA's rate also serves QLoRA and SparseLoRA, HiRA's serves HiRA "
    "on 4-bit. Quality is therefore read on the test split.\n"
)
REPRODUCE_TEXT = (
    "## Reproduce\n\n`make bench` reruns everything (completed cells in `runs/bench-suite` are "
    "reused; delete that folder to start over). One plan: `python -m training bench --suite full --plan "
    "continuation` runs it again (timing, probe, cells) and keeps every other plan's figures. One cell: "
    "`python -m training bench --only sentiment/lora --seed 0` trains it again from the recorded "
    "configuration and prints the new figures beside these.\n"
)


def _spread_text(figure: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if figure is None:
        return "n/a"
    text = f"{scale * figure['mean']:.{digits}f}"
    return text + (f" ± {scale * figure['std']:.{digits}f}" if figure["std"] is not None else "")


def _quality_columns(cell: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """A cell's quality headers and figures: accuracy in %, or perplexity and the control share."""
    if "test_accuracy" in cell:
        header = ["test accuracy %", "validation accuracy %"]
        return header, [_spread_text(cell["test_accuracy"], 100, 1), _spread_text(cell["validation_accuracy"], 100, 1)]
    header = ["test perplexity", "validation perplexity"]
    figures = [_spread_text(cell["test_perplexity"], digits=2), _spread_text(cell["validation_perplexity"], digits=2)]
    if "control_share" in cell:
        header.append("sentiment control share")
        figures.append(_spread_text(cell["control_share"], digits=2))
    return header, figures


def _headline_row(table: Sequence[Row], cell: Mapping[str, Any], row: Row) -> list[str]:
    return [
        f"`{row.variant}`",
        f"{cell['learning_rate']:g}",
        f"{cell['trainable_params']:,} ({cell['trainable_percent']:.2f}%)",
        *_quality_columns(cell)[1],
        f"{row.step_s:.3f}" if row.step_s is not None else "n/a",
        ratio_text(speedup(table, row.plan, row.variant)),
        megabytes_text(cell["base_weight_memory_bytes"]),
        megabytes_text(row.training_memory_bytes),
    ]


def headline_table(results: Results, plan: str) -> str:
    """Quality, size, speed and memory of every variant of one plan, best first (the README quotes it)."""
    table, cells = rows(results), results["aggregate"][plan]
    measured = plan_rows(table, plan)
    shown = [_headline_row(table, cells[variant], measured[variant]) for variant in ranking(table, plan)]
    quality_header = _quality_columns(next(iter(cells.values())))[0]
    header = ["variant", "learning rate", "trainable", *quality_header, "step s", "speed vs LoRA"]
    return markdown_table([*header, "base weights MB", "training memory MB"], shown)


def headline_tables(results: Results) -> str:
    """Every plan's headline table under a line naming its model and budget."""
    return "\n".join(
        f"**{plan['name']}**: `{plan['model']}` on `{plan['dataset']}`, {plan['steps']} steps, "
        f"seeds {', '.join(str(s) for s in plan['seeds'])}\n\n" + headline_table(results, plan["name"])
        for plan in results["plans"]
        if plan["name"] in results["aggregate"]
    )


def reference_rows(results: Results) -> dict[tuple[str, str], Row]:
    """The kept figures of the last suite at another precision, by (plan, variant); empty if none."""
    reference = results.get("reference")
    if not reference:
        return {}
    kept = {"plans": results["plans"], "aggregate": reference["aggregate"], "speed": reference.get("speed", {})}
    return {(row.plan, row.variant): row for row in rows(kept)}


def _quality_text(row: Row) -> str:
    scale, digits = (100, 1) if row.metric == "accuracy" else (1, 2)
    spread = f" ± {scale * row.std:.{digits}f}" if row.std is not None else ""
    return f"{scale * row.mean:.{digits}f}{spread}"


def _change_text(row: Row, before: Row) -> str:
    """Accuracy: the change in points; perplexity: the relative change."""
    if row.metric == "accuracy":
        return f"{100 * (row.mean - before.mean):+.1f} points"
    return f"{100 * (row.mean / before.mean - 1):+.1f}%"


def precision_table(results: Results, plan: str) -> str:
    """Each variant's test quality and step time at this suite's precision beside the kept
    reference precision's (empty when there is no reference)."""
    before_rows = reference_rows(results)
    now, then = results.get("precision") or "fp32", (results.get("reference") or {}).get("precision")
    shown = []
    then_cells = (results.get("reference") or {}).get("aggregate", {}).get(plan, {})
    for variant in ranking(rows(results), plan):
        row, before = plan_rows(rows(results), plan)[variant], before_rows.get((plan, variant))
        if before is None or then_cells[variant]["seeds"] != results["aggregate"][plan][variant]["seeds"]:
            continue  # compared on the same seeds only
        shown.append(
            [
                f"`{variant}`",
                _quality_text(row),
                _quality_text(before),
                _change_text(row, before),
                f"{row.step_s:.3f}" if row.step_s else "n/a",
                f"{before.step_s:.3f}" if before.step_s else "n/a",
                ratio_text(speed_ratio(row.step_s, before.step_s)),
            ]
        )
    if not shown:
        return ""
    metric = "accuracy %" if row.metric == "accuracy" else "perplexity"
    header = [
        "variant",
        f"{now} test {metric}",
        f"{then} test {metric}",
        "change",
        f"{now} step s",
        f"{then} step s",
        f"{now} speed vs {then}",
    ]
    return markdown_table(header, shown)


def speed_table(results: Results, plan: str) -> str:
    """Every timed entry of one plan (extra SparseLoRA settings too): step, throughput, memory parts."""
    timed = timings(results, plan)
    lora_s = timed.get("lora", {}).get("median_step_s")
    shown = [
        [
            f"`{entry['label']}`",
            f"{entry['median_step_s']:.3f}",
            f"{entry['tokens_per_s']:,.0f}",
            ratio_text(speed_ratio(entry["median_step_s"], lora_s)),
            f"{entry['flops_ratio_vs_lora']:.2f}" if entry["flops_ratio_vs_lora"] is not None else "",
            f"{entry['exact_skip_share']:.2f}" if entry.get("exact_skip_share") is not None else "",
            f"{entry['estimator_recall']:.2f}" if entry["estimator_recall"] is not None else "",
            *(megabytes_text(entry["memory"][key]) for key, _ in MEMORY_PARTS),
        ]
        for entry in timed.values()
    ]
    # "exact skips": the share of LoRA's FLOPs skipped where nothing reads the result (padding, the
    # last layer's context); the rest of the saving is contextual sparsity.
    header = ["entry", "median step s", "tokens/s", "speed vs LoRA", "FLOPs vs LoRA", "exact skips", "recall"]
    return markdown_table(header + [f"{label} MB" for _, label in MEMORY_PARTS], shown)


PROBE_COLUMNS = (
    ("oracle_error", "one set per batch (oracle)"),
    ("estimator_error", "the estimator's set"),
    ("estimator_recall", "estimator recall"),
    ("sequence_oracle_error", "one set per sequence"),
    ("token_oracle_error", "one set per token"),
)


def _layer_span(layers: list[int]) -> str:
    return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])


def probe_groups(results: Results, plan: str) -> dict[str, tuple[str, list[int]]]:
    """The probed layers as `sparselora` (the default) treats them on this plan, by role (dense,
    sliced, last: by default its FFN for the output tokens only) with their label; empty if not probed."""
    records = results.get("probe", {}).get(plan)
    sparselora = timings(results, plan).get("sparselora")
    if not records or sparselora is None:
        return {}
    layers = max(record["layer"] for record in records) + 1
    schedule = layer_schedule(layers, sparselora["hparams"])
    dense = [layer for layer, ratio in enumerate(schedule[:-1]) if ratio == 0]
    sliced = [layer for layer, ratio in enumerate(schedule) if ratio > 0]
    groups = {"dense": (f"dense in `sparselora` ({_layer_span(dense)})", dense)} if dense else {}
    groups["sliced"] = (f"sliced by `sparselora` ({_layer_span(sliced)})", sliced)
    reads = "outputs only" if sparselora["hparams"]["last_layer"] == "outputs" else "every token"
    groups["last"] = (f"last ({layers - 1}: {reads})", [layers - 1])
    return groups


def probe_means(results: Results, plan: str, layers: list[int], sparsity: float) -> dict[str, float]:
    """The probe's figures at `sparsity`, averaged over `layers`."""
    chosen = [r for r in results["probe"][plan] if r["layer"] in layers and r["sparsity"] == sparsity]
    return {key: statistics.fmean(r[key] for r in chosen) for key, _ in PROBE_COLUMNS}


def probe_table(results: Results, plan: str) -> str:
    """Per sparsity and group of layers, the share of a context token's FFN output lost when only
    the batch's top channels run (research/probe); empty when the plan was not probed."""
    groups = probe_groups(results, plan)
    if not groups:
        return ""
    sparsities = sorted({record["sparsity"] for record in results["probe"][plan]})
    shown = [
        [f"{sparsity:g}", label, *(f"{value:.2f}" for value in probe_means(results, plan, layers, sparsity).values())]
        for sparsity in sparsities
        for label, layers in groups.values()
    ]
    return markdown_table(["FFN sparsity", "layers", *(label for _, label in PROBE_COLUMNS)], shown)


def probe_evidence(results: Results) -> str:
    """What the probe says about the layers `sparselora` slices, at its sparsity, on each probed plan."""
    said = []
    for plan in results.get("probe", {}):
        groups = probe_groups(results, plan)
        sparsity = timings(results, plan).get("sparselora", {}).get("hparams", {}).get("ffn_sparsity")
        if not groups or sparsity not in {record["sparsity"] for record in results["probe"][plan]}:
            continue
        layers = groups["sliced"][1]
        lost = probe_means(results, plan, layers, sparsity)
        said.append(
            f"{plan}, layer{'s' if len(layers) > 1 else ''} {_layer_span(layers)} at {sparsity:g}: "
            f"{lost['oracle_error']:.2f} with the oracle's channels, {lost['estimator_error']:.2f} with the "
            f"estimator's, {lost['sequence_oracle_error']:.2f} with a set per sequence and "
            f"{lost['token_oracle_error']:.2f} with one per token"
        )
    if not said:
        return ""
    return (
        "How much of an FFN's output a batch's channel set loses in the layers `sparselora` slices "
        "(the probe, in each plan's section): " + "; ".join(said) + ". Only a set shared by the batch keeps "
        "the sliced products dense; where even a set per token loses much, the loss is the FFN's own "
        "density, not the estimator's choice.\n"
    )


def _training_text(results: Results) -> str:
    training = results["training"]
    reused = training["runs"] - training["trained_now"]
    return (
        f"It trained {training['trained_now']} of its {training['runs']} runs"
        + (
            f" and reused {reused} that an earlier invocation had completed with the same configuration"
            if reused
            else ""
        )
        + f"; the {training['runs']} runs took {training['run_time_s'] / 60:.0f} minutes in all, between "
        f"{training['first_started_at']} and {training['last_finished_at']}. Library versions:"
    )


def _answers_markdown(results: Results) -> list[str]:
    """Each question as the Guide shows it: one sentence, (the figure's file), the table, then the detail."""
    table = rows(results)
    said, short = answers(table), headlines(table)
    parts = []
    for key, question in QUESTIONS:
        parts.append(f"### {question}\n")
        if not said[key]:
            parts.append("_Not measured in this suite._\n")
            continue
        parts.append(f"**{short[key]}** (figure: `figures/{key}.json`)\n\n{question_table(table, key)}")
        parts.append(f"In detail: {said[key]}\n")
        if key == "sparselora":
            parts.append(probe_evidence(results))
    return [part for part in parts if part]


def _preamble(results: Results) -> list[str]:
    """The title, where and how the figures were produced, and what was measured again since."""
    hardware, versions = results["hardware"], results["versions"]
    return [
        "# LoRA Arena benchmark results\n",
        f"Produced by `{results['command']}` ({results['suite']} suite) on {results['started_at']}, "
        f"in {results['duration_s'] / 60:.0f} minutes on {_machine(hardware)} "
        f"({hardware['device']}, {hardware['memory_bytes'] / 2**30:.0f} GiB), computing in "
        f"{results.get('precision') or 'fp32'}{_attention_text(results)}. {_training_text(results)} "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + f".{_since_text(results)} Every figure below is in `results.json` beside this file; the figures the "
        "app's Guide tab draws are in `figures/`.\n",
        METHOD_TEXT
        + (SWEEP_TEXT if results["sweep"] else "Learning rates: each method's default (this suite has no sweep).\n"),
    ]


def _since_text(results: Results) -> str:
    """What was measured again after the suite, oldest first: every plan's step times and memory
    without training (`bench --retime`), or some plans run again whole (`bench --suite NAME --plan P`)."""
    events = [(rerun["started_at"], _rerun_text(results, rerun)) for rerun in results.get("reruns", [])]
    timed = results.get("timed")
    if timed:
        events.append(
            (
                timed["started_at"],
                f" Every plan's step times and memory were measured again, without training, by `{timed['command']}` "
                f"on {timed['started_at']} ({timed['duration_s'] / 60:.0f} minutes, {_machine(timed['hardware'])}, "
                f"torch {timed['versions']['torch']}, C allocator: {timed['hardware']['allocator']}).",
            )
        )
    return "".join(text for _, text in sorted(events))


def _rerun_text(results: Results, rerun: Mapping[str, Any]) -> str:
    plans, training = rerun["plans"], rerun["training"]
    reused = training["runs"] - training["trained_now"]
    probed = all(plan in results.get("probe", {}) for plan in plans)
    return (
        f" The {' and '.join(plans)} plan{'s were' if len(plans) > 1 else ' was'} run again by `{rerun['command']}` "
        f"on {rerun['started_at']} ({rerun['duration_s'] / 60:.0f} minutes, {_machine(rerun['hardware'])}, "
        f"{rerun['hardware']['device']}, torch {rerun['versions']['torch']}): {training['trained_now']} runs trained"
        + (f" and {reused} reused from an earlier invocation" if reused else "")
        + (", steps timed and FFNs probed" if probed else ", steps timed")
        + "; the figures of the other plans are unchanged."
    )


def _machine(hardware: Mapping[str, Any]) -> str:
    """What a step time depends on, in words, e.g. 2 cores of AMD EPYC (family 25, model 17)."""
    generation = f" ({hardware['cpu_generation']})" if hardware.get("cpu_generation") else ""
    return f"{hardware['cores']} cores of {hardware['cpu']}{generation}"


def _attention_text(results: Results) -> str:
    """Which attention kernels timed the steps (suites from before the choice recorded none)."""
    kernels = sorted({row["attention"] for rows in results["speed"].values() for row in rows if "attention" in row})
    return f", steps timed with {' and '.join(kernels)} attention" if kernels else ""


def _plan_section(results: Results, plan: Mapping[str, Any]) -> list[str]:
    """One plan's budget, headline table, base model figures and speed table."""
    name = plan["name"]
    parts = [
        f"## {name}: `{plan['model']}` on `{plan['dataset']}`\n\n"
        f"{plan['steps']} steps, batch {plan['batch_size']}, sequence {plan['seq_len']}, "
        f"seeds {', '.join(str(s) for s in plan['seeds'])}"
        + "".join(f", {value} {FIELDS[name].setting.label}" for name, value in plan["run_settings"].items() if value)
        + ".\n",
        headline_table(results, name),
    ]
    cell = next(iter(results["aggregate"][name].values()))
    control = (
        f"; sentiment control share {cell['base_control_share']['mean']:.2f}" if "base_control_share" in cell else ""
    )
    base = ", ".join(f"{k} {v:.3f}" for k, v in cell["base_validation"].items())
    parts.append(f"Base model (no training), validation: {base}{control}.\n")
    compared = precision_table(results, name)
    if compared:
        reference = results["reference"]
        then_cpu, now_cpu = (reference.get("hardware") or {}).get("cpu"), results["hardware"]["cpu"]
        where = f" on another machine ({then_cpu})" if then_cpu and then_cpu != now_cpu else ""
        parts.append(
            f"What {results['precision']} changed: the same plan in {reference['precision']} (the suite of "
            f"{reference['started_at']}{where}, kept). Quality is on the same seeds with each precision's "
            "own swept rates; the step times come from two processes on two days, so their ratio carries "
            "that noise (`python -m training bench --precision fp32,bf16` times both in one process).\n"
        )
        parts.append(compared)
    if results["speed"].get(name):
        first = results["speed"][name][0]
        parts.append(f"Speed and memory, {first['steps']} interleaved steps after {first['warmup']} warm-up steps:\n")
        parts.append(speed_table(results, name))
    if probe_groups(results, name):
        first = results["probe"][name][0]
        parts.append(
            f"How much of each FFN's output a context token loses when only the batch's top channels run "
            f"(`python -m training probe`, {first['batches']} training batches, {first['context_tokens']:,} context "
            "tokens; means over the layers; recall: the share of the oracle's channels the estimator picks):\n"
        )
        parts.append(probe_table(results, name))
    return parts


def _sweep_section(results: Results) -> list[str]:
    """The learning-rate trials and which one each family chose."""
    shown = []
    for trial in results["sweep"]:
        metric = next(k for k in trial if k.startswith("validation_"))
        shown.append(
            [
                trial["plan"],
                trial["family"],
                f"{trial['learning_rate']:g}",
                f"{metric.removeprefix('validation_')} {trial[metric]:.4f}",
                "chosen" if trial.get("chosen") else "",
            ]
        )
    header = ["plan", "family", "learning rate", "validation", ""]
    return ["## Learning-rate sweep (validation split, first seed)\n", markdown_table(header, shown)]


def markdown(results: Results) -> str:
    """The whole report: preamble, answers, one section per plan, the sweep, the judge, how to reproduce."""
    parts = [*_preamble(results), "## Answers\n", *_answers_markdown(results)]
    for plan in results["plans"]:
        if plan["name"] in results["aggregate"]:
            parts += _plan_section(results, plan)
    if results["sweep"]:
        parts += _sweep_section(results)
    if results.get("judge"):
        judge = results["judge"]
        parts.append(
            f"Generated reviews were judged by `{judge['cell']}` (run `{judge['run']}`, validation "
            f"accuracy {judge['validation_accuracy']:.3f}).\n"
        )
    parts.append(REPRODUCE_TEXT)
    return "\n".join(parts)
