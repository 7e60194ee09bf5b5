"""Playground tab: one input, every selected run and the base model side by side.

All runs of a task are served from one base model in memory with their adapters swapped in
(`training.serving.pool.AdapterPool`); user text is escaped wherever it is shown as HTML.
"""

from __future__ import annotations

import html
from typing import Any

import gradio as gr

from training.core.inference import MAX_NEW_TOKENS
from training.core.metrics import metric_text
from training.core.models import LABELS
from training.serving.playground import review_prompt

from . import export_panel
from .arena import Arena, kept_selection, run_label, user_errors

GENERATION_CAP = 128  # max new tokens offered in the UI: a CPU Space answers in seconds


def _served_runs(arena: Arena, task: str) -> list[tuple[str, str]]:
    """(label, run id) of every run of `task` with a saved adapter, best first."""
    frame = arena.leaderboard(task)
    if frame.empty:
        return []
    frame = frame[frame["run"].map(arena.has_adapter)]

    def quality(row: Any) -> str:
        evaluated = row.validation == row.validation  # NaN: stopped before its final evaluation
        return f"{row.metric} {metric_text(row.metric, row.validation)}" if evaluated else "not evaluated"

    return [(run_label(row.run, row.method, quality(row)), row.run) for row in frame.itertuples()]


def _latency(entry: dict) -> str:
    text = f"{entry['latency_s'] * 1000:.0f} ms"
    if entry.get("merged_latency_s") is not None:
        text += f" · merged {entry['merged_latency_s'] * 1000:.0f} ms"
    elif "merged_latency_s" in entry:
        text += " · merge n/a (4-bit base or full model)"
    return text


def _card(entry: dict, body: str) -> str:
    return (
        '<div class="arena-card">'
        f'<div class="arena-card-title">{html.escape(entry["name"])}</div>'
        f'<div class="arena-card-meta">{html.escape(entry["method"])} · {_latency(entry)}</div>'
        f"{body}</div>"
    )


def _answered(kind: str, text: str) -> str:
    """The line above the cards naming what they answer: a slow answer is never taken for the
    answer to text typed since."""
    shown = text if len(text) <= 160 else text[:160] + "…"
    return f'<div class="arena-answered">{kind} <q>{html.escape(shown)}</q></div>'


def sentiment_cards(text: str, results: list[dict]) -> str:
    cards = []
    for entry in results:
        bars = "".join(
            f'<div class="arena-bar-row"><span>{label}</span><div class="arena-bar">'
            f'<div class="arena-bar-fill arena-{label}" style="width:{100 * entry["probabilities"][label]:.1f}%">'
            f"</div></div><span>{entry['probabilities'][label]:.3f}</span></div>"
            for label in LABELS
        )
        note = ' <span class="arena-note">(untrained head: chance)</span>' if entry["run"] is None else ""
        cards.append(
            _card(entry, f'<div class="arena-label arena-{entry["label"]}">{entry["label"]}{note}</div>{bars}')
        )
    return _answered("Classified", text) + f'<div class="arena-cards" id="classify-results">{"".join(cards)}</div>'


def generation_cards(prompt: str, results: list[dict]) -> str:
    cards = []
    for entry in results:
        judged = ""
        if "judged" in entry:
            judged = (
                f'<div class="arena-judged">judged <b class="arena-{entry["judged"]["label"]}">'
                f"{entry['judged']['label']}</b> (p positive {entry['judged']['positive']:.2f})</div>"
            )
        cards.append(_card(entry, f'<div class="arena-text">{html.escape(entry["text"])}</div>{judged}'))
    return _answered("Continued", prompt) + f'<div class="arena-cards" id="generate-results">{"".join(cards)}</div>'


def _sentiment_panel(arena: Arena) -> gr.Dropdown:
    """The Sentiment sub-tab: a review classified by every chosen run; returns its runs list."""
    with gr.Tab("Sentiment"):
        text = gr.Textbox(
            "A gripping, beautifully acted film that stays with you.", label="Review", lines=2, elem_id="classify-text"
        )
        with gr.Row():
            runs = gr.Dropdown([], multiselect=True, label="Runs", scale=4, elem_id="classify-runs")
            with gr.Column(scale=1):
                include_base = gr.Checkbox(True, label="include the base model")
                merge = gr.Checkbox(False, label="also time merged adapters")
        classify_button = gr.Button("Classify", variant="primary", elem_id="classify-button")
        output = gr.HTML()

    def show_classification(text_value: str, run_ids: list[str] | None, base: bool, merged: bool) -> str:
        with user_errors(), arena.inference_threads():
            results = arena.classify(run_ids or [], text_value, base, merged)
        return sentiment_cards(text_value, results)

    # A click while one is answered (a new review typed meanwhile) is answered next, not dropped:
    # what the page shows last is always the answer to the last click.
    classify_button.click(
        show_classification,
        [text, runs, include_base, merge],
        output,
        api_visibility="private",
        trigger_mode="always_last",
    )
    return runs


def _generation_panel(arena: Arena) -> tuple[gr.Dropdown, gr.Button]:
    """The Generation sub-tab: a prompt continued by every chosen run; returns its runs list and
    the button that refreshes both tabs' lists."""
    with gr.Tab("Generation"):
        with gr.Row():
            wanted = gr.Radio(["free prompt", *LABELS], value="positive", label="Review sentiment", scale=2)
            refresh_runs = gr.Button("Refresh run lists", scale=0)
        prompt = gr.Textbox(review_prompt("positive"), label="Prompt", lines=3)
        with gr.Row():
            max_new_tokens = gr.Slider(1, min(GENERATION_CAP, MAX_NEW_TOKENS), 48, step=1, label="max new tokens")
            temperature = gr.Slider(0, 2, 0.8, step=0.05, label="temperature (0: greedy)")
            top_p = gr.Slider(0.05, 1, 0.95, step=0.05, label="top-p")
            seed = gr.Number(0, label="seed", precision=0)
        with gr.Row():
            runs = gr.Dropdown([], multiselect=True, label="Runs", scale=4)
            with gr.Column(scale=1):
                include_base = gr.Checkbox(True, label="include the base model")
                merge = gr.Checkbox(False, label="also time merged adapters")
        generate_button = gr.Button("Generate", variant="primary")
        output = gr.HTML()

    def show_generations(prompt_value, run_ids, base, merged, tokens, temp, nucleus, seed_value) -> str:
        with user_errors(), arena.inference_threads():
            results = arena.generate(
                run_ids or [],
                prompt_value,
                base,
                merged,
                max_new_tokens=int(tokens),
                temperature=float(temp),
                top_p=float(nucleus),
                seed=int(seed_value or 0),
            )
        return generation_cards(prompt_value, results)

    generate_button.click(
        show_generations,
        [prompt, runs, include_base, merge, max_new_tokens, temperature, top_p, seed],
        output,
        api_visibility="private",
        trigger_mode="always_last",  # as Classify's
    )
    wanted.change(
        lambda choice: gr.skip() if choice == "free prompt" else review_prompt(choice),
        wanted,
        prompt,
        api_visibility="private",
    )
    return runs, refresh_runs


def _run_lists(
    arena: Arena,
    chosen_sentiment: list[str] | None,
    chosen_generation: list[str] | None,
    home: str | None,
    filled: list[str],
):
    """Both tabs' run lists (what is still served of the chosen runs; the best two the first time a
    list has any), the take-home choice, and which lists have had their defaults."""
    choices = {task: _served_runs(arena, task) for task in ("sentiment", "generation")}
    chosen = {"sentiment": chosen_sentiment, "generation": chosen_generation}

    def listed(task: str) -> Any:
        ids = [run_id for _, run_id in choices[task]]
        return gr.update(choices=choices[task], value=kept_selection(chosen[task], ids, 2, task in filled))

    every = [run_id for task in choices for _, run_id in choices[task]]
    return (
        listed("sentiment"),
        listed("generation"),
        gr.update(choices=choices["sentiment"] + choices["generation"], value=home if home in every else None),
        sorted({*filled, *(task for task in choices if choices[task])}),
    )


def build(demo: gr.Blocks, arena: Arena, tab: gr.Tab) -> None:
    sentiment_runs = _sentiment_panel(arena)
    generation_runs, refresh_runs = _generation_panel(arena)
    take_home = export_panel.download_row(arena, "Take a run home: its adapter as a .zip", "playground-take-home")

    filled = gr.State([])  # the tasks whose run list has had its default runs

    def run_lists(sentiment: list[str] | None, generation: list[str] | None, home: str | None, done: list[str]):
        return _run_lists(arena, sentiment, generation, home, done)

    lists = [sentiment_runs, generation_runs, take_home.chooser, filled]
    for trigger in (demo.load, refresh_runs.click, tab.select):
        take_home.follow(trigger(run_lists, lists, lists, api_visibility="private"))
