"""The results suite on tiny models: sweep, cells, reuse, report, figures and one-cell reruns."""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import plotly.io
import pytest

from training.cli import main
from training.core.runs import RunStore
from training.research import report, suite


@pytest.fixture(scope="module")
def plans(tiny_models, review_csv) -> tuple[suite.Plan, ...]:
    # Two layers: the default schedule (the first half and the last dense) would leave nothing sparse.
    two_layers = {
        name: {"layer_sparsity": "auto", "dense_first_layers": 0} for name in ("sparselora", "sparselora-4bit")
    }
    return (
        suite.Plan(
            "sentiment",
            "sentiment",
            tiny_models["bert"],
            str(review_csv),
            steps=4,
            batch_size=8,
            seq_len=32,
            seeds=(0, 1),
            variants=("lora", "qlora", "hira", "sparselora"),
            sweep={"lora": (1e-3, 2e-2), "hira": (1e-2,)},
            run_settings={"eval_samples": 40, "control_samples": 0},
            speed_steps=2,
            speed_extra={"sparselora-s50": ("sparselora", {"ffn_sparsity": 0.5})},
            overrides=two_layers,
            probe_sparsities=(0.5, 0.9),
        ),
        suite.Plan(
            "generation",
            "generation",
            tiny_models["llama"],
            "bundled/review-writing",
            steps=3,
            batch_size=4,
            seq_len=48,
            seeds=(0,),
            variants=("lora", "sparselora"),
            sweep={},
            rates_from="sentiment",
            run_settings={"eval_samples": 8, "control_samples": 4},
            speed_steps=2,
            overrides=two_layers,
        ),
    )


@pytest.fixture(scope="module")
def published(plans, tmp_path_factory):
    runs, out = tmp_path_factory.mktemp("suite-runs"), tmp_path_factory.mktemp("results")
    results = suite.run_suite(plans, runs, offline=True, log=lambda line: None, name="test")
    report.write(results, out)
    return runs, out, json.loads((out / "results.json").read_text())


def test_the_sweep_picks_each_familys_best_validation_rate_and_the_family_uses_it(published):
    _, _, results = published
    lora_trials = [t for t in results["sweep"] if t["family"] == "lora"]
    best = max(lora_trials, key=lambda t: t["validation_accuracy"])
    assert [t["chosen"] for t in lora_trials].count(True) == 1 and best["chosen"]
    assert results["learning_rates"]["sentiment"] == {"lora": best["learning_rate"], "hira": 1e-2}
    assert results["learning_rates"]["generation"] == results["learning_rates"]["sentiment"]
    rates = {(c["plan"], c["variant"]): c["hparams"]["learning_rate"] for c in results["cells"]}
    for variant in ("lora", "qlora", "sparselora"):  # one adapter, one rate
        assert rates["sentiment", variant] == best["learning_rate"]
    assert rates["sentiment", "hira"] == 1e-2 and rates["generation", "sparselora"] == best["learning_rate"]


def test_every_cell_trained_to_the_same_budget_and_the_aggregate_is_their_mean(published):
    _, _, results = published
    cells = results["cells"]
    assert sorted((c["cell"], c["seed"]) for c in cells) == sorted(
        [(f"sentiment/{v}", s) for v in ("lora", "qlora", "hira", "sparselora") for s in (0, 1)]
        + [("generation/lora", 0), ("generation/sparselora", 0)]
    )
    assert all(len(c["loss_curve"]) == (4 if c["plan"] == "sentiment" else 3) for c in cells)
    lora = [c["test"]["accuracy"] for c in cells if c["cell"] == "sentiment/lora"]
    figure = results["aggregate"]["sentiment"]["lora"]["test_accuracy"]
    assert figure["mean"] == pytest.approx(statistics.fmean(lora)) and figure["n"] == 2
    assert figure["std"] == pytest.approx(statistics.stdev(lora))
    assert results["judge"]["cell"].startswith("sentiment/")  # the generated reviews' judge
    generated = results["aggregate"]["generation"]["lora"]
    shares = [c["control_share"] for c in cells if c["cell"] == "generation/lora"]
    assert all(share * 4 == round(share * 4) for share in shares)  # each judged its 4 sampled reviews
    assert generated["control_share"]["mean"] == pytest.approx(statistics.fmean(shares))
    assert "validation_perplexity" in generated


def test_speed_is_timed_side_by_side_with_memory_counted_from_the_tensors(published):
    _, _, results = published
    speed = {e["label"]: e for e in results["speed"]["sentiment"]}
    assert list(speed) == ["lora", "qlora", "hira", "sparselora", "sparselora-s50"]
    for entry in speed.values():
        memory = entry["memory"]
        assert entry["median_step_s"] > 0 and memory["activation_bytes"] > 0
        # AdamW keeps two moments per trainable value (plus a scalar step count per tensor).
        assert 2 * memory["gradient_bytes"] <= memory["optimizer_bytes"] <= 2 * memory["gradient_bytes"] + 4096
    assert speed["qlora"]["memory"]["weights_bytes"] < speed["lora"]["memory"]["weights_bytes"]
    # Sparse FFN layers keep fewer intermediate activations for the backward pass.
    assert speed["sparselora"]["memory"]["activation_bytes"] < speed["lora"]["memory"]["activation_bytes"]
    assert speed["sparselora"]["flops_ratio_vs_lora"] < speed["sparselora-s50"]["flops_ratio_vs_lora"] < 1


def test_the_report_and_the_answers_quote_the_jsons_numbers(published):
    _, out, results = published
    text = (out / "report.md").read_text()
    for variant, cell in results["aggregate"]["sentiment"].items():
        accuracy = cell["test_accuracy"]
        assert f"`{variant}`" in text
        assert f"{100 * accuracy['mean']:.1f} ± {100 * accuracy['std']:.1f}" in text
    for entry in results["speed"]["sentiment"]:
        assert f"{entry['median_step_s']:.3f}" in text
    assert set(results["answers"]) == {"sparselora", "qlora", "hira", "tasks", "combinations"}
    for key in ("sparselora", "qlora", "hira", "tasks"):
        assert results["answers"][key] and results["answers"][key] in text
    table = report.rows(results)
    sparse = [
        r for r in table if r.variant.startswith("sparselora") and not r.variant.endswith("4bit") and r.flops_ratio
    ]
    assert sparse  # beside each FLOPs ratio, the speed-up it alone would buy
    for row in sparse:
        said = f"FLOPs {row.flops_ratio:.2f} of LoRA's ({1 / row.flops_ratio:.2f}x by FLOPs alone)"
        assert said in results["answers"]["sparselora"]
    headlines = report.headlines(table)
    for key, _ in report.QUESTIONS:  # each answer in one sentence, above its table
        if headlines[key]:
            assert f"**{headlines[key]}**" in text and report.question_table(table, key) in text
    figures = {name: plotly.io.from_json((out / "figures" / f"{name}.json").read_text()) for name in report.FIGURES}
    assert all(figure.data and figure.layout.title.text for figure in figures.values())


def test_the_probe_shows_what_the_sliced_layers_lose_in_the_report(published):
    _, out, results = published
    probed = results["probe"]["sentiment"]
    assert sorted((r["layer"], r["sparsity"]) for r in probed) == [(0, 0.5), (0, 0.9), (1, 0.5), (1, 0.9)]
    assert "generation" not in results["probe"]  # a plan without probe sparsities is not probed
    for record in probed:  # shares of the output, measured on the plan's own batches
        assert all(0 < record[key] < 1 for key in ("oracle_error", "estimator_error", "token_oracle_error"))
        assert record["batches"] == 4 and record["context_tokens"] > 0
    text = (out / "report.md").read_text()
    layer0 = {r["sparsity"]: r for r in probed if r["layer"] == 0}
    # two layers with none kept dense: layer 0 is sliced, layer 1 is the last
    assert report.probe_table(results, "sentiment") in text
    assert "| 0.9 | sliced by `sparselora` (0) | " + f"{layer0[0.9]['oracle_error']:.2f} | " in text
    assert "last (1: outputs only)" in text
    # Question 1 quotes what the sliced layers lose at the sparsity `sparselora` runs (its default, 0.9)
    assert (
        f"sentiment, layer 0 at 0.9: {layer0[0.9]['oracle_error']:.2f} with the oracle's channels, "
        f"{layer0[0.9]['estimator_error']:.2f} with the estimator's" in text
    )
    # and names the fastest setting that keeps LoRA's quality, or the closest where none does
    assert "The fastest setting within 1 point of LoRA's accuracy or 2% of its perplexity: sentiment " in text


def test_one_plan_runs_again_and_the_others_keep_their_published_figures(published, plans, tmp_path):
    runs, _, results = published
    previous = json.loads(json.dumps(results))
    previous["variants"]["hira"]["hparams"]["rank"] = 2  # as published, not as the code has it now

    def rerun(only: list[str], earlier: dict = previous) -> dict:
        return suite.run_suite(
            plans, runs, offline=True, log=lambda line: None, name="test", command="cmd", previous=earlier, only=only
        )

    again = rerun(["generation"])
    for key in ("started_at", "duration_s", "training", "hardware", "command"):  # the suite's own record stays
        assert again[key] == results[key]
    assert [r["plans"] for r in again["reruns"]] == [["generation"]] and again["reruns"][0]["command"] == "cmd"
    assert json.loads(json.dumps(again["plans"])) == results["plans"]
    for key in ("cells", "sweep"):
        kept = [c for c in again[key] if c["plan"] == "sentiment"]
        assert kept == [c for c in results[key] if c["plan"] == "sentiment"]
    assert again["speed"]["sentiment"] == results["speed"]["sentiment"]
    assert again["probe"]["sentiment"] == results["probe"]["sentiment"]
    assert again["learning_rates"] == results["learning_rates"]  # generation's come from the kept sentiment plan
    assert again["variants"]["hira"]["hparams"]["rank"] == 2  # the kept plan's variant as its cells were trained
    timed_again = [e["median_step_s"] for e in again["speed"]["generation"]]
    assert timed_again != [e["median_step_s"] for e in results["speed"]["generation"]]
    # then every plan timed again: the report tells both, oldest first (times are to the second, and
    # a tiny plan runs again in less than one)
    time.sleep(1.1)
    retimed = suite.retime(again, offline=True, log=lambda line: None, command="retime")
    report.write(retimed, tmp_path)
    text = (tmp_path / "report.md").read_text()
    reused = again["reruns"][0]["training"]["runs"]
    said = [
        f"The generation plan was run again by `cmd` on {again['reruns'][0]['started_at']} (",
        f"): 0 runs trained and {reused} reused from an earlier invocation, steps timed; the figures of the other "
        "plans are unchanged.",
        f"Every plan's step times and memory were measured again, without training, by `retime` on "
        f"{retimed['timed']['started_at']}",
    ]
    assert all(part in text for part in said)
    assert [text.index(part) for part in said] == sorted(text.index(part) for part in said)

    refusals = {
        ("nope",): "no plan 'nope' in this suite; its plans: sentiment, generation",
        ("sentiment",): "plan generation takes its learning rates from plan sentiment: run it too",
    }
    for only, message in refusals.items():
        with pytest.raises(suite.SuiteError, match=message):
            rerun(list(only))
    sentiment, generation = plans  # with rates of its own, generation's reviews still need the sentiment judge
    own_rates = (sentiment, dataclasses.replace(generation, sweep={"lora": (1e-3,)}, rates_from=None))
    with pytest.raises(suite.SuiteError, match="plan generation's reviews are judged by a run of plan sentiment"):
        suite.run_suite(
            own_rates, runs, offline=True, log=lambda line: None, name="test", previous=previous, only=["sentiment"]
        )
    with pytest.raises(suite.SuiteError, match="no published results to keep plan sentiment from"):
        rerun(["generation"], earlier=None)
    with pytest.raises(suite.SuiteError, match="the published results are the quick suite's, not the test suite's"):
        rerun(["generation"], earlier={**previous, "suite": "quick"})
    with pytest.raises(suite.SuiteError, match="these results were measured in fp16"):
        rerun(["generation"], earlier={**previous, "precision": "fp16"})
    assert main(["bench", "--retime", "--plan", "generation"]) == 2


def test_a_rerun_suite_reuses_completed_cells(published, plans):
    runs, _, results = published
    before = sorted(run.id for run in RunStore(runs).runs())
    again = suite.run_suite(plans, runs, offline=True, log=lambda line: None, name="test")
    assert sorted(run.id for run in RunStore(runs).runs()) == before
    assert again["training"]["trained_now"] == 0 and results["training"]["trained_now"] == results["training"]["runs"]
    assert (
        again["training"]["runs"]
        == results["training"]["runs"]
        == len({c["run"] for c in results["cells"]} | {t["run"] for t in results["sweep"]})
    )
    assert (
        again["aggregate"]["sentiment"]["lora"]["test_accuracy"]
        == results["aggregate"]["sentiment"]["lora"]["test_accuracy"]
    )


def test_one_published_cell_reruns_to_the_same_figures(published, capsys):
    runs, out, results = published
    original = (out / "results.json").read_text()
    assert main(["--runs-dir", str(runs), "bench", "--only", "sentiment/hira", "--seed", "1", "--out", str(out)]) == 0
    rerun = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rerun["published"]["validation"] == next(
        c["validation"] for c in results["cells"] if c["cell"] == "sentiment/hira" and c["seed"] == 1
    )
    assert all(abs(value) < 1e-6 for split in rerun["difference"].values() for value in split.values())
    assert (out / "results.json").read_text() == original  # published figures untouched

    assert main(["--runs-dir", str(runs), "bench", "--only", "sentiment/full", "--out", str(out)]) == 2
    assert "no published cell 'sentiment/full'" in capsys.readouterr().err


def test_the_report_is_rewritten_from_the_json_alone(published, tmp_path, capsys):
    _, out, _ = published
    copy = tmp_path / "results"
    copy.mkdir()
    (copy / "results.json").write_text((out / "results.json").read_text())
    assert main(["bench", "--report", "--out", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert main(["bench", "--report", "--out", str(tmp_path / "nothing")]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_a_retimed_suite_measures_every_step_again_and_keeps_the_trained_cells(published, tmp_path, capsys):
    runs, out, results = published
    copy = tmp_path / "results"
    copy.mkdir()
    published = json.loads((out / "results.json").read_text())
    published["variants"]["hira"]["hparams"]["rank"] = 2  # the variant as published, not as the code has it now
    (copy / "results.json").write_text(json.dumps(published))
    # no run store: retiming never trains, so it runs where only results.json was published
    assert main(["--runs-dir", str(tmp_path / "no-runs"), "bench", "--retime", "--offline", "--out", str(copy)]) == 0
    retimed = json.loads((copy / "results.json").read_text())
    assert not (tmp_path / "no-runs").exists() or not any((tmp_path / "no-runs").iterdir())
    for key in ("cells", "aggregate", "sweep", "learning_rates", "training", "started_at", "duration_s", "hardware"):
        assert retimed[key] == results[key]
    for plan, entries in results["speed"].items():
        again = {e["label"]: e for e in retimed["speed"][plan]}
        assert list(again) == [e["label"] for e in entries]
        for entry in entries:
            expected = {**entry["hparams"], "rank": 2} if entry["label"] == "hira" else entry["hparams"]
            assert again[entry["label"]]["hparams"] == expected
            assert again[entry["label"]]["median_step_s"] != entry["median_step_s"]  # timed anew
    assert retimed["timed"]["command"] == "python -m training bench --retime --offline"
    text = (copy / "report.md").read_text()
    assert (
        f"again, without training, by `python -m training bench --retime --offline` on {retimed['timed']['started_at']}"
        in text
    )
    for entry in retimed["speed"]["sentiment"]:
        assert f"{entry['median_step_s']:.3f}" in text

    # timed at another precision than the published figures: refused, nothing rewritten
    (copy / "results.json").write_text(json.dumps({**retimed, "precision": "fp16"}))
    assert main(["bench", "--retime", "--offline", "--out", str(copy)]) == 2
    assert "these results were measured in fp16, and this machine computes steps in" in capsys.readouterr().err
    assert json.loads((copy / "results.json").read_text())["precision"] == "fp16"


def test_the_guide_and_compare_tabs_show_the_published_results(published):
    import gradio as gr

    from ui import compare_tab, guide_tab
    from ui.arena import Arena

    runs, out, results = published
    arena = Arena(str(runs))
    from_store = guide_tab.store_markdown(arena)  # the store's runs, question by question
    assert "**1. What does SparseLoRA" in from_store
    store_rows = report.store_rows(arena.store)  # the suite's runs: one plan per task and budget
    measured = {(row.task, row.variant) for row in store_rows}
    assert {("sentiment", "lora"), ("generation", "lora")} <= measured
    for key, said in report.answers(store_rows).items():  # the report's functions, fed the store's rows
        if key != "tasks":
            assert said in from_store and report.question_table(store_rows, key) in from_store
    assert "By FLOPs alone" not in from_store  # a store's runs count no FLOPs: nothing to explain
    with gr.Blocks() as demo:
        with gr.Tab("Compare") as compare:
            compare_tab.build(demo, arena, compare, out)
        with gr.Tab("Guide") as guide:
            guide_tab.build(demo, arena, guide, out)
    shown = [block for block in demo.blocks.values() if isinstance(block, (gr.Markdown, gr.Plot))]
    texts = [block.value for block in shown if isinstance(block, gr.Markdown) and isinstance(block.value, str)]
    assert sum(report.headline_tables(results).strip() in text for text in texts) == 2  # Compare and Guide
    assert any(text == (out / "report.md").read_text().strip() for text in texts)
    assert sum(isinstance(block, gr.Plot) for block in shown) >= 2 + len(report.FIGURES)
    table = report.rows(results)
    headlines = report.headlines(table)  # the report's sentences and tables, the same functions
    for key in ("sparselora", "qlora", "hira", "tasks"):
        assert any(headlines[key] in text for text in texts)
        assert any(report.question_table(table, key).strip() == text for text in texts)
    plots = [block for block in shown if isinstance(block, gr.Plot)]
    assert all(plot.label and plot.label != "Plot" and not plot.show_label for plot in plots)  # titled by the figure


def test_published_cells_keep_their_run_ids_when_a_setting_is_added_later():
    """TrainConfig gained `processes` after these cells were published: at its default the digest
    is the one they were published under, so `make bench` reuses them; another count is another run."""
    from dataclasses import replace

    results = json.loads((suite.RESULTS_DIR / "results.json").read_text())
    published = next(c for c in results["cells"] if c["cell"] == "sentiment/lora" and c["seed"] == 0)
    plan = next(p for p in suite.SUITES["full"] if p.name == "sentiment")
    variant = suite.VARIANTS["lora"]
    config = suite.cell_config(plan, variant, published["hparams"]["learning_rate"], 0, offline=True, judge=None)
    assert suite.cell_run_id(plan, variant, config) == published["run"]
    assert suite.cell_run_id(plan, variant, replace(config, processes=2)) != published["run"]
