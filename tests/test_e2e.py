"""End to end on the bundled real models: a few dozen LoRA steps learn, and the adapter reloads exactly."""

from __future__ import annotations

import statistics

import pytest

from training.core import data, evaluation, inference
from training.core.config import TrainConfig
from training.core.models import BUNDLED_SMOLLM2, load_model, load_tokenizer, resolve_model_path, weight_memory_bytes
from training.core.runs import RunStore
from training.engine import train

pytestmark = pytest.mark.e2e


def _losses(run) -> list[float]:
    return [r["loss"] for r in run.metrics() if r["kind"] == "train"]


# A bf16 run re-evaluated from its saved adapter: the same weights, but bf16 products of a fresh
# model can round differently from the trained one's (relative differences of about 6e-5 seen).
BF16_RELOAD_TOLERANCE = 2e-4


def _reevaluate(run, split: str, eval_samples: int) -> dict:
    config = run.config
    loaded = inference.load_run(run)
    splits = data.load_splits(config["dataset"], config["task"], offline=True)
    records = data.tokenize(getattr(splits, split), loaded.tokenizer, config["task"], config["seq_len"])
    records = records.select(range(min(eval_samples, len(records))))
    collate = data.collator(loaded.tokenizer, config["task"])
    return evaluation.evaluate(loaded.model, records, collate, config["task"], loaded.precision)


def test_lora_learns_sentiment_on_the_bundled_encoder(bundled_encoder_run):
    run, summary = bundled_encoder_run, bundled_encoder_run.summary
    losses = _losses(run)
    assert statistics.mean(losses[-20:]) < statistics.mean(losses[:20]) - 0.05
    assert summary["metrics"]["validation"]["accuracy"] > summary["base_metrics"]["validation"]["accuracy"] + 0.1
    assert summary["trainable_percent"] < 1.0

    # clear reviews get the label a reader would give them
    answers = inference.classify(
        inference.load_run(run), ["An utterly wonderful, moving film", "A dull, boring, awful mess"]
    )
    assert [answer["label"] for answer in answers] == ["positive", "negative"]

    again = _reevaluate(run, "test", 200)
    assert again["accuracy"] == summary["metrics"]["test"]["accuracy"]
    assert again["loss"] == pytest.approx(summary["metrics"]["test"]["loss"], rel=BF16_RELOAD_TOLERANCE)


def test_lora_lowers_perplexity_on_the_bundled_causal_lm(tmp_path):
    store = RunStore(tmp_path)
    summary = train(
        TrainConfig(
            task="generation",
            method="lora",
            max_steps=16,
            batch_size=8,
            seq_len=64,
            eval_samples=48,
            eval_steps=16,  # the base and final evaluations only: nothing reads one in between
            control_samples=0,
            offline=True,
        ),
        store,
    )
    (run,) = store.runs()
    losses = _losses(run)
    assert statistics.mean(losses[-6:]) < statistics.mean(losses[:6])
    assert summary["metrics"]["validation"]["perplexity"] < summary["base_metrics"]["validation"]["perplexity"]

    again = _reevaluate(run, "validation", 48)
    assert again["loss"] == pytest.approx(summary["metrics"]["validation"]["loss"], rel=BF16_RELOAD_TOLERANCE)

    # the adapter changes what the model writes: greedy continuations with and without it differ
    loaded = inference.load_run(run)
    prompts, _ = evaluation.control_prompts(2)
    greedy = dict(max_new_tokens=16, temperature=0.0)
    tuned = inference.sample(loaded.model, loaded.tokenizer, prompts, precision=loaded.precision, **greedy)
    with loaded.model.disable_adapter():
        base = inference.sample(loaded.model, loaded.tokenizer, prompts, precision=loaded.precision, **greedy)
    assert all(text.strip() for text in tuned) and tuned != base, (tuned, base)


def test_nf4_stores_the_causal_lm_in_about_a_third_of_the_memory():
    path = resolve_model_path(BUNDLED_SMOLLM2, offline=True)
    tokenizer = load_tokenizer(path)
    full = weight_memory_bytes(load_model(path, "generation", tokenizer))
    nf4 = weight_memory_bytes(load_model(path, "generation", tokenizer, quantize_4bit=True))
    assert nf4 <= 0.35 * full
