"""Serving many runs side by side from shared base models: same answers as loading each run alone."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_sentiment_config

from training.core import inference
from training.core.config import TrainConfig
from training.core.errors import InferenceError
from training.core.runs import RunNotFound, RunStore
from training.engine import resume, train
from training.serving.playground import MAX_RUNS, classify_side_by_side, generate_side_by_side
from training.serving.pool import AdapterPool

REVIEW = "A gripping, beautifully acted film."


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_models, review_csv) -> RunStore:
    store = RunStore(tmp_path_factory.mktemp("runs"))
    for method, seed in (("lora", 0), ("lora", 1), ("hira", 0), ("full", 0), ("qlora", 0)):
        overrides = dict(method=method, seed=seed, max_steps=6, hparams={"learning_rate": 5e-3})
        train(tiny_sentiment_config(tiny_models, review_csv, **overrides), store)
    train(
        TrainConfig(
            task="generation",
            method="lora",
            model=tiny_models["llama"],
            dataset="bundled/hamlet",
            max_steps=4,
            batch_size=4,
            seq_len=48,
            eval_samples=8,
            offline=True,
        ),
        store,
    )
    return store


def _ids(store: RunStore, task: str) -> list[str]:
    return [run.id for run in store.runs() if run.config["task"] == task]


def test_each_run_answers_as_if_loaded_alone(store):
    pool = AdapterPool()
    run_ids = _ids(store, "sentiment")
    results = classify_side_by_side(pool, store, run_ids, REVIEW, include_base=True)
    assert [entry["run"] for entry in results] == [None, *run_ids]
    for entry in results[1:]:
        alone = inference.load_run(store.get(entry["run"]))
        expected = inference.class_probabilities(alone.model, alone.tokenizer, [REVIEW], alone.precision)[0]
        assert torch.allclose(torch.tensor(list(entry["probabilities"].values())), expected, atol=1e-5), entry["name"]
        assert entry["latency_s"] > 0
    # the two LoRA runs differ (different seeds), so adapters really are swapped, not shared
    lora = [entry["probabilities"]["positive"] for entry in results if entry["method"] == "LoRA"]
    assert len(lora) == 2 and lora[0] != lora[1]


def test_a_run_resumed_since_it_was_served_answers_with_its_new_adapter(tmp_path, tiny_models, review_csv):
    store = RunStore(tmp_path)
    config = tiny_sentiment_config(tiny_models, review_csv, max_steps=12, hparams={"learning_rate": 5e-2})
    calls: list[int] = []
    train(config, store, should_stop=lambda: calls.append(1) or len(calls) >= 3)
    run_id = next(store.runs()).id
    pool = AdapterPool()

    def positive(serving: AdapterPool) -> float:
        answer = classify_side_by_side(serving, store, [run_id], REVIEW, include_base=False)[0]
        return answer["probabilities"]["positive"]

    stopped = positive(pool)
    resume(run_id, store)  # trains steps 4-12 and saves a new adapter
    resumed, fresh = positive(pool), positive(AdapterPool())
    assert abs(fresh - stopped) > 1e-4  # the resume did train the adapter on
    assert resumed == pytest.approx(fresh, abs=1e-6)


def test_a_run_named_many_times_is_answered_once(store):
    run_id = _ids(store, "sentiment")[0]
    results = classify_side_by_side(AdapterPool(), store, [run_id] * (MAX_RUNS + 1), REVIEW, include_base=False)
    assert [entry["run"] for entry in results] == [run_id]


def test_adapters_of_one_kind_share_one_base_model(store):
    pool = AdapterPool()
    classify_side_by_side(pool, store, _ids(store, "sentiment"), REVIEW, include_base=True)
    held = pool.loaded()
    methods = {run.id: run.config["method"] for run in store.runs()}
    bases = {(base["quantized"], base["adapter_type"]): [methods[r] for r in base["runs"]] for base in held["bases"]}
    # LoRA (both runs) and the base's answer share one model; HiRA and the 4-bit base have their own
    assert bases == {(False, "LORA"): ["lora", "lora"], (False, "HIRA"): ["hira"], (True, "LORA"): ["qlora"]}
    assert [methods[run] for run in held["full_models"]] == ["full"]  # a whole model, kept by itself


def test_merged_adapters_answer_the_same_and_report_their_latency(store):
    pool = AdapterPool()
    lora_ids = [
        run.id
        for run in store.runs()
        if run.config["task"] == "sentiment" and run.config["method"] in ("lora", "qlora")
    ]
    merged = classify_side_by_side(pool, store, lora_ids, REVIEW, include_base=False, compare_merged=True)
    by_method = {entry["method"]: entry for entry in merged}
    assert by_method["LoRA"]["merged_latency_s"] > 0
    assert by_method["QLoRA"]["merged_latency_s"] is None  # merging into 4-bit weights would re-quantize
    again = classify_side_by_side(pool, store, lora_ids, REVIEW, include_base=False)
    for before, after in zip(merged, again):  # unmerged afterwards: the weights are back
        assert before["probabilities"] == pytest.approx(after["probabilities"], abs=1e-5)


def test_generation_side_by_side_matches_a_run_loaded_alone_and_is_judged(store):
    pool = AdapterPool()
    (run_id,) = _ids(store, "generation")
    settings = dict(max_new_tokens=6, temperature=0.0, top_p=1.0, seed=0)
    results = generate_side_by_side(pool, store, [run_id], "To be, or not", include_base=True, **settings)
    assert [entry["run"] for entry in results] == [None, run_id]
    alone = inference.load_run(store.get(run_id))
    assert (
        results[1]["text"]
        == inference.sample(alone.model, alone.tokenizer, ["To be, or not"], precision=alone.precision, **settings)[0]
    )
    assert all(entry["text"].strip() for entry in results)
    # the most accurate sentiment run judges each text, as it reads the text when loaded alone
    judge = store.get(results[0]["judge_run"])
    accuracy = lambda run: run.summary["metrics"]["validation"]["accuracy"]  # noqa: E731
    assert accuracy(judge) == max(accuracy(run) for run in store.runs() if run.config["task"] == "sentiment")
    assert all(entry["judge_run"] == judge.id for entry in results)
    readings = inference.classify(inference.load_run(judge), [entry["text"] for entry in results])
    for entry, reading in zip(results, readings):
        assert entry["judged"]["label"] == reading["label"]
        assert entry["judged"]["positive"] == pytest.approx(reading["probabilities"]["positive"], abs=1e-5)


@pytest.mark.parametrize(
    "text, run_ids, error, message",
    [
        ("", None, InferenceError, "empty"),
        ("   ", None, InferenceError, "empty"),
        ("x" * 2001, None, InferenceError, "at most 2000"),
        (REVIEW, ["../outside"], RunNotFound, "not a valid run id"),
        (REVIEW, ["20990101-000000-sentiment-lora-0000"], RunNotFound, "no run"),
        (REVIEW, "generation", InferenceError, "not a sentiment run"),
        (REVIEW, "too many", InferenceError, f"at most {MAX_RUNS}"),
        (REVIEW, "a string", InferenceError, "list of run ids"),
        (REVIEW, [], InferenceError, "select at least one run"),
    ],
)
def test_bad_playground_requests_get_a_readable_error(store, text, run_ids, error, message):
    if run_ids == "generation":
        run_ids = _ids(store, "generation")
    elif run_ids == "too many":
        run_ids = [f"run-{index}" for index in range(MAX_RUNS + 1)]
    elif run_ids == "a string":
        run_ids = _ids(store, "sentiment")[0]
    include_base = run_ids is None
    with pytest.raises(error, match=message):
        classify_side_by_side(AdapterPool(), store, run_ids or [], text, include_base=include_base)
