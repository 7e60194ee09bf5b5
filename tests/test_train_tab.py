"""The Train tab's pure parts, on hand-written summaries and records as the engine writes them:
form checks, runs list, status and phase, progress, summary table, and the two live charts."""

from __future__ import annotations

import re

import pytest

from training.core import defaults
from training.core.config import ConfigError
from ui import charts, train_tab
from ui.arena import run_label

RUN = "20990101-000000-sentiment-lora-0001"
PARTS = {"weights_bytes": 90_000_000, "gradient_bytes": 300_000, "optimizer_bytes": 600_000}


def train_record(step: int, activations: int = 20_000_000, breakdown: bool = True) -> dict:
    record = {
        "kind": "train",
        "step": step,
        "loss": 0.7 - 0.01 * step,
        "step_time_s": 0.5,
        "tokens_per_s": 2000.0 + step,
        "elapsed_s": 10.0 + 0.5 * step,
        "rss_bytes": 1_200_000_000,
    }
    if breakdown:
        record |= {**PARTS, "activation_bytes": activations, "training_memory_bytes": 90_900_000 + activations}
    return record


def eval_record(step: int, loss: float, **flags) -> dict:
    return {"kind": "eval", "step": step, "loss": loss, "accuracy": 0.5 + step / 100, "examples": 64, **flags}


RECORDS = [eval_record(0, 0.69, base=True), *(train_record(step) for step in range(1, 11)), eval_record(5, 0.6)]
FINISHED = {
    "status": "completed",
    "planned_steps": 10,
    "primary_metric": "accuracy",
    "trainable_params": 150_000,
    "trainable_percent": 0.66,
    "base_weight_memory_bytes": 90_000_000,
    "training_memory_bytes": 110_900_000,
    "memory_breakdown": {**PARTS, "activation_bytes": 20_000_000},
    "peak_rss_bytes": 1_250_000_000,
    "base_metrics": {"validation": {"accuracy": 0.5}},
    "metrics": {"validation": {"accuracy": 0.81, "macro_f1": 0.8}, "test": {"accuracy": 0.79}},
    "split_examples": {"validation": 64, "test": 72},
    "load_time_s": 6.0,
    "eval_time_s": 14.0,
    "train_time_s": 20.0,
    "wall_time_s": 42.0,
    "overhead_share": 20 / 42,
    "phase": {"name": "saving", "step": 10, "done": 0, "total": None, "started_at": 0.0, "updated_at": 0.0},
}


def describe(state: str = "running", summary: dict | None = None, **extra) -> dict:
    return {
        "id": RUN,
        "state": state,
        "queue_position": None,
        "status": (summary or {}).get("status"),
        "error": None,
        "summary": summary or {},
        "stop_requested": False,
        "task": "sentiment",
        "method": "lora",
        **extra,
    }


def running(phase: str, done: int = 0, total: int | None = None, step: int | None = 5) -> dict:
    summary = {"status": "running", "planned_steps": 10, "eval_steps": 5, "eval_examples": 64}
    summary |= {"eval_s_per_example": 0.01, "final_eval_examples": 2550}
    summary["phase"] = {"name": phase, "step": step, "done": done, "total": total, "started_at": 0.0, "updated_at": 1.0}
    return describe("running", summary)


# -- the form ------------------------------------------------------------------------------------


def form(**changes) -> list:
    values = {
        "task": "sentiment",
        "model": "",
        "dataset": "",
        "upload": None,
        "method": "lora",
        "seed": 0.0,
        "precision": "auto",
        "max_steps": 20.0,
        "batch_size": 16.0,
        "seq_len": 128.0,
        "eval_steps": "",
        "eval_samples": "",
        "eval_subsample": "",
    }
    values |= changes
    hparams = {name: None for name in train_tab.HPARAMS} | {"rank": 8.0}
    choices = [values[name] for name in ("task", "model", "dataset", "upload", "method")]
    # a field this machine adds (processes, on 2+ GPUs or core pairs) keeps its default
    settings = (values.get(field.name, field.default) for field in train_tab.FORM_SETTINGS)
    return [*choices, *settings, *hparams.values()]


@pytest.mark.parametrize(
    ("field", "label"),
    [("max_steps", r"steps \(max_steps\)"), ("batch_size", "batch size"), ("seq_len", r"sequence length \(seq_len\)")],
)
def test_a_fractional_budget_is_refused_naming_the_field_not_rounded(field, label):
    with pytest.raises(ConfigError, match=f"^{label} must be a whole number \\(got 2.5\\)"):
        train_tab.form_config(*form(**{field: 2.5}))


@pytest.mark.parametrize("text", ["2.5", "many"])
def test_the_evaluation_fields_refuse_what_is_not_a_whole_number(text):
    with pytest.raises(ConfigError, match=r"^validation subsample \(eval_subsample\) must be a whole number"):
        train_tab.form_config(*form(eval_subsample=text))
    with pytest.raises(ConfigError, match=r"^final evaluation examples \(eval_samples\) must be a whole number"):
        train_tab.form_config(*form(eval_samples=text))
    assert train_tab.form_config(*form(eval_subsample=" 64 ")).eval_subsample == 64


def test_empty_evaluation_fields_and_learning_rate_mean_the_defaults():
    config = train_tab.form_config(*form())
    assert config.eval_steps is None and config.eval_samples is None and config.eval_subsample is None
    assert config.max_steps == 20 and isinstance(config.max_steps, int)
    assert config.hparams == {"rank": 8}  # no learning rate: the engine fills the tuned default


def test_the_learning_rate_follows_task_model_and_method_and_says_where_it_comes_from():
    tuned = train_tab.on_model("sentiment", "bundled/all-MiniLM-L6-v2", "lora")
    assert tuned["value"] == defaults.hparam_defaults("sentiment", "bundled/all-MiniLM-L6-v2", "lora")["learning_rate"]
    assert "default " + defaults.note("sentiment", "bundled/all-MiniLM-L6-v2", "lora") in tuned["info"]
    fields = dict(zip(train_tab.HPARAMS, train_tab.on_method("sentiment", "bundled/all-MiniLM-L6-v2", "full")))
    assert fields["rank"]["visible"] is False and fields["learning_rate"]["visible"] is True
    assert "default" in fields["learning_rate"]["info"]


def test_float_fields_step_finely_and_whole_ones_by_one():
    specs = train_tab.HPARAMS
    assert train_tab.arrow_step(specs["learning_rate"]) == 0.0001
    assert train_tab.arrow_step(specs["dropout"]) == 0.05
    assert train_tab.arrow_step(specs["rank"]) == 1


# -- runs, queue and status ------------------------------------------------------------------------


def test_runs_are_listed_state_first_then_id():
    runs = [describe("queued", queue_position=2), describe("finished", {"status": "stopped"})]
    runs[1]["id"] = "older"
    # the state first; the method only where the id does not name it (an id given by hand)
    assert train_tab.run_choices(runs) == [(f"queued #2 · {RUN}", RUN), ("stopped · older · lora", "older")]


def test_the_queue_shows_positions_and_marks_this_browsers_runs():
    queue = [{"id": "a", "position": 1, "task": "sentiment", "method": "lora"}]
    queue.append({"id": "b", "position": 2, "task": "generation", "method": "qlora"})
    text = train_tab.queue_markdown(queue, {"b"})
    assert "1. `a` (sentiment, lora)" in text and "2. `b` (generation, qlora, yours)" in text
    assert train_tab.queue_markdown([], set()) == ""


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (describe("queued", queue_position=3), "**Queued**: position 3 in line"),
        (describe("starting"), "**Loading the model and data**"),
        (describe("running", stop_requested=True), "**Stopping…"),
        (describe("finished", {"status": "stopped"}), "**Stopped**"),
        (describe("failed", {"status": "failed"}, error="out of memory"), "**Failed**: out of memory"),
        (describe("cancelled"), "**Cancelled before it started**"),
    ],
)
def test_the_status_line_says_the_state_and_the_run_id(state, expected):
    text = train_tab.status_markdown(state, [])
    assert text.startswith(expected)
    assert re.search(r"run (\S+)", text.replace("`", "")).group(1) == RUN  # the browser test reads it so


@pytest.mark.parametrize(
    ("phase", "words"),
    [
        ("base evaluation", "**Evaluating the base model**: 32 / 64 examples"),
        ("training", "**Training**: step 32 / 64"),
        ("evaluation", "**Evaluating at step 48**: 32 / 64 examples"),
        ("final evaluation", "**Final evaluation (validation and test)**: 32 / 64 examples"),
    ],
)
def test_a_running_run_shows_its_phase(phase, words):
    assert train_tab.status_markdown(running(phase, done=32, total=64, step=48), []).startswith(words)


def test_an_evaluation_has_its_own_progress_bar_and_the_eta_comes_with_it():
    records = [train_record(step) for step in range(1, 6)]
    text = train_tab.progress_html(running("evaluation", done=32, total=64), records)
    assert text.count("arena-progress-bar") == 2
    assert "width:50.0%" in text  # 5 of 10 steps, and 32 of 64 examples
    assert "step 5 / 10" in text and "evaluation 32 / 64 examples" in text and "ETA" in text


def test_training_has_one_bar_and_a_finished_run_no_eta():
    records = [train_record(step) for step in range(1, 11)]
    assert train_tab.progress_html(running("training", done=4, total=10), records[:4]).count("arena-progress-bar") == 1
    done = train_tab.progress_html(describe("finished", FINISHED), records)
    assert "step 10 / 10" in done and "ETA" not in done
    assert train_tab.progress_html(describe("queued"), []) == ""


# -- the summary table -----------------------------------------------------------------------------


def test_a_finished_run_reports_memory_in_mb_timings_and_final_metrics():
    text = train_tab.summary_markdown(FINISHED, RECORDS + [eval_record(10, 0.5, final=True)])
    for row in (
        "| base weight memory | 90.0 MB |",
        "| training memory (peak) | 111 MB |",
        "| ↳ gradients | 0.3 MB |",
        "| ↳ activations saved for backward | 20.0 MB |",
        "| process memory (RSS peak, runtime included) | 1,250 MB |",
        "| time loading | 6.0s |",
        "| time evaluation | 14s |",
        "| loading + evaluation share of wall time | 48% |",
        "| final validation accuracy (64 examples) | 81.0% |",
        "| final test accuracy (72 examples) | 79.0% |",
        "| final validation macro-F1 | 0.800 |",  # a one-class answer keeps accuracy: this shows it
        "| base model validation accuracy (64 examples) | 50.0% |",
        "| validation accuracy (step 5, 64 examples) | 55.0% |",
    ):
        assert row in text, row


def test_a_running_run_shows_its_peak_so_far_and_no_timings():
    records = [train_record(1, activations=10_000_000), train_record(2, activations=30_000_000)]
    text = train_tab.summary_markdown({"base_weight_memory_bytes": 90_000_000}, records)
    assert "| training memory (peak) | 121 MB |" in text and "| ↳ activations saved for backward | 30.0 MB |" in text
    assert "time loading" not in text and "wall time" not in text


def test_an_old_run_without_the_breakdown_says_n_a_and_keeps_its_rss():
    old = {"status": "completed", "peak_memory_bytes": 1_100_000_000, "primary_metric": "accuracy"}
    text = train_tab.summary_markdown(old, [train_record(1, breakdown=False)])
    assert "| training memory (peak) | n/a |" in text and "| base weight memory | n/a |" in text
    assert "| process memory (RSS peak, runtime included) | 1,100 MB |" in text


# -- the charts ------------------------------------------------------------------------------------


def test_the_memory_chart_stacks_the_parts_in_mb_from_zero_with_rss_in_a_panel_of_its_own():
    figure = charts.resources_figure(RECORDS)
    traces = {trace.name: trace for trace in figure.data}
    stacked = [trace.name for trace in figure.data if trace.stackgroup == "memory"]
    assert stacked == ["weights (frozen + trained)", "gradients", "optimizer state", "activations saved for backward"]
    assert traces["weights (frozen + trained)"].y[0] == pytest.approx(90.0)  # MB = 1e6 bytes
    assert traces["weights (frozen + trained)"].yaxis == "y"
    # ~1 GB of runtime: not over the parts (it read as their ceiling), but in the panel below
    rss = traces["process RSS"]
    assert rss.line.dash == "dash" and rss.yaxis == "y2" and rss.y[0] == pytest.approx(1200.0)
    assert traces["tokens/s"].yaxis == "y3"
    assert figure.layout.yaxis.title.text == "training MB" and figure.layout.yaxis2.title.text == "process MB"
    assert all(axis.rangemode == "tozero" for axis in (figure.layout.yaxis, figure.layout.yaxis2, figure.layout.yaxis3))
    assert figure.layout.title.text == "Training memory by part, and speed"


def test_the_memory_chart_after_one_step_draws_its_parts_as_dots():
    figure = charts.resources_figure([train_record(1)])  # an area needs two steps: it would draw nothing
    assert {trace.mode for trace in figure.data if trace.stackgroup == "memory"} == {"lines+markers"}
    assert {trace.mode for trace in charts.resources_figure(RECORDS).data if trace.stackgroup == "memory"} == {"lines"}


def test_the_memory_chart_of_an_old_run_draws_rss_alone_on_the_mb_axis():
    figure = charts.resources_figure([train_record(step, breakdown=False) for step in (1, 2)])
    names = [trace.name for trace in figure.data if trace.showlegend is not False]
    assert names == ["process RSS", "tokens/s"]
    assert figure.data[0].yaxis == "y" and figure.layout.yaxis.title.text == "process MB"
    assert figure.layout.yaxis.rangemode == "tozero"


def test_the_loss_chart_marks_the_base_and_the_final_evaluation():
    figure = charts.loss_figure(RECORDS + [eval_record(10, 0.5, final=True)])
    traces = {trace.name: trace for trace in figure.data}
    assert figure.data[0].name == "training loss" and figure.data[0].x[0] == 1
    assert list(traces["validation loss (subsample)"].x) == [0, 5]  # starts from the base model
    assert list(traces["base model (before training)"].x) == [0]
    final = traces["final validation (64 examples)"]
    assert list(final.x) == [10] and final.marker.symbol == "star"


def test_charts_wait_for_the_first_step():
    for figure in (charts.loss_figure([]), charts.resources_figure([])):
        assert not figure.data and figure.layout.annotations[0].text == "waiting for the first step"


# -- which run the page shows ----------------------------------------------------------------------


class FakeArena:
    """The facade as the Train tab uses it: one browser's runs, the queue, a run's state and records."""

    def __init__(self, runs: dict[str, list[dict]]) -> None:
        self.runs = runs  # owner token -> describe() dicts, newest first

    def runs_of(self, owner_token: str) -> list[dict]:
        return self.runs.get(owner_token, [])

    def queue(self) -> list[dict]:
        return [{"id": "other", "position": 1, "task": "sentiment", "method": "hira"}]

    def describe(self, run_id: str) -> dict:
        return next(run for runs in self.runs.values() for run in runs if run["id"] == run_id)

    def records(self, run_id: str) -> list[dict]:
        return RECORDS


def test_a_fresh_browser_shows_no_one_elses_run():
    arena = FakeArena({"someone": [describe("running", running("training")["summary"])]})
    run_id, shown, token = train_tab.attach_browser(arena, None, "")
    assert run_id is None and shown is None and token and token != "someone"


def test_a_reload_shows_the_last_picked_run_if_it_is_still_this_browsers():
    older = describe("finished", FINISHED) | {"id": "older"}
    arena = FakeArena({"me": [describe("running", running("training")["summary"]), older]})
    assert train_tab.attach_browser(arena, "older", "me")[0] == "older"
    assert train_tab.attach_browser(arena, "deleted-since", "me")[0] == RUN  # else the newest
    assert train_tab.attach_browser(arena, "older", "someone else")[0] is None


def test_a_tick_lists_the_runs_and_redraws_only_what_changed():
    arena = FakeArena({"me": [describe("finished", FINISHED)]})
    picker, queue, status, progress, loss, resources, summary, shown = train_tab.refresh_views(
        arena, RUN, None, "step", "me"
    )
    assert picker["choices"] == [(f"completed · {RUN}", RUN)] and picker["value"] == RUN
    assert "1. `other` (sentiment, hira)" in queue and status.startswith("**Completed**")
    assert loss.data and resources.data and "training memory" in summary
    again = train_tab.refresh_views(arena, RUN, shown, "step", "me")
    assert all(isinstance(part, dict) and part.get("__type__") == "update" and len(part) == 1 for part in again[:-1])


def test_the_table_gains_the_models_figures_when_loading_ends_before_any_record():
    loading = running("loading")
    arena = FakeArena({"me": [loading]})
    arena.records = lambda run_id: []  # nothing logged until the base evaluation has ended
    *_, table, shown = train_tab.refresh_views(arena, RUN, None, "step", "me")
    assert "trainable parameters" not in table
    summary = loading["summary"]
    summary |= {"trainable_params": 150_000, "trainable_percent": 0.66, "base_weight_memory_bytes": 90_000_000}
    summary["phase"] = {**summary["phase"], "name": "base evaluation"}
    *_, table, shown = train_tab.refresh_views(arena, RUN, shown, "step", "me")
    assert "trainable parameters" in table and "150,000" in table


def test_a_tick_sent_before_a_newer_pick_draws_nothing():
    pages = train_tab.PagePicks(pages=2)
    assert pages.is_current("page", "finished-run")  # a page no handler has seen draws its ticks
    pages.pick("page", "new-run")  # Start, while a tick for the finished run is on its way
    assert not pages.is_current("page", "finished-run") and pages.is_current("page", "new-run")
    assert pages.is_current("another page", "finished-run")  # each page has its own pick
    pages.pick("page", None)  # Delete
    assert not pages.is_current("page", "new-run") and pages.is_current("page", None)
    pages.pick("second", "a")
    pages.pick("third", "b")  # the oldest page is forgotten beyond `pages`
    assert pages.is_current("page", "new-run") and not pages.is_current("third", "a")


def test_every_run_list_names_a_run_the_same_way():
    assert run_label(RUN, "lora", "accuracy 72.6%") == f"{RUN} · accuracy 72.6%"  # the id says the method
    assert run_label("older", "lora") == "older · lora"  # an id of its own: the method is added
    assert run_label("older", None) == "older"
